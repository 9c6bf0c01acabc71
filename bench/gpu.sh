#!/usr/bin/env bash
# The GPU check, in one go, for a machine with a CUDA GPU and no network:
#   - L1RA vs stock peft QLoRA on a model of the Mistral-7B shape (random weights, NF4),
#     sequence 2048, batch 1, budget 512: tokens/s, peak VRAM, one reallocation;
#   - peak VRAM at two mistral-7b recipe settings next to l1ra_lite.estimate's figure.
# Figures go to $OUT/gpu_results.json when $OUT is set, else bench/gpu_results.json.
# Bounded to under 6 minutes (install included); each measurement runs in its own process.
#
#   bench/gpu.sh                       # from anywhere; extra arguments go to bench/gpu_bench.py
#   bench/gpu.sh --tiny --device cpu   # the same code path on a tiny shape, no GPU needed
#
# Without bitsandbytes, it installs the wheel(s) found in .whl/ at the repository root
# (put them there beforehand: python3 -m pip download --no-deps --only-binary=:all:
#  --python-version 3.12 --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import bitsandbytes" >/dev/null 2>&1; then
    shopt -s nullglob
    wheels=(.whl/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu.sh: bitsandbytes is not installed and no wheel is in .whl/ (see the top of this file)" >&2
        exit 2
    fi
    echo "gpu.sh: installing ${wheels[*]} into /tmp/site" >&2
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${wheels[@]}"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# l1ra_lite from this checkout, installed or not.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
"$PYTHON" -c "import bitsandbytes, peft, transformers, torch; print('gpu.sh: torch', torch.__version__, \
'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__, \
'bitsandbytes', bitsandbytes.__version__)" 2>&1 | grep -v "gemm_4bit" >&2 || true

# The Python side keeps its own deadline (300 s) and writes after every measurement;
# this timeout is the backstop that keeps the whole script under 6 minutes.
exec timeout --kill-after=10 "${GPU_BENCH_TIMEOUT:-320}" "$PYTHON" bench/gpu_bench.py "$@"
