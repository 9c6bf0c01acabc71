#!/usr/bin/env bash
# The GPU check, in one go, for a machine with a CUDA GPU and no network (bench/README.md):
#   - pytest -m cuda: the suite's CUDA-only tests;
#   - one Mistral-7B-shaped NF4 layer, L1RA vs peft LoRA: time, memory, dtype casts;
#   - L1RA vs stock peft QLoRA on a model of the Mistral-7B shape (random weights, NF4),
#     sequence 2048, batch 1, budget 512: tokens/s, peak VRAM, one reallocation, and the
#     allocated memory after reallocations that shrink the adapters;
#   - the product's loader and train() on a small saved Llama folder (128256-entry
#     vocabulary): evaluation, checkpoints, resume equal to an uninterrupted run;
#   - out of memory in a training step and in an evaluation: exit 2, one line, checkpoint kept;
#   - host syncs per optimiser step (torch.cuda.set_sync_debug_mode);
#   - peak VRAM at two mistral-7b recipe settings next to l1ra_lite.estimate's figure;
#   - only on a machine with more than one GPU: data-parallel training on all of them
#     (torchrun) against one GPU with the same global batch, bench/multi_gpu.py, to
#     $OUT/multi_gpu.json (GPU_MULTI_S seconds of the budget, default 120).
# Figures go to $OUT/gpu_results.json when $OUT is set, else bench/gpu_results.json,
# rewritten after every part. The whole script ends within 5 minutes (wheel install
# included; GPU_BENCH_TOTAL_S, default 290 s); each measurement runs in its own process.
#
#   bench/gpu.sh                            # from anywhere; extra arguments go to bench/gpu_bench.py
#   bench/gpu.sh --parts layer,oom_step     # only some parts (e.g. to rerun what failed)
#   bench/gpu.sh --tiny --device cpu        # the same code paths on tiny shapes, no GPU needed
#
# Wheels: for every wheel in .whl/ at the repository root whose package does not import,
# it installs that wheel into /tmp/site (no network). bitsandbytes must come this way on
# the GPU machine; pytest too if the machine lacks it (pytest, pluggy, iniconfig). Fetch
# them beforehand on a machine with a network:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl pytest pluggy iniconfig
# .whl/ is git-ignored: the device tool copies it only when told to (carry: [".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

TOTAL=${GPU_BENCH_TOTAL_S:-290}
for arg in "$@"; do
    if [ "$arg" = "--tiny" ]; then TOTAL=${GPU_BENCH_TOTAL_S:-1200}; fi  # slow shared CPUs
done

# Whether a package is there, without importing it (bitsandbytes takes seconds to import).
present() { "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
# A wheel's import name is its distribution name, lower case (true for these).
shopt -s nullglob
wanted=()
for wheel in .whl/*.whl; do
    name=$(basename "$wheel"); name=${name%%-*}; name=${name,,}
    if ! present "$name"; then wanted+=("$wheel"); fi
done
if [ ${#wanted[@]} -gt 0 ]; then
    echo "gpu.sh: installing ${wanted[*]} into /tmp/site" >&2
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "${wanted[@]}"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! present bitsandbytes; then
    echo "gpu.sh: bitsandbytes is not installed and no wheel of it is in .whl/ (see the top of this file)" >&2
    exit 2
fi
# l1ra_lite from this checkout, installed or not; nothing looks for a network.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

# What is left of the budget goes to the Python side, which keeps its own deadline (a
# part that would not fit is recorded as not run) and writes after every part; the
# timeout is the backstop. A --deadline given by the caller comes later and wins.
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
multi=0
if [ "${gpus:-0}" -gt 1 ]; then multi=${GPU_MULTI_S:-120}; fi
left=$((TOTAL - SECONDS - multi))
if [ "$left" -lt 30 ]; then
    echo "gpu.sh: only ${left} s left of ${TOTAL} s after the install; nothing measured" >&2
    exit 2
fi
if [ "$multi" -eq 0 ]; then
    exec timeout --kill-after=5 "$left" "$PYTHON" bench/gpu_bench.py --deadline $((left - 10)) "$@"
fi
status=0
timeout --kill-after=5 "$left" "$PYTHON" bench/gpu_bench.py --deadline $((left - 10)) "$@" || status=$?
echo "gpu.sh: data-parallel training on $gpus GPUs against one (bench/multi_gpu.py)" >&2
timeout --kill-after=5 "$multi" "$PYTHON" bench/multi_gpu.py --processes "$gpus" \
    --timeout $(((multi - 20) / 2)) || status=$?
exit $status
