"""Throughput benchmark: fused kernels, attention backends, whole REPA-E / LDM-only steps.

    python benchmarks/throughput.py                    # every section, paper shapes (GPU)
    python benchmarks/throughput.py --sections steps --models SiT-B/2
    python benchmarks/throughput.py --smoke            # tiny shapes, CPU, < 2 minutes

Every figure of a section is measured in the same run: the reference path (eager PyTorch,
the official recipe's ops), the reference under torch.compile, and our fast path. Results
go to stdout as a table and to ``benchmarks/results/throughput_<device>_<date>.json`` with
the device, date, versions and command.

Whole steps report images/s (median step time over the timed steps), model FLOPs
utilisation (FLOPs of one step counted with torch.utils.flop_counter, divided by the step
time and the bf16 dense peak given by --peak-tflops) and peak memory.
"""

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from repa_e_fast.engine.backends import SingleProcessBackend, build_adamw  # noqa: E402
from repa_e_fast.engine.step import LDMStep, REPAEStep, StepConfig  # noqa: E402
from repa_e_fast.losses.vae_loss import VAERegularizationLoss  # noqa: E402
from repa_e_fast.models.encoders import load_encoders  # noqa: E402
from repa_e_fast.models.sit import build_sit  # noqa: E402
from repa_e_fast.models.vae import AutoencoderKL, build_vae  # noqa: E402

# reference: eager PyTorch with the official recipe's ops; compile: the reference under
# torch.compile; fast: our fused ops, channels_last VAE and loss, fused AdamW;
# fast_compile: the fast path with the models under torch.compile (removes the Python and
# launch overhead that the LDM-only step is bound by).
VARIANTS = ("reference", "compile", "fast", "fast_compile")
COMPILED_VARIANTS = {"compile": "reference", "fast_compile": "fast"}  # -> the eager variant with the same math


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------
# Whole steps
# ----------------------------------------------------------------------------------------
def build_bench_sit(model_name, smoke, fast):
    if smoke:
        sit = build_sit("SiT-S/2", input_size=4, in_channels=4, depth=2, hidden_size=64, num_heads=2,
                        num_classes=10, z_dims=[384], encoder_depth=1, projector_dim=64)
    else:
        sit = build_sit(model_name, input_size=32, in_channels=4, z_dims=[768], encoder_depth=8)
    return sit.set_fused_ops(fast)


def compile_models(backend, models, compile_backend):
    """Swap the backend's models for compiled wrappers; the optimizers keep the originals."""
    backend.models = {name: torch.compile(model, backend=compile_backend) for name, model in models.items()}
    backend.unwrap = lambda name: models[name]


def build_repae(model_name, batch, device, variant, smoke, compile_backend="inductor"):
    """SiT + f8d4 VAE + loss module + DINOv2 targets with random weights (timing only)."""
    torch.manual_seed(0)
    fast = variant in ("fast", "fast_compile")
    sit = build_bench_sit(model_name, smoke, fast)
    if smoke:
        vae = AutoencoderKL(embed_dim=4, ch_mult=(1, 2, 4, 4), ch=32, num_res_blocks=1)
        resolution = 32
    else:
        vae = build_vae("f8d4")
        resolution = 256
    vae.set_fused_ops(fast)
    loss_fn = VAERegularizationLoss()
    sit, vae, loss_fn = sit.to(device), vae.to(device), loss_fn.to(device)
    if fast and device.type == "cuda":
        # The VAE's convolutions and the LPIPS/discriminator convolutions on its output run
        # NHWC in cuDNN; with the loss module NCHW, every conv there would transpose.
        vae = vae.to(memory_format=torch.channels_last)
        loss_fn = loss_fn.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(sit).requires_grad_(False)
    fused_adam = fast and device.type == "cuda"
    optimizers = {"sit": build_adamw(sit, fused=fused_adam), "vae": build_adamw(vae, fused=fused_adam),
                  "disc": build_adamw(loss_fn, fused=fused_adam)}
    models = {"sit": sit, "vae": vae, "disc": loss_fn}
    precision = "bf16" if device.type == "cuda" else "fp32"
    backend = SingleProcessBackend(models, optimizers, precision=precision)
    if variant in COMPILED_VARIANTS:
        compile_models(backend, models, compile_backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoders = [] if smoke else load_encoders("dinov2-vit-b", 256, allow_random=True, device=device,
                                                  pretrained_dir="/nonexistent")
    step = REPAEStep(backend, ema, StepConfig(align_pass_final_layer=not fast), encoders=encoders)
    images = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10 if smoke else 1000, (batch,), device=device)
    tokens = 4 if smoke else 256
    zs = [torch.randn(batch, tokens, 384, device=device)] if smoke else None

    def run(step_index):
        return step(images, labels, step_index, zs=zs)

    return run


