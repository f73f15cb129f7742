#!/usr/bin/env bash
# The GPU host's checks, in one run (see README, "On a GPU"): the CUDA tests, the staging benchmark
# and the producer scaling table. Made for the workplace's device machine, which has a CUDA build of
# torch and most dependencies but no package registry, so what it lacks travels with the checkout:
#
#   .whl/     a cp312 manylinux wheel of posix_ipc (pip download, see the device tool's README)
#   .assets/  the kjv and bert-wordpiece asset folders (python scripts/fetch_assets.py kjv bert-wordpiece,
#             then copy them from ~/.cache/ringload/assets)
#
# Every step runs under its own time limit and the script goes on after a failure, so one run
# reports everything; results go to $OUT (default /tmp/gpu-check): log.txt, gpu.json, scaling.json.
# Run from the repository root:  bash scripts/gpu_check.sh
set -u -o pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RINGLOAD_ASSETS=$PWD/.assets
SCALING_P=${SCALING_P:-1,2,4,8,14}
SCALING_MB=${SCALING_MB:-300}
SCALING_SECONDS=${SCALING_SECONDS:-5}

step() {  # step NAME SECONDS COMMAND...: run COMMAND under a limit, log its outcome
    local name=$1 limit=$2 started=$SECONDS rc
    shift 2
    echo "=== $name: $*"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - started)) s"
}

{
    echo "=== machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    echo "cpus $(nproc); $(python3 -V); locked-memory limit $(ulimit -l); /dev/shm: $(df -h /dev/shm | tail -1)"
    if ! python3 -c "import posix_ipc" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
            || echo "posix_ipc wheel did not install"
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    python3 -c "import torch, tokenizers, posix_ipc, ringload; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU', '| tokenizers', \
tokenizers.__version__)"
    step cuda-tests 150 python3 -m pytest tests/test_cuda.py -v -p no:cacheprovider --timeout 60
    step bench-gpu 150 python3 scripts/bench_gpu.py --json "$OUT/gpu.json"
    step scaling 300 python3 scripts/bench.py --producers "$SCALING_P" --mb "$SCALING_MB" \
        --seconds "$SCALING_SECONDS" --skip hf,handmade --json "$OUT/scaling.json"
    ls /dev/shm
} 2>&1 | tee "$OUT/log.txt"
