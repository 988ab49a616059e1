# genflow: `make train` runs the main job, `make test` the whole suite. Both set up .venv themselves.
PY      ?= python3
VENV    ?= .venv
PYBIN   := $(VENV)/bin/python
# CPU threads: empty = the CPUs available to the process (affinity and cgroup quota; genflow.threads).
# CPUs that other processes keep busy when a job starts are left to them. Idle OpenMP threads spin
# briefly, then sleep (GOMP_SPINCOUNT) instead of spinning against other work.
THREADS ?=
ifneq ($(strip $(THREADS)),)
export OMP_NUM_THREADS := $(THREADS)
export MKL_NUM_THREADS := $(THREADS)
endif
export GOMP_SPINCOUNT ?= 1000
# each `make train` gets its own folder: a finished run is never overwritten
RUN_DIR ?= runs/main/$(shell date +%Y-%m-%d_%H-%M-%S)

.PHONY: venv train test bench clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYBIN) -m pip install -q --upgrade pip
	$(PYBIN) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PYBIN) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PYBIN) train.py model=pfgmpp D=128 data=digits fid.num=1000 hydra.run.dir=$(RUN_DIR)

test: venv
	$(PYBIN) -m pytest -q --durations=15

bench: venv
	$(PYBIN) -m genflow.apps.bench what=train-step

clean:
	rm -rf $(VENV) runs outputs multirun .pytest_cache
