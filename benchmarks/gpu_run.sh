#!/usr/bin/env bash
# Every GPU measurement of BENCHMARKS.md in two commands that each fit in 7 minutes of one
# GPU (plus the machine's start-up), in priority order:
#
#   bash benchmarks/gpu_run.sh part1 --out DIR   # (1) correctness of the fused ops and models
#                                                # (2) the official step: compile + fp16, batch 32
#   bash benchmarks/gpu_run.sh part2 --out DIR   # (3) ours at batch 32: fast, fast_compile
#                                                # (4) profile of one fast step by kernel class
#                                                # (5) GroupNorm kernel table; reference at 16 if time is left
#   bash benchmarks/gpu_run.sh --dry-run [--out DIR]   # both parts at smoke size, on the CPU
#
# Every part runs under `timeout`, writes its log and results into DIR as soon as it ends
# (DIR/parts.tsv: part, status, seconds, note), and the summary table comes last. The
# official bench is taken from .official_bench/ in the checkout
# (docs/benchmarks.md#gpu-run-benchmarksgpu_runsh); it needs timm and torchvision, and is
# skipped with the reason when they do not import.
# OFFICIAL_PYTHON picks the interpreter for it (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."

usage() {
    echo "usage: $0 part1|part2 --out DIR | --dry-run [--out DIR]" >&2
    exit 2
}
part="" out="" dry=0
while (($#)); do
    case "$1" in
    part1 | part2) part=$1 ;;
    --dry-run) dry=1 ;;
    --out)
        [ $# -ge 2 ] || usage
        out=$2
        shift
        ;;
    *) usage ;;
    esac
    shift
done
if ((dry)); then
    [ -z "$part" ] || usage
    out=${out:-$(mktemp -d)}
else
    [ -n "$part" ] && [ -n "$out" ] || usage
fi
mkdir -p "$out" || exit 2

export PYTHONUNBUFFERED=1
if ! python -c "import repa_e_fast.kernels" 2>/dev/null; then
    # A plain checkout has kernels/ at the top, which the installed package maps to
    # repa_e_fast.kernels; the C++ record reader is not built there and nothing here reads records.
    [ -e repa_e_fast/kernels ] || ln -s ../kernels repa_e_fast/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export REPA_E_FAST_NO_NATIVE=1
fi
if ((dry)); then
    export TRITON_INTERPRET=1
    unset REPA_E_FAST_OPS
elif ! python -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())"; then
    echo "gpu_run.sh: no CUDA device (use --dry-run on a CPU)" >&2
    exit 2
fi

budget=410 # seconds per part (+10 s kill grace: <= 7 min)
((dry)) && budget=900 # a loaded CI machine: the limits only catch hangs
started=$SECONDS
record() { # part status seconds note
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" | tee -a "$out/parts.tsv"
}
run_part() { # part limit_s command...: runs within what is left of the part's budget
    local name=$1 limit=$2
    shift 2
    local left=$((budget - (SECONDS - started)))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        record "$name" skipped 0 "no time left in this part"
        return
    fi
    echo "== $name (timeout ${limit}s): $*"
    local t0=$SECONDS status
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status="failed($rc)" ;;
    esac
    record "$name" "$status" $((SECONDS - t0)) "log: $name.log"
}

official_python=${OFFICIAL_PYTHON:-python3}
run_official() {
    if [ ! -f .official_bench/official_step_bench.py ]; then
        record official skipped 0 ".official_bench/ missing: cp -r ../shared/official_bench .official_bench"
        return
    fi
    if ! "$official_python" -c "import timm, torchvision" 2>/dev/null; then
        record official skipped 0 "timm/torchvision do not import in $official_python (set OFFICIAL_PYTHON)"
        return
    fi
    local mode=(--breakdown --tag gpu_run)
    ((dry)) && mode=(--cpu-smoke --tag gpu_run_dry)
    run_part official 345 env REPAE_REF=.official_bench/src/repae DINOV2_REF=.official_bench/src/dinov2 \
        "$official_python" .official_bench/official_step_bench.py "${mode[@]}" --out "$out/official_step.jsonl"
}

part1() {
    if ((dry)); then
        record ops_tests skipped 0 "the op tests run in CI on the CPU"
        run_part check_models 300 python benchmarks/check_models_gpu.py --smoke --out "$out/check_models.json"
    else
        run_part ops_tests 35 python -m pytest -q -x -p no:cacheprovider tests/test_ops_adaln.py \
            tests/test_ops_repa_loss.py tests/test_ops_group_norm.py tests/test_fused_models.py
        run_part check_models 30 python benchmarks/check_models_gpu.py --out "$out/check_models.json"
    fi
    run_official
}

