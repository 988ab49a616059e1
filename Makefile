# genflow: `make train` runs the main job, `make test` the whole suite, `make sample` / `make eval` use the
# newest `make train` run (or CKPT=path/to/final.ckpt). All set up .venv themselves.
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
# the checkpoint `make sample` and `make eval` read: the newest run's final EMA checkpoint
CKPT ?= $(shell ls -td runs/main/*/checkpoints/final.ckpt 2>/dev/null | head -1)

.PHONY: venv train sample eval test bench clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYBIN) -m pip install -q --upgrade pip
	$(PYBIN) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PYBIN) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PYBIN) train.py model=pfgmpp D=128 data=digits fid.num=1000 hydra.run.dir=$(RUN_DIR)

sample: venv
	@test -n "$(CKPT)" || { echo "error: no checkpoint: run make train first, or pass CKPT=path/to/final.ckpt"; exit 2; }
	$(PYBIN) sample.py ckpt=$(CKPT) num=64 out=$(patsubst %/checkpoints/final.ckpt,%/generated,$(CKPT))

eval: venv
	@test -n "$(CKPT)" || { echo "error: no checkpoint: run make train first, or pass CKPT=path/to/final.ckpt"; exit 2; }
	$(PYBIN) -m genflow.apps.evaluate ckpt=$(CKPT) fid.num=1000

test: venv
	$(PYBIN) -m pytest -q --durations=15

bench: venv
	$(PYBIN) -m genflow.apps.bench what=train-step

clean:
	rm -rf $(VENV) runs outputs multirun .pytest_cache
