"""Where the time of one training step goes, by kernel class.

    python benchmarks/profile_step.py --model SiT-XL/2 --batch 32 --out DIR/profile_step.json   # GPU
    python benchmarks/profile_step.py --smoke --out /tmp/profile.json                        # CPU, tiny

Builds the step as ``benchmarks/throughput.py`` does (``--variant``, default fast), runs
``--warmup`` steps, then profiles one step with ``torch.profiler``. On CUDA every GPU
kernel is put in a class by its name (conv, GEMM, attention, GroupNorm, optimizer/EMA,
elementwise); "idle" is the part of the step's wall time when no kernel ran. On the CPU
(smoke) the same classes are given to the ATen operators' self time, and "idle" is the
step time outside them (Python, autograd bookkeeping).
"""

import argparse
import json
import os
import re
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import throughput  # noqa: E402

# First match wins: a cuDNN convolution is often an "implicit GEMM", an optimizer kernel
# may be a "multi_tensor_apply" of elementwise ops.
CLASSES = (
    ("optimizer/EMA", r"adam|multi_tensor|foreach|lerp|clip_grad|_amp_"),
    ("attention", r"flash|fmha|attention|sdpa|scaled_dot_product|softmax"),
    ("GroupNorm", r"group_?norm|_gn_|rowwisemoments"),
    ("conv", r"conv|dgrad|wgrad|fprop|winograd|implicit_gemm|im2col"),
    ("GEMM", r"gemm|matmul|cutlass|nvjet|cublas|\bmm\b|aten::(mm|addmm|bmm|baddbmm|linear)$|sm\d+_xmma"),
)
ORDER = [name for name, _ in CLASSES] + ["elementwise", "idle"]


def classify(name: str) -> str:
    lowered = name.lower()
    for label, pattern in CLASSES:
        if re.search(pattern, lowered):
            return label
    return "elementwise"


def _union_us(intervals):
    """Total length of the union of [start, end) intervals."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def breakdown(events, wall_us, on_cuda):
    """Per class: time in ms and share of the step; plus the 15 most expensive names."""
    per_class = dict.fromkeys(ORDER, 0.0)
    per_name = {}
    if on_cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        spans = []
        for event in kernels:
            duration = event.time_range.end - event.time_range.start
            per_class[classify(event.name)] += duration
            per_name[event.name] = per_name.get(event.name, 0.0) + duration
            spans.append((event.time_range.start, event.time_range.end))
        busy = _union_us(spans)
    else:
        ops = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::")]
        for event in ops:
            per_class[classify(event.name)] += event.self_cpu_time_total
            per_name[event.name] = per_name.get(event.name, 0.0) + event.self_cpu_time_total
        busy = sum(per_class.values())
    per_class["idle"] = max(wall_us - busy, 0.0)
    total = sum(per_class.values()) or 1.0
    top = sorted(per_name.items(), key=lambda item: -item[1])[:15]
    return ({k: {"ms": v / 1e3, "share": v / total} for k, v in per_class.items()},
            [{"name": name[:160], "ms": us / 1e3, "class": classify(name)} for name, us in top])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SiT-XL/2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variant", default="fast", choices=("reference", "fast"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    parser.add_argument("--out", help="write the breakdown here (JSON)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.warmup < 0:
        print("profile_step.py: --batch >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    on_cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if on_cuda else "cpu")
    if args.smoke:
        args.batch, args.warmup = 2, 1
        if not on_cuda:
            os.environ["REPA_E_FAST_OPS"] = "torch"  # as throughput.py's CPU smoke: no interpreted kernels
    run = throughput.build_repae(args.model, args.batch, device, args.variant, args.smoke)
    for index in range(args.warmup):
        run(index)
    throughput.synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    with torch.profiler.profile(activities=activities) as profiler:
        start = time.perf_counter()
        run(args.warmup)
        throughput.synchronize(device)
        wall_us = (time.perf_counter() - start) * 1e6
    classes, top = breakdown(profiler.events(), wall_us, on_cuda)
    report = {"device": torch.cuda.get_device_name() if on_cuda else "cpu", "model": "tiny" if args.smoke else args.model,
              "batch": args.batch, "variant": args.variant, "step_ms": wall_us / 1e3,
              "timing": "GPU kernels" if on_cuda else "ATen self CPU time", "classes": classes, "top": top,
              "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))}
    print(f"one {args.variant} step, {report['model']}, batch {args.batch}: {report['step_ms']:.1f} ms "
          f"({report['timing']})")
    for name in ORDER:
        print(f"  {name:<14} {classes[name]['ms']:>9.2f} ms {100 * classes[name]['share']:>6.1f}%")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
