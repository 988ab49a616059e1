# genflow: `make train` runs the main job, `make test` the whole suite. Both set up .venv themselves.
PY      ?= python3
VENV    ?= .venv
PYBIN   := $(VENV)/bin/python
THREADS ?= 2
export OMP_NUM_THREADS := $(THREADS)
export MKL_NUM_THREADS := $(THREADS)

.PHONY: venv train test bench clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYBIN) -m pip install -q --upgrade pip
	$(PYBIN) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PYBIN) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PYBIN) train.py model=pfgmpp D=128 data=digits fid.num=1000 hydra.run.dir=runs/main

test: venv
	$(PYBIN) -m pytest -q --durations=15

bench: venv
	$(PYBIN) -m genflow.bench train-step

clean:
	rm -rf $(VENV) runs outputs multirun .pytest_cache