part2() {
    local size=(--models SiT-XL/2 --batch 32 --warmup 2 --iters 5)
    # smoke: dynamo's capture without AOT autograd's tracing (the throughput smoke test runs aot_eager)
    ((dry)) && size=(--smoke --torch-compile-backend eager)
    local anchor=()
    # --official-result puts speedup_vs_official in the rows; older throughput.py lack the flag
    if [ -s "$out/official_step.jsonl" ] && python benchmarks/throughput.py --help | grep -q -- --official-result; then
        anchor=(--official-result "$out/official_step.jsonl")
    fi
    local limit=240
    ((dry)) && limit=600
    run_part ours_b32 $limit python benchmarks/throughput.py --sections steps --steps repae "${size[@]}" \
        --variants fast,fast_compile --tag xl2_b32 --out-dir "$out" "${anchor[@]}"
    if ((dry)); then
        run_part profile 300 python benchmarks/profile_step.py --smoke --out "$out/profile_step.json"
        run_part groupnorm 300 python benchmarks/bench_ops.py --smoke --ops groupnorm --gn-act silu --no-compile \
            --gn-batches 1 --out-dir "$out"
        run_part reference_b16 300 python benchmarks/throughput.py --sections steps --steps repae --smoke \
            --variants reference --tag xl2_b16 --out-dir "$out"
    else
        run_part profile 75 python benchmarks/profile_step.py --model SiT-XL/2 --batch 32 --out "$out/profile_step.json"
        run_part groupnorm 90 python benchmarks/bench_ops.py --ops groupnorm --gn-act silu --gn-batches 32 \
            --out-dir "$out"
        run_part reference_b16 240 python benchmarks/throughput.py --sections steps --steps repae --models SiT-XL/2 \
            --batch 16 --warmup 2 --iters 5 --variants reference,fast --tag xl2_b16 --out-dir "$out"
    fi
}

if ((dry)); then
    part1
    started=$SECONDS
    part2
elif [ "$part" = part1 ]; then
    part1
else
    part2
fi

python - "$out" <<'EOF'
import glob, json, os, sys

out = sys.argv[1]
print(f"\n==== summary ({out})")
with open(os.path.join(out, "parts.tsv")) as handle:
    for line in handle:
        name, status, seconds, note = line.rstrip("\n").split("\t")
        print(f"  {name:<14} {status:<12} {seconds:>5} s  {note}")
official = os.path.join(out, "official_step.jsonl")
if os.path.exists(official):
    with open(official) as handle:
        lines = [json.loads(line) for line in handle if line.strip()]
    if lines:
        row = lines[-1]
        keys = ("images_per_s", "images_per_s_wall", "ms_per_step_median", "peak_mem_allocated_gib",
                "skipped_optimizer_steps_timed")
        shown = ", ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}" for k in keys)
        print(f"  official step ({row.get('device')}, batch {row.get('config', {}).get('batch_size')}): {shown}")
for path in sorted(glob.glob(os.path.join(out, "throughput_*.json"))):
    with open(path) as handle:
        rows = json.load(handle)["rows"]
    for r in rows:
        if r.get("section") != "steps":
            continue
        if "error" in r:
            print(f"  ours {r['variant']:<13} batch {r['batch']:>3}: ERROR {r['error']}")
            continue
        extra = "".join(f", {k}={r[k]:.3f}" for k in ("speedup_vs_official", "speedup_vs_reference", "mfu") if r.get(k))
        memory = f", peak {r['peak_memory_gib']:.1f} GiB" if r.get("peak_memory_gib") else ""
        print(f"  ours {r['variant']:<13} batch {r['batch']:>3}: {r['images_per_s']:.1f} img/s{extra}{memory}")
check = os.path.join(out, "check_models.json")
if os.path.exists(check):
    with open(check) as handle:
        results = json.load(handle)["results"]
    worst = max(v for r in results.values() for k, v in r.items() if k.endswith(("rel", "rel_worst")))
    print(f"  fused models vs reference: worst relative error {worst:.2e} ({'ok' if worst <= 1e-4 else 'TOO LARGE'})")
profile = os.path.join(out, "profile_step.json")
if os.path.exists(profile):
    with open(profile) as handle:
        report = json.load(handle)
    shares = ", ".join(f"{k} {100 * v['share']:.0f}%" for k, v in report["classes"].items())
    print(f"  one {report['variant']} step {report['step_ms']:.0f} ms: {shares}")
EOF
if grep -qv $'\tok\t\|\tskipped\t' "$out/parts.tsv"; then
    exit 1
fi
