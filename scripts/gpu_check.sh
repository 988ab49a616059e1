#!/usr/bin/env bash
# The GPU check: measures and tests on a machine with one CUDA GPU what the CPU sessions could not.
# Results go to $OUT (default gpu_check/), one file per stage, written as each stage ends.
#
#   bash scripts/gpu_check.sh                 # all stages: env suite tests train (about 12-14 minutes)
#   bash scripts/gpu_check.sh env suite       # one device call (<= 9 minutes) ...
#   bash scripts/gpu_check.sh tests train     # ... and a second one right after, while the machine is warm
#
# Wheels of what the machine lacks (hydra-core, omegaconf, antlr4-python3-runtime, clean-fid) are installed into
# /tmp/site from $WHEELS (default .whl/, wheels/ or shared/wheels/) when such a folder exists; nothing is
# downloaded. Make them here first with `bash scripts/gpu_wheels.sh` and carry `.whl`. Every stage runs under
# `timeout`, so the check is bounded even when one stage hangs. `suite` runs before `tests` and `train` so that
# their compilation of the same network, shapes and levers finds the suite's in torch.compile's on-disk cache.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGES=${*:-env suite tests train}
# the suite's figures also kept outside $OUT (which a device call empties), for a later call's `train` stage
SUITE_COPY=${TMPDIR:-/tmp}/gpu_check_suite.jsonl
status=0

log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }

for dir in "${WHEELS:-}" .whl wheels shared/wheels; do
  if [ -n "$dir" ] && ls "$dir"/*.whl >/dev/null 2>&1; then
    log "installing wheels from $dir into /tmp/site"
    $PY -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$dir"/*.whl >>"$OUT/pip.txt" 2>&1 || log "pip install failed (see pip.txt)"
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
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
      log "tests/test_gpu.py (timeout 300 s)"
      timeout 300 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py >"$OUT/test_gpu.txt" 2>&1
      rc=$?; [ $rc -ne 0 ] && status=1
      log "tests rc=$rc: $(tail -1 "$OUT/test_gpu.txt")" ;;
    suite)
      log "python -m genflow.apps.bench what=gpu-suite ablation=true (timeout 480 s)"
      timeout 480 $PY -m genflow.apps.bench what=gpu-suite ablation=true threads="$(nproc)" >"$OUT/gpu_suite.jsonl" 2>"$OUT/gpu_suite.err"
      rc=$?; [ $rc -ne 0 ] && status=1
      cp "$OUT/gpu_suite.jsonl" "$SUITE_COPY"
      $PY -m genflow.apps.bench what=table table="$OUT/gpu_suite.jsonl" >>"$OUT/summary.txt" 2>&1
      log "suite rc=$rc, $(grep -c '^{' "$OUT/gpu_suite.jsonl") figures in gpu_suite.jsonl" ;;
    train)
      log "train.py trainer=gpu net=ddpmpp_cifar10 on generated 32x32 images (timeout 240 s)"
      images=${TMPDIR:-/tmp}/gpu_check_images   # outside $OUT: only the small result files travel back
      run=${TMPDIR:-/tmp}/gpu_check_run_$$
      $PY - "$images" <<'PYEOF'
import sys, pathlib, torch, torchvision
folder = pathlib.Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(0)
for i in range(2048):
    torchvision.io.write_png(torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8), str(folder / f"{i:05d}.png"))
PYEOF
      timeout 240 $PY train.py model=edm net=ddpmpp_cifar10 data=imagefolder data.root="$images" data.batch_size=256 \
        data.on_device=true trainer=gpu trainer.max_steps=80 trainer.val_check_interval=100000 checkpoint.every_n_steps=80 \
        sample.num=64 trainer.enable_progress_bar=false hydra.run.dir="$run" >"$OUT/train.txt" 2>&1
      rc=$?; [ $rc -ne 0 ] && status=1
      grep '^{' "$OUT/train.txt" | tail -1 >"$OUT/train.json"
      log "train rc=$rc: $(cat "$OUT/train.json")"
      # train.py's own figure within 10 % of the bench's step with the same levers
      $PY - "$OUT/train.json" "$SUITE_COPY" <<'PYEOF' 2>&1 | tee -a "$OUT/summary.txt"
import json, sys
try:
    train = json.loads(open(sys.argv[1]).read())["train_img_per_s"]
    rows = [json.loads(l) for l in open(sys.argv[2]) if l.startswith("{")]
    bench = next(r["img_per_s"] for r in rows if r["bench"] == "train-step" and r["compile"] and r["channels_last"])
    print(f"train.py {train} img/s vs bench {bench} img/s: {train / bench:.1%} of the bench figure")
except (OSError, KeyError, StopIteration, ValueError) as err:
    print(f"train.py vs bench: not compared ({type(err).__name__}: {err})")
PYEOF
      ;;
    *)
      log "unknown stage $stage (use env, tests, suite, train)"; status=2 ;;
  esac
done
log "done, status=$status; results in $OUT/"
exit $status
