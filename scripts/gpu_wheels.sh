#!/usr/bin/env bash
# Wheels for the GPU machine (scripts/gpu_check.sh): the packages genflow needs that its image lacks —
# hydra-core, omegaconf, antlr4-python3-runtime (no wheel on the index: built here from its sdist) and
# clean-fid — into .whl/ (ignored by git; name it in the device call's `carry`). Run once, here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${1:-.whl}
mkdir -p "$DEST"
# the versions this project's environment (.venv, `make venv`) resolved, for the device's Python 3.12 on x86-64
VENV_PY=${VENV_PY:-.venv/bin/python}
version() { "$VENV_PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
HYDRA=$(version hydra-core 1.3.2) OMEGACONF=$(version omegaconf 2.3.0) CLEANFID=$(version clean-fid 0.1.35)
ANTLR=$(version antlr4-python3-runtime 4.9.3)
$PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "hydra-core==$HYDRA" "omegaconf==$OMEGACONF" "clean-fid==$CLEANFID"
$PY -m pip wheel --quiet --no-deps --no-binary=:all: -w "$DEST" "antlr4-python3-runtime==$ANTLR" 2>/dev/null
ls "$DEST"; du -sh "$DEST"
