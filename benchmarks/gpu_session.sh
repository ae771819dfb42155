#!/usr/bin/env bash
# Every GPU figure in docs/gpu.md comes from one run of this script on the device machine (one H100 or
# H200, 16 cores, no network). It expects, beside the repository (ignored by git, carried):
#   .whl/     wheels of what the machine lacks (flwr and its deps, pydantic, flwr-datasets, constriction ...)
#   .devdata/ Debian's Fashion-MNIST .gz files and feature-nets/ (the FD classifier trained here)
# and writes its results to $OUT (a folder). Each stage has its own time limit and a failing stage
# does not stop the next; the stages that time GPU work run alone on the GPU.
# PRISM_STAGES picks stages (default: "checks bench flower studies"); PRISM_SESSION_SECONDS bounds
# the whole script (the studies get what is left). PRISM_GPU_DRYRUN=1 runs every stage at a tiny size (a check of the script on a CPU machine).
set -u
T_START=$(date +%s)
TOTAL=${PRISM_SESSION_SECONDS:-560}   # the whole script, tar included, ends within this
OUT=${OUT:-/tmp/prism-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH FLWR_DISABLE_UPDATE_CHECK=1 \
       FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
log() { echo "[gpu-session $(date +%T)] $*" | tee -a "$OUT/session.log"; }
stage() { local name=$1 limit=$2; shift 2; log "start $name (limit ${limit}s)";
          timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; log "end $name rc=$?"; }

if [ "${PRISM_GPU_DRYRUN:-0}" = 1 ]; then
    BENCH="--size tiny"; FLOWER="--nodes 2 --ngf 4 --local-steps 2 --rounds 2"; PAPER=tiny; SMALL=tiny; PIP=:; export PATH=$PWD/.venv/bin:$PATH
else
    BENCH=""; FLOWER="--nodes 10 --ngf 64 --local-steps 100 --rounds 3"; PAPER=paper; SMALL=small
fi
[ -d /tmp/site/flwr ] || ${PIP:-python3 -m pip} install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    ; export PYTHONPATH=/tmp/site
[ -d /usr/share/datasets/fashion-mnist ] || { mkdir -p /usr/share/datasets/fashion-mnist && cp .devdata/*.gz /usr/share/datasets/fashion-mnist/; }
# The metric's classifier as trained on the 2-core CPU machine (.devdata/feature-nets), so FD figures
# from the GPU and from the CPU are on the same feature space.
NETS=$HOME/.cache/prism-flwr/data/feature-nets
[ -f "$NETS/fmnist-cnn-seed0.pt" ] || { mkdir -p "$NETS" && cp .devdata/feature-nets/* "$NETS/"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/session.log"
python3 -c "import torch, flwr, pydantic; print('torch', torch.__version__, 'flwr', flwr.__version__)" | tee -a "$OUT/session.log"
want() { [[ " ${PRISM_STAGES:-setup checks bench flower studies} " == *" $1 "* ]]; }
if want checks; then
    stage feature-net 90 python3 -m prism_flwr.cli feature-net fmnist
    stage pytest-cuda 60 python3 -m pytest -q tests/test_cuda.py -p no:cacheprovider
fi
want bench && stage bench-gpu 150 python -m benchmarks.bench_gpu $BENCH
if want flower; then
    stage clientapp-startup 60 python -m benchmarks.clientapp_startup --repeats 2
    stage flower-round 180 python -m benchmarks.flower_round $FLOWER --timeout 150 --keep-logs "$OUT/flower-logs"
    [ -d "$OUT/flower-logs" ] && tar -czf "$OUT/flower-logs.tar.gz" -C "$OUT" flower-logs && rm -rf "$OUT/flower-logs"
    stage tf32-check 60 python -m benchmarks.tf32_check --ngf 64 --steps 200 --seeds 30 --eval-samples 1000
fi
if want studies; then
    # What is left, less a margin for the last rounds, evaluations and the tar, goes to the studies.
    # They share the GPU: paper width (one seed, all rules) and the small setting (3 seeds x 2
    # splits x all rules, 3 workers), each stopping at the budget.
    left=$(( TOTAL - ($(date +%s) - T_START) - 45 ))
    budget=$(python3 -c "print(max(0.5, $left / 60))")
    log "start studies (budget $budget min)"
    for rule in mada mean mada-change adam beta; do
        timeout $((left + 30)) python -m experiments.aggregation_study --size $PAPER --out "$OUT/paper" --rules $rule \
            --seeds 30 --partitionings shards --shard 0/2 --samples \
            --run-deadline-min "$(python3 -c "print($budget - 0.4)")" > "$OUT/paper-$rule.log" 2>&1 &
    done
    for w in 0 1 2; do
        timeout $((left + 30)) python -m experiments.aggregation_study --size $SMALL --out "$OUT/small" --shard $w/3 --partitionings shards \
            --deadline-min "$budget" --run-deadline-min "$budget" > "$OUT/small-$w.log" 2>&1 &
    done
    wait
    log "end studies"
    cat "$OUT"/paper-*.log "$OUT"/small-*.log > "$OUT/study-logs.txt"
    rm -f "$OUT"/paper-*.log "$OUT"/small-*.log
    tar -czf "$OUT/studies.tar.gz" -C "$OUT" paper small && rm -rf "$OUT/paper" "$OUT/small"
fi
log "done"