def build_ldm(model_name, batch, device, variant, smoke, compile_backend="inductor"):
    torch.manual_seed(0)
    fast = variant in ("fast", "fast_compile")
    sit = build_bench_sit(model_name, smoke, fast).to(device)
    ema = copy.deepcopy(sit).requires_grad_(False)
    optimizers = {"sit": build_adamw(sit, fused=fast and device.type == "cuda")}
    backend = SingleProcessBackend({"sit": sit}, optimizers, precision="bf16" if device.type == "cuda" else "fp32")
    if variant in COMPILED_VARIANTS:
        compile_models(backend, {"sit": sit}, compile_backend)
    step = LDMStep(backend, ema)
    side = 4 if smoke else 32
    moments = torch.cat([torch.randn(batch, 4, side, side, device=device),
                         torch.rand(batch, 4, side, side, device=device) * 0.1], dim=1)
    labels = torch.randint(0, 10 if smoke else 1000, (batch,), device=device)
    tokens = (side // 2) ** 2
    zs = [torch.randn(batch, tokens, 384 if smoke else 768, device=device)]

    def run(step_index):
        return step(moments, labels, zs=zs)

    return run


def count_flops(run, step_index):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run(step_index)
    return counter.get_total_flops()


def measure_step(kind, model_name, batch, device, variant, smoke, warmup, iters, peak_tflops,
                 compile_backend="inductor", flops=None):
    """Time one (step, model, variant); ``flops`` is the count of the same math when known
    (a compiled variant is not counted: the counter would see dynamo's graphs, not the ops)."""
    builder = build_repae if kind == "repae" else build_ldm
    import gc

    gc.collect()  # the previous variant's models must not count towards this one's peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    compiled = variant in COMPILED_VARIANTS
    if compiled:
        # Step 0 and step 1 take different guards (the discriminator factor reads the step),
        # and the loss module runs in two modes: three steps compile every graph.
        warmup = max(warmup, 3)
    started = time.perf_counter()
    run = builder(model_name, batch, device, variant, smoke, compile_backend)
    for index in range(warmup):
        run(index)
    synchronize(device)
    warmup_s = time.perf_counter() - started
    times = []
    for index in range(iters):
        start = time.perf_counter()
        run(warmup + index)
        synchronize(device)
        times.append(time.perf_counter() - start)
    if flops is None and not compiled:
        flops = count_flops(run, warmup + iters)
    seconds = statistics.median(times)
    row = {"section": "steps", "step": kind, "model": "tiny" if smoke else model_name, "variant": variant,
           "batch": batch, "median_s": seconds, "images_per_s": batch / seconds, "iters": iters,
           "warmup_steps": warmup, "warmup_s": warmup_s,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
           "tflop_per_step": flops / 1e12 if flops else None}
    if compiled:
        row["compile_backend"] = compile_backend
    if flops and peak_tflops:
        row["mfu"] = flops / seconds / (peak_tflops * 1e12)
    return row


def add_speedups(rows):
    """Each step row gets its images/s relative to the reference and to reference+compile
    of the same (step, model, batch), measured in the same run."""
    steps = [r for r in rows if r.get("section") == "steps" and "images_per_s" in r]
    for row in steps:
        for base in ("reference", "compile"):
            other = next((r for r in steps if r["variant"] == base and r["step"] == row["step"]
                          and r["model"] == row["model"] and r["batch"] == row["batch"]), None)
            if other is not None and other is not row:
                row[f"speedup_vs_{base}"] = row["images_per_s"] / other["images_per_s"]


def measure_steps(args, device):
    rows = []
    for kind in args.steps.split(","):
        for model_name in args.models.split(","):
            flops = {}  # variant -> FLOPs of one step; a compiled variant reuses its eager twin's
            for variant in args.variants.split(","):
                try:
                    row = measure_step(kind, model_name, args.batch, device, variant, args.smoke, args.warmup,
                                       args.iters, args.peak_tflops if device.type == "cuda" else None,
                                       args.compile_backend, flops.get(COMPILED_VARIANTS.get(variant)))
                    if row["tflop_per_step"]:
                        flops[variant] = row["tflop_per_step"] * 1e12
                except Exception as error:  # noqa: BLE001 - one failing variant must not lose the rest
                    row = {"section": "steps", "step": kind, "model": "tiny" if args.smoke else model_name,
                           "variant": variant, "batch": args.batch,
                           "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"}
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(json.dumps(row), flush=True)
    add_speedups(rows)
    return rows


# ----------------------------------------------------------------------------------------
# Attention backends
# ----------------------------------------------------------------------------------------
def measure_attention(device, smoke, iters):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from repa_e_fast.models.attention import multi_head_attention

    shapes = [(2, 2, 16, 8)] if smoke else [(32, 16, 256, 72), (32, 12, 256, 64)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # Every backend on every device: one that has no kernel for the device/dtype/shape is
    # reported as unavailable. sdpa_default is PyTorch's own choice, what the model runs.
    backends = {"sdpa_default": None, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
                "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa_math": SDPBackend.MATH}
    rows = []
    for batch, heads, tokens, head_dim in shapes:
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        flops = 4 * batch * heads * tokens * tokens * head_dim * 3.5  # fwd (2 matmuls) + bwd (5 matmuls)
        candidates = [(name, (lambda b=b: sdpa_kernel([b])) if b is not None else contextlib.nullcontext)
                      for name, b in backends.items()]
        for package in ("flash_attn", "xformers"):
            try:
                __import__(package)
                candidates.append((package, None))
            except ImportError:
                pass
        for name, context in candidates:
            def once():
                if context is None:
                    out = multi_head_attention(q, k, v, name)
                else:
                    with context():
                        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                out.sum().backward()
            try:
                once()
            except RuntimeError as error:
                rows.append({"section": "attention", "backend": name, "shape": [batch, heads, tokens, head_dim],
                             "error": str(error).splitlines()[0][:120]})
                continue
            synchronize(device)
            times = []
            for _ in range(iters):
                start = time.perf_counter()
                once()
                synchronize(device)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            rows.append({"section": "attention", "backend": name, "shape": [batch, heads, tokens, head_dim],
                         "median_ms": seconds * 1e3, "tflops": flops / seconds / 1e12})
    return rows


# ----------------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="kernels,attention,steps")
    parser.add_argument("--models", default="SiT-B/2,SiT-XL/2")
    parser.add_argument("--steps", default="repae,ldm", help="which whole steps: repae, ldm")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="bf16 dense peak for MFU (H100 measured)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, under two minutes")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compiled variants and baselines (default inductor; "
                             "aot_eager with --smoke: it checks capture and autograd without inductor's minutes "
                             "of C++ code generation on a CPU)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    parser.add_argument("--tag", default="", help="added to the result file names, to keep several runs of a day")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = set(sections) - {"kernels", "attention", "steps"}
    if unknown or set(args.variants.split(",")) - set(VARIANTS) or set(args.steps.split(",")) - {"repae", "ldm"}:
        parser.error(f"sections from kernels,attention,steps; variants from {','.join(VARIANTS)}; steps from repae,ldm")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.smoke else "inductor"
    if args.smoke:
        args.batch, args.warmup, args.iters = 2, 1, 1
        args.models = "tiny"
    rows = []
    if "kernels" in sections:
        import bench_ops

        result = bench_ops.run_benchmarks(smoke=args.smoke, compile_baseline=True,
                                          compile_backend=args.compile_backend, out_dir=None)
        rows.append({"section": "kernels", "results": result})
    if "attention" in sections:
        rows += measure_attention(device, args.smoke, args.iters)
    if "steps" in sections:
        if args.smoke and device.type == "cpu":
            # The interpreted kernels are checked by the kernel section and the tests; whole
            # steps through the interpreter would take minutes, so the CPU smoke run checks
            # the fast path's plumbing with the ops' PyTorch references.
            os.environ["REPA_E_FAST_OPS"] = "torch"
        rows += measure_steps(args, device)
    print_table(rows)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(),
            "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    os.makedirs(args.out_dir, exist_ok=True)
    tag = "smoke" if args.smoke else meta["device"].replace(" ", "_")
    suffix = f"_{args.tag}" if args.tag else ""
    path = os.path.join(args.out_dir, f"throughput_{tag}_{meta['date'][:10]}{suffix}.json")
    with open(path, "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=1, default=str)
    print(f"wrote {path}")
    import chart

    chart_path = chart.draw_throughput_chart(rows, meta, path[: -len(".json")] + ".png")
    print(f"wrote {chart_path}")
    return rows


def _ratio(value):
    return f"{value:.2f}x" if value else "-"


def print_table(rows):
    kernels = next((r["results"] for r in rows if r.get("section") == "kernels"), None)
    if kernels:
        # bench_ops prints its full table while it runs; here one line per case, fwd+bwd.
        timing = "graph_" if any(c.get("ours_graph_ms_fwd_bwd") for c in kernels["cases"]) else ""
        print(f"\nkernels, fwd+bwd ({'GPU time, CUDA graph replay' if timing else 'wall time'}); "
              f"copy bandwidth {kernels['copy_GBps']:.0f} GB/s")
        print(f"{'op':<22} {'case':<34} {'ours ms':>8} {'GB/s':>7} {'%copy':>6} {'x eager':>8} {'x compile':>9}")
        for c in kernels["cases"]:
            ms = c.get(f"ours_{timing}ms_fwd_bwd")
            gbs = c.get(f"ours_{timing}GBps_fwd_bwd")
            pct = c.get(f"ours_{timing}pct_copy_fwd_bwd")
            print(f"{c['op'][:22]:<22} {c['case'][:34]:<34} {ms or 0:>8.3f} {gbs or 0:>7.0f} {pct or 0:>6.1f} "
                  f"{_ratio(c.get(f'{timing}speedup_vs_eager_fwd_bwd')):>8} "
                  f"{_ratio(c.get(f'{timing}speedup_vs_compile_fwd_bwd')):>9}")
    attention = [r for r in rows if r.get("section") == "attention"]
    if attention:
        print(f"\n{'attention':<16} {'shape':<20} {'ms fwd+bwd':>10} {'TFLOP/s':>8}")
        for r in attention:
            shape = "x".join(map(str, r["shape"]))
            if "error" in r:
                print(f"{r['backend']:<16} {shape:<20} unavailable: {r['error']}")
            else:
                print(f"{r['backend']:<16} {shape:<20} {r['median_ms']:>10.3f} {r['tflops']:>8.1f}")
    steps = [r for r in rows if r.get("section") == "steps"]
    if steps:
        print(f"\n{'step':<6} {'model':<9} {'variant':<13} {'img/s':>8} {'ms':>8} {'x ref':>6} {'x comp':>6} "
              f"{'MFU':>6} {'TFLOP':>7} {'peak GiB':>9}")
        for r in steps:
            if "error" in r:
                print(f"{r['step']:<6} {r['model']:<9} {r['variant']:<13} ERROR {r['error']}")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
            tflop = f"{r['tflop_per_step']:.3g}" if r.get("tflop_per_step") else "-"
            memory = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") else "-"
            print(f"{r['step']:<6} {r['model']:<9} {r['variant']:<13} {r['images_per_s']:>8.1f} "
                  f"{1e3 * r['median_s']:>8.1f} {_ratio(r.get('speedup_vs_reference')):>6} "
                  f"{_ratio(r.get('speedup_vs_compile')):>6} {mfu:>6} {tflop:>7} {memory:>9}")


if __name__ == "__main__":
    main()
