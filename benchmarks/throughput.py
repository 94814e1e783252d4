"""Throughput benchmark: fused kernels, attention backends, whole REPA-E / LDM-only steps.

    python benchmarks/throughput.py                    # every section, paper shapes (GPU)
    python benchmarks/throughput.py --sections steps --models SiT-B/2
    python benchmarks/throughput.py --smoke            # tiny shapes, CPU, < 2 minutes

Every figure of a section is measured in the same run: the reference path (eager PyTorch,
the official recipe's ops), the reference under torch.compile, and our fast path. Results
go to stdout as a table and to ``benchmarks/results/throughput_<device>_<date>.json`` with
the device, date, versions and command.

Whole steps report images/s (median step time over the timed steps), model FLOPs
utilisation and peak memory. MFU uses ONE fixed FLOP count per image for every variant
(and for the official step): the reference path's, so a variant that removes FLOPs is not
penalised (``reference_flops_per_image``). It is divided by the step time and by the bf16
dense rate given by --peak-tflops (790 TFLOP/s, measured on these H100s).

    python benchmarks/throughput.py --sections steps --models SiT-XL/2 --steps repae \
        --official-result RESULTS/official_step.jsonl   # + speedup_vs_official per row
    python benchmarks/throughput.py --smoke --count-syncs  # host syncs per step, per variant
    python benchmarks/throughput.py --count-flops --models SiT-XL/2 --steps repae  # the FLOP count

The whole-step benchmark runs at batch 32 per GPU by default: the official per-GPU batch
(the discriminator's and the latent BatchNorm's batch statistics depend on it).
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
import unittest.mock
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from repa_e_fast.engine.build import make_backend  # noqa: E402
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

PEAK_TFLOPS = 790.0  # bf16 dense matmul rate measured on the H100s the results come from
# FLOPs of one training step per image (forward and backward of every model: DINOv2 targets,
# VAE, LPIPS, discriminator, the SiT's align and training passes), counted on the REFERENCE
# path with torch.utils.flop_counter (matmuls, convolutions, attention), for every variant.
# For SiT-XL/2 + f8d4 at 256 px (the official setup) the count is fixed here:
#     python benchmarks/throughput.py --count-flops --steps repae --models SiT-XL/2
# counts it again on the meta device (no memory, about a minute on a CPU): 3.771e12 per image
# (attention counted as the math path's matmuls); the H100 run of 2026-11-22 counted 60.43
# TFLOP per batch-16 step on CUDA, 3.777e12 per image (the flash-attention formulas). Both
# round to the fixed 3.77e12.
# Other setups (SiT-B/2, LDM-only, the smoke models) are counted the same way, once per run.
FIXED_FLOPS_PER_IMAGE = {("repae", "SiT-XL/2"): 3.77e12}
# The official bench's setups (official_step_bench.py --setup) as our (step, model).
OFFICIAL_SETUPS = {"A": ("repae", "SiT-XL/2"), "smoke": ("repae", "tiny")}


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


def compile_models(modules, torch_compile_backend):
    """Compile every module that runs in each step IN PLACE (``Module.compile``), as train.py
    does: the SiT's align pass, which the step calls through ``functional_call`` on the
    unwrapped module, and the DINOv2 target encoders then run compiled too."""
    for module in modules:
        module.compile(backend=torch_compile_backend)


def build_repae(model_name, batch, device, variant, smoke, torch_compile_backend="inductor"):
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
    loss_fn = VAERegularizationLoss().set_fused_ops(fast)  # fast: the one-batch fp32 LPIPS (lever 6)
    sit, vae, loss_fn = sit.to(device), vae.to(device), loss_fn.to(device)
    if fast and device.type == "cuda":
        # The VAE's convolutions and the LPIPS/discriminator convolutions on its output run
        # NHWC in cuDNN; with the loss module NCHW, every conv there would transpose.
        vae = vae.to(memory_format=torch.channels_last)
        loss_fn = loss_fn.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(sit).requires_grad_(False)
    models = {"sit": sit, "vae": vae, "vae_loss": loss_fn}
    backend = make_backend("single", models, {name: {} for name in models},
                           precision="bf16" if device.type == "cuda" else "fp32",
                           fused_adam=fast and device.type == "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoders = [] if smoke else load_encoders("dinov2-vit-b", 256, allow_random=True, device=device,
                                                  pretrained_dir="/nonexistent")
    if variant in COMPILED_VARIANTS:
        compile_models(list(models.values()) + encoders, torch_compile_backend)
    step = REPAEStep(backend, ema, StepConfig(align_pass_final_layer=not fast), encoders=encoders)
    images = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10 if smoke else 1000, (batch,), device=device)
    tokens = 4 if smoke else 256
    zs = [torch.randn(batch, tokens, 384, device=device)] if smoke else None

    def run(step_index):
        return step(images, labels, step_index, zs=zs)

    run.backend = backend
    return run


def build_ldm(model_name, batch, device, variant, smoke, torch_compile_backend="inductor"):
    torch.manual_seed(0)
    fast = variant in ("fast", "fast_compile")
    sit = build_bench_sit(model_name, smoke, fast).to(device)
    ema = copy.deepcopy(sit).requires_grad_(False)
    backend = make_backend("single", {"sit": sit}, {"sit": {}}, precision="bf16" if device.type == "cuda" else "fp32",
                           fused_adam=fast and device.type == "cuda")
    if variant in COMPILED_VARIANTS:
        compile_models([sit], torch_compile_backend)
    step = LDMStep(backend, ema)
    side = 4 if smoke else 32
    moments = torch.cat([torch.randn(batch, 4, side, side, device=device),
                         torch.rand(batch, 4, side, side, device=device) * 0.1], dim=1)
    labels = torch.randint(0, 10 if smoke else 1000, (batch,), device=device)
    tokens = (side // 2) ** 2
    zs = [torch.randn(batch, tokens, 384 if smoke else 768, device=device)]

    def run(step_index):
        return step(moments, labels, zs=zs)

    run.backend = backend
    return run


def count_flops(run, step_index):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run(step_index)
    return counter.get_total_flops()


_COUNTED_FLOPS = {}


def reference_flops_per_image(kind, model_name, smoke, batch=2):
    """The FLOPs per image that every variant of (step, model) is scored with: the fixed
    count for the official setup, else the reference path's count on the meta device (no
    memory, no arithmetic: FlopCounterMode reads the shapes), once per run."""
    model = "tiny" if smoke else model_name
    if (kind, model) in FIXED_FLOPS_PER_IMAGE:
        return FIXED_FLOPS_PER_IMAGE[(kind, model)]
    if (kind, model) not in _COUNTED_FLOPS:
        _COUNTED_FLOPS[(kind, model)] = count_reference_flops(kind, model_name, smoke, batch) / batch
    return _COUNTED_FLOPS[(kind, model)]


def count_reference_flops(kind, model_name, smoke, batch):
    """FLOPs of one reference step of ``batch`` images, counted on the meta device (shapes
    only: no memory, no arithmetic). The optimizers do not step (their elementwise updates
    are no matmul/conv/attention FLOPs, and a meta step counter has no value to read)."""
    builder = build_repae if kind == "repae" else build_ldm
    real_autocast = torch.autocast

    def autocast(device_type, *args, **kwargs):  # autocast knows no meta device; fp32 needs none
        return contextlib.nullcontext() if device_type == "meta" else real_autocast(device_type, *args, **kwargs)

    meta = torch.device("meta")
    with torch.device(meta), warnings.catch_warnings(), unittest.mock.patch.object(torch, "autocast", autocast):
        warnings.simplefilter("ignore")
        run = builder(model_name, batch, meta, "reference", smoke)
        for optimizer in run.backend.optimizers.values():
            optimizer.step = lambda *args, **kwargs: None
        return count_flops(run, 0)


def measure_step(kind, model_name, batch, device, variant, smoke, warmup, iters, peak_tflops,
                 torch_compile_backend="inductor", flops_per_image=None, count_syncs=False):
    """Time one (step, model, variant). ``flops_per_image`` is the fixed count every variant
    of (step, model) is scored with (``reference_flops_per_image``)."""
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
    run = builder(model_name, batch, device, variant, smoke, torch_compile_backend)
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
    seconds = statistics.median(times)
    flops = flops_per_image * batch if flops_per_image else None
    row = {"section": "steps", "step": kind, "model": "tiny" if smoke else model_name, "variant": variant,
           "batch": batch, "median_s": seconds, "images_per_s": batch / seconds, "iters": iters,
           "warmup_steps": warmup, "warmup_s": warmup_s,
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
           "tflop_per_step": flops / 1e12 if flops else None,
           "flops_per_image_source": "FIXED_FLOPS_PER_IMAGE (reference path)"
           if (kind, "tiny" if smoke else model_name) in FIXED_FLOPS_PER_IMAGE
           else "reference path, counted on the meta device in this run"}
    if compiled:
        row["torch_compile_backend"] = torch_compile_backend
    if flops and peak_tflops:
        row["mfu"] = flops / seconds / (peak_tflops * 1e12)
    if count_syncs:
        from repa_e_fast.engine.host_sync import HostSyncCounter

        with HostSyncCounter(device, optimizers=run.backend.optimizers.values()) as syncs:
            run(warmup + iters)
        row["host_syncs_per_step"] = syncs.count
        row["host_sync_events"] = dict(syncs.events)
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
            try:
                flops_per_image = reference_flops_per_image(kind, model_name, args.smoke)
            except Exception as error:  # noqa: BLE001 - MFU is then left out, the timing still runs
                print(f"FLOP count of the {kind} reference step failed ({type(error).__name__}: {error}); "
                      "no MFU for it", flush=True)
                flops_per_image = None
            for variant in args.variants.split(","):
                try:
                    row = measure_step(kind, model_name, args.batch, device, variant, args.smoke, args.warmup,
                                       args.iters, args.peak_tflops if device.type == "cuda" else None,
                                       args.torch_compile_backend, flops_per_image, args.count_syncs)
                    if args.count_syncs:
                        print(f"host syncs per step: {kind}/{variant} {row['host_syncs_per_step']}", flush=True)
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
# The official step (/work/shared/official_bench/official_step_bench.py --out FILE)
# ----------------------------------------------------------------------------------------
def load_official_result(path, args, device_name):
    """The official bench's JSON line that matches this run (setup, batch, device); the
    last one when the file holds several. Raises ValueError with the reason otherwise."""
    if not os.path.isfile(path):
        raise ValueError(f"--official-result {path}: no such file")
    lines = []
    with open(path) as handle:
        for number, text in enumerate(handle, 1):
            if text.strip():
                try:
                    lines.append(json.loads(text))
                except json.JSONDecodeError as error:
                    raise ValueError(f"--official-result {path}:{number}: not JSON ({error})") from None
    found, match = [], None
    for line in lines:
        config = line.get("config", {})
        setup, batch = config.get("setup", line.get("setup")), config.get("batch_size", line.get("batch_size"))
        found.append(f"setup {setup} batch {batch} on {line.get('device')}"
                     + (f" (error: {line['error']})" if "error" in line else ""))
        if line.get("bench") != "official_repae_step" or "error" in line or "images_per_s" not in line:
            continue
        if setup not in OFFICIAL_SETUPS or batch != args.batch or line.get("device") != device_name:
            continue
        kind, model = OFFICIAL_SETUPS[setup]
        if kind in args.steps.split(",") and (model in args.models.split(",") or (args.smoke and model == "tiny")):
            match = line
    wanted = "smoke" if args.smoke else "A (repae, SiT-XL/2)"
    if match is None:
        raise ValueError(f"--official-result {path}: no official step result for setup {wanted}, batch {args.batch} "
                         f"on {device_name} (this run's setup); the file has: {'; '.join(found) or 'nothing'}")
    return match


def official_row(line, path, peak_tflops):
    config = line["config"]
    kind, model = OFFICIAL_SETUPS[config["setup"]]
    row = {"section": "steps", "step": kind, "model": model, "variant": "official", "batch": config["batch_size"],
           "median_s": line["ms_per_step_median"] / 1e3, "images_per_s": line["images_per_s"],
           "peak_memory_gib": line.get("peak_mem_allocated_gib"), "source": path, "device": line["device"],
           "precision": config.get("precision"), "compile": config.get("compile"),
           "skipped_optimizer_steps_timed": line.get("skipped_optimizer_steps_timed")}
    try:
        flops_per_image = reference_flops_per_image(kind, model, model == "tiny")
    except Exception:  # noqa: BLE001 - MFU is optional
        flops_per_image = None
    if flops_per_image:
        row["tflop_per_step"] = flops_per_image * row["batch"] / 1e12
        if peak_tflops:
            row["mfu"] = flops_per_image * row["images_per_s"] / (peak_tflops * 1e12)
    return row


def add_official_speedups(rows, official):
    """Each of our rows of the official setup (same step, model, batch) gets its images/s
    over the official step's, measured on the same device."""
    for row in rows:
        same_setup = all(row.get(key) == official[key] for key in ("step", "model", "batch"))
        if row.get("section") == "steps" and "images_per_s" in row and row["variant"] != "official" and same_setup:
            row["speedup_vs_official"] = row["images_per_s"] / official["images_per_s"]


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
    parser.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS,
                        help="bf16 dense rate for MFU (790: measured on the H100s)")
    parser.add_argument("--official-result", default=None, metavar="PATH",
                        help="JSONL of official_step_bench.py --out: adds the official step to the table and "
                             "speedup_vs_official to our rows of the same setup and batch")
    parser.add_argument("--count-syncs", action="store_true",
                        help="count the host synchronisations of one step of each variant (prints "
                             "'host syncs per step: <step>/<variant> <N>')")
    parser.add_argument("--count-flops", action="store_true",
                        help="count the reference step's FLOPs per image on the meta device, print, exit")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, under two minutes")
    parser.add_argument("--torch-compile-backend", default=None,
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
    if args.torch_compile_backend is None:
        args.torch_compile_backend = "aot_eager" if args.smoke else "inductor"
    if args.smoke:
        args.batch, args.warmup, args.iters = 2, 1, 1
        args.models = "tiny"
    if args.count_flops:
        for kind in args.steps.split(","):
            for model_name in args.models.split(","):
                counted = count_reference_flops(kind, model_name, args.smoke, args.batch) / args.batch
                fixed = FIXED_FLOPS_PER_IMAGE.get((kind, "tiny" if args.smoke else model_name))
                print(f"{kind} {model_name}: {counted:.4g} FLOP per image (reference path, batch {args.batch})"
                      + (f"; FIXED_FLOPS_PER_IMAGE {fixed:.4g}" if fixed else ""))
        return []
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    official = None
    if args.official_result:
        if "steps" not in sections:
            parser.error("--official-result needs the steps section")
        try:  # checked before anything is built or timed
            official = load_official_result(args.official_result, args, device_name)
        except ValueError as error:
            parser.error(str(error))
    if device.type == "cuda":
        # The VAE's, LPIPS's and the discriminator's convolutions run at fixed shapes: let
        # cuDNN time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True
    rows = []
    if "kernels" in sections:
        import bench_ops

        result = bench_ops.run_benchmarks(smoke=args.smoke, compile_baseline=True,
                                          torch_compile_backend=args.torch_compile_backend, out_dir=None)
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
        if official is not None:
            official = official_row(official, args.official_result,
                                    args.peak_tflops if device.type == "cuda" else None)
            rows.append(official)
            add_official_speedups(rows, official)
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
              f"{'x off':>6} {'MFU':>6} {'TFLOP':>7} {'peak GiB':>9}")
        for r in steps:
            if "error" in r:
                print(f"{r['step']:<6} {r['model']:<9} {r['variant']:<13} ERROR {r['error']}")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
            tflop = f"{r['tflop_per_step']:.3g}" if r.get("tflop_per_step") else "-"
            memory = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") else "-"
            print(f"{r['step']:<6} {r['model']:<9} {r['variant']:<13} {r['images_per_s']:>8.1f} "
                  f"{1e3 * r['median_s']:>8.1f} {_ratio(r.get('speedup_vs_reference')):>6} "
                  f"{_ratio(r.get('speedup_vs_compile')):>6} {_ratio(r.get('speedup_vs_official')):>6} "
                  f"{mfu:>6} {tflop:>7} {memory:>9}")


if __name__ == "__main__":
    main()
