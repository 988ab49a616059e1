#!/usr/bin/env bash
# CPU thread defaults, measured: `python -m genflow.apps.bench what=train-step` (PFGM++ D=128, unet_digits, 8x8, batch 128)
# with genflow's default threads and wait policy and the alternatives below, each on
# an idle machine and next to one competing CPU-bound process; then optionally the whole `make train` job.
# Run it on an otherwise idle machine:
#
#   scripts/measure_threads.sh            # the ten bench figures (about 3 minutes)
#   scripts/measure_threads.sh --make     # + `make train` timed (about 10 minutes), default threads, idle
#
# Prints one line per measurement: <setting> <load> <ms/step> <img/s>.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
STEPS=${STEPS:-30}

bench() {  # $@: environment assignments; prints ms/step, img/s and the device line
    local json
    json=$(env "$@" "$PY" -m genflow.apps.bench what=train-step steps="$STEPS" 2>/dev/null | tail -1)
    "$PY" -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["ms_per_step"], r["img_per_s"], r["device"])' "$json"
}

competitor_pid=""
start_competitor() { "$PY" -c 'while True: pass' & competitor_pid=$!; sleep 1; }
stop_competitor() { [ -n "$competitor_pid" ] && kill "$competitor_pid" 2>/dev/null; wait "$competitor_pid" 2>/dev/null || true; competitor_pid=""; }
trap stop_competitor EXIT

# settings: genflow's default (CPUs not busy elsewhere, short spin), two threads with the same short spin
# (what the default picks on an idle machine, kept when load arrives later), one thread, two passive
# threads, and two threads with OpenMP's own spin count (300000, what genflow did before)
declare -a NAMES=("default" "threads=2,spin=1000" "threads=1" "threads=2,PASSIVE" "threads=2,spin=300000")
declare -a ENVS=("GENFLOW_DEFAULT=1" "OMP_NUM_THREADS=2" "OMP_NUM_THREADS=1" "OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=0"
                 "OMP_NUM_THREADS=2 GOMP_SPINCOUNT=300000")
echo "# setting load ms/step img/s device"
for i in "${!NAMES[@]}"; do
    echo "${NAMES[$i]} idle $(bench ${ENVS[$i]})"
    start_competitor
    echo "${NAMES[$i]} +1-busy-process $(bench ${ENVS[$i]})"
    stop_competitor
done

if [ "${1:-}" = "--make" ]; then
    start=$(date +%s)
    make train RUN_DIR="runs/measure/$(date +%Y-%m-%d_%H-%M-%S)" | tail -1
    echo "make train: $(( $(date +%s) - start )) s (set-up included when .venv is fresh)"
fi
