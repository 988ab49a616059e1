#!/usr/bin/env bash
# The GPU check of issue 10: one call on a machine with one CUDA GPU measures and tests everything the CPU
# sessions could not. Results go to $OUT (default gpu_check/), one file per stage, written as each stage ends.
#
#   bash scripts/gpu_check.sh            # all stages, about 9-10 minutes on one H200
#   bash scripts/gpu_check.sh suite      # one stage: env | tests | suite | train
#
# Wheels of hydra-core, omegaconf, antlr4-python3-runtime and clean-fid (and anything else the machine lacks)
# are installed from $WHEELS (default wheels/ or shared/wheels/) when that folder exists; nothing is downloaded.
# Every stage runs under `timeout`, so the whole check is bounded even when one stage hangs.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGES=${*:-env tests suite train}
status=0

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }

for dir in "${WHEELS:-}" wheels shared/wheels; do
  if [ -n "$dir" ] && ls "$dir"/*.whl >/dev/null 2>&1; then
    log "installing wheels from $dir"
    $PY -m pip install --quiet --no-index --no-deps "$dir"/*.whl >>"$OUT/pip.txt" 2>&1 || log "pip install failed (see pip.txt)"
    break
  fi
done

for stage in $STAGES; do
  case $stage in
    env)
      log "env"
      { nvidia-smi || true; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA')"; } \
        >"$OUT/env.txt" 2>&1
      cat "$OUT/env.txt" | tail -1 | tee -a "$OUT/summary.txt" ;;
    tests)
      log "tests/test_gpu.py (timeout 200 s)"
      timeout 200 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py >"$OUT/test_gpu.txt" 2>&1
      rc=$?; [ $rc -ne 0 ] && status=1
      log "tests rc=$rc: $(tail -1 "$OUT/test_gpu.txt")" ;;
    suite)
      log "python -m genflow.bench gpu-suite (timeout 330 s)"
      timeout 330 $PY -m genflow.bench gpu-suite --threads "$(nproc)" >"$OUT/gpu_suite.jsonl" 2>"$OUT/gpu_suite.err"
      rc=$?; [ $rc -ne 0 ] && status=1
      log "suite rc=$rc, $(grep -c '^{' "$OUT/gpu_suite.jsonl") figures in gpu_suite.jsonl" ;;
    train)
      log "train.py trainer=gpu net=ddpmpp_cifar10 on generated 32x32 images (timeout 150 s)"
      images="$OUT/images"
      $PY - "$images" <<'PYEOF'
import sys, pathlib, torch, torchvision
folder = pathlib.Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(0)
for i in range(2048):
    torchvision.io.write_png(torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8), str(folder / f"{i:05d}.png"))
PYEOF
      timeout 150 $PY train.py model=edm net=ddpmpp_cifar10 data=imagefolder data.root="$images" data.batch_size=256 \
        data.on_device=true trainer=gpu trainer.max_steps=80 trainer.val_check_interval=100000 checkpoint.every_n_steps=80 \
        sample.num=64 trainer.enable_progress_bar=false hydra.run.dir="$OUT/train_run" \
        >"$OUT/train.txt" 2>"$OUT/train.err"
      rc=$?; [ $rc -ne 0 ] && status=1
      grep '^{' "$OUT/train.txt" | tail -1 >"$OUT/train.json"
      log "train rc=$rc: $(cat "$OUT/train.json")" ;;
    *)
      log "unknown stage $stage (use env, tests, suite, train)"; status=2 ;;
  esac
done
log "done, status=$status; results in $OUT/"
exit $status
