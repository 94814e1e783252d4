#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md, in stages that each fit in about ten minutes on
# one H100, so a rented or lent machine is used in a few long calls:
#
#   bash benchmarks/run_gpu_suite.sh check     # CUDA op tests + fused models vs reference (~3 min)
#   bash benchmarks/run_gpu_suite.sh kernels   # bench_ops: every op and GroupNorm shape (~6 min)
#   bash benchmarks/run_gpu_suite.sh small     # attention + SiT-B/2 steps, all four variants (~8 min)
#   bash benchmarks/run_gpu_suite.sh xl        # SiT-XL/2 steps at batch 32 (~10 min)
#
# Results go to $OUT when it is set (the lent machine's return folder), else to
# benchmarks/results. Works from a plain checkout: a checkout has kernels/ at the top,
# which the installed package maps to repa_e_fast.kernels, so without an install the
# script links it there.
set -euo pipefail
cd "$(dirname "$0")/.."
results="${OUT:-benchmarks/results}"
mkdir -p "$results"
export PYTHONUNBUFFERED=1
if ! python -c "import repa_e_fast.kernels" 2>/dev/null; then
    [ -e repa_e_fast/kernels ] || ln -s ../kernels repa_e_fast/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export REPA_E_FAST_NO_NATIVE=1  # the C++ record reader is not built here; nothing below reads records
fi
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"

case "${1:-}" in
check)
    python -m pytest -q -p no:cacheprovider tests/test_ops_adaln.py tests/test_ops_repa_loss.py \
        tests/test_ops_group_norm.py tests/test_fused_models.py 2>&1 | tee "$results/gpu_tests.txt"
    python benchmarks/check_models_gpu.py --out "$results/check_models.json"
    ;;
kernels)
    python benchmarks/bench_ops.py --gn-act silu --out-dir "$results"
    ;;
small)
    python benchmarks/throughput.py --sections attention,steps --models SiT-B/2 --batch 32 \
        --warmup 2 --iters 6 --tag b2_b32 --out-dir "$results"
    ;;
xl)
    # The reference runs out of memory at batch 32 under bf16 autocast (78.8 GiB in use on
    # an H100 80GB): it is measured at 16 in the same call for the per-image comparison.
    python benchmarks/throughput.py --sections steps --steps repae --models SiT-XL/2 --batch 32 \
        --variants fast,fast_compile --warmup 2 --iters 5 --tag xl2_b32 --out-dir "$results"
    python benchmarks/throughput.py --sections steps --steps repae --models SiT-XL/2 --batch 16 \
        --variants reference,compile,fast --warmup 2 --iters 5 --tag xl2_b16 --out-dir "$results"
    ;;
*)
    echo "usage: $0 check|kernels|small|xl" >&2
    exit 2
    ;;
esac
