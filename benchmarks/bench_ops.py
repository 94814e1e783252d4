"""Benchmark the fused ops against PyTorch eager, torch.compile and third-party kernels.

    python benchmarks/bench_ops.py                   # paper shapes on the GPU
    python benchmarks/bench_ops.py --smoke           # tiny shapes, CPU interpreter, < 60 s
    python benchmarks/bench_ops.py --ops groupnorm --no-compile --gn-batches 32

Shapes: SiT-XL/2 (B=32, T=256, D=1152) for the adaLN / gated-residual ops, B x 256 x 768
for the REPA loss, and every distinct GroupNorm input shape of the f8d4 and f16d32 VAEs at
256 px (recorded from the models themselves, ``vae_gn_shapes``) at each ``--gn-batches``
batch size, NCHW and channels_last.

For every case: a correctness check of our op against the float64 reference at the
benchmark shape (fp32 inputs; max abs error of the output and of every gradient), then
median times (``triton.testing.do_bench``; on CUDA also CUDA-graph replay) of the forward
and of forward+backward for ours / eager / ``torch.compile(eager)`` / third-party kernels.
Bandwidth is reported against the *minimal* bytes each op must move (count of full-tensor
reads and writes, listed per case) and as a % of the device-to-device copy bandwidth
measured in the same run. A case that would not fit in GPU memory is skipped with a reason.

Third-party baselines (only on CUDA unless ``--third-party on``; each only when installed):
  * Liger-Kernel: ``LigerGroupNormFunction`` (NCHW cases; + ``F.silu``) and
    ``LigerLayerNormFunction`` with unit weight / zero bias + the adaLN modulation in PyTorch
    (adaLN cases). Liger has no gated residual or REPA-loss kernel.
  * apex: ``apex.contrib.group_norm.GroupNorm`` (channels_last cases only: it is an NHWC
    kernel, with the SiLU fused via ``act="silu"``; on NCHW it falls back to PyTorch).
  * xformers: has no kernel for any of these ops (its fused ops are attention, SwiGLU,
    RMSNorm...), so it is only reported as found / not found.

``run_benchmarks(...)`` is the entry point for other scripts (benchmarks/throughput.py).
"""

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time

# Runnable from a checkout without installing: put the repository root on the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

ALL_OPS = ("adaln", "gated", "fused", "repa", "groupnorm")
# Reported as found / not found. xformers is only reported: it has no LayerNorm, GroupNorm or
# cosine-loss kernel (its fused ops are attention, SwiGLU, RMSNorm, RoPE).
THIRD_PARTY = ("liger_kernel", "apex", "xformers")
GN_BATCHES = (8, 32)
SMOKE_GN_BATCHES = (1,)
# (C, H=W): one tiny shape with an odd spatial size. An NCHW case runs one interpreted
# program per group (32), so each smoke case costs seconds on a CPU.
SMOKE_GN_SHAPES = [(32, 5)]

# Rough peak-memory estimates (bytes per element of the case's main tensor, times the number
# of full-tensor passes) used to skip cases that cannot fit: the check holds fp32 + fp64
# copies of inputs, outputs and gradients; the timing holds bf16/fp32 tensors plus eager's
# intermediates. Headroom x1.5 / x2.
_CHECK_BYTES_PER_PASS = (4 + 8) * 1.5
_TIME_FACTOR = 2.0


def vae_gn_shapes(resolution=256, layouts=("f8d4", "f16d32")):
    """Distinct GroupNorm input shapes of the VAEs at ``resolution`` px, from the models.

    Each VAE is built on the meta device (no memory, no compute) and run once with forward
    pre-hooks on every ``nn.GroupNorm``; a norm's input is what the kernel sees (the first
    norm of a channel-changing ResBlock sees the block's *input* channels). Returns
    ``{(C, H): {layout: number of GroupNorm calls per forward}}`` in first-seen order
    (H = W). The batch size does not matter here: the benchmark sets it.
    """
    import torch

    from repa_e_fast.models.vae import build_vae

    shapes = {}
    for layout in layouts:
        with torch.device("meta"):
            vae = build_vae(layout)

        def record(module, args, layout=layout):
            _, C, H, W = args[0].shape
            assert H == W, (layout, tuple(args[0].shape))
            uses = shapes.setdefault((C, H), {})
            uses[layout] = uses.get(layout, 0) + 1

        hooks = [m.register_forward_pre_hook(record) for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]
        with torch.no_grad():
            vae(torch.empty(1, 3, resolution, resolution, device="meta"))
        for h in hooks:
            h.remove()
    return shapes


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU under the Triton interpreter")
    p.add_argument("--ops", default=",".join(ALL_OPS), help=f"comma list of {ALL_OPS}")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--torch-compile-backend", default=None,
                   help="torch.compile backend of the compile baseline (default inductor; aot_eager with "
                        "--smoke: it checks capture and autograd, while inductor's C++ code generation "
                        "adds ~40 s to the CPU smoke run with a cold cache)")
    p.add_argument("--gn-act", default="silu,none", help="GroupNorm activations to run: silu,none")
    p.add_argument("--gn-batches", default=None,
                   help=f"comma list of GroupNorm batch sizes (default {','.join(map(str, GN_BATCHES))}; "
                        f"{','.join(map(str, SMOKE_GN_BATCHES))} with --smoke)")
    p.add_argument("--third-party", default="auto", choices=("auto", "on", "off"),
                   help="Liger-Kernel / apex baselines when installed: auto = only on CUDA (their kernels "
                        "do not run under the Triton interpreter), on = also on CPU, off = never")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, profile ours fwd+bwd once per op (CPU launch cost vs GPU kernels)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p.parse_args(argv)


def run_benchmarks(ops=ALL_OPS, smoke=False, compile_baseline=True, gn_acts=("silu", "none"), out_dir=None,
                   command=None, log=print, torch_compile_backend=None, gn_batches=None, third_party="auto"):
    """Run the benchmark; returns the result dict (also written as JSON when out_dir is given).

    torch_compile_backend: backend of the ``torch.compile`` baseline; None = inductor, or aot_eager
    in smoke runs. gn_batches: GroupNorm batch sizes (None = 8,32, or 1 in smoke runs).
    third_party: "auto" (Liger-Kernel / apex baselines on CUDA only), "on" or "off".
    """
    if smoke and not _cuda_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    from repa_e_fast import ops as fused_ops

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not smoke:
        raise SystemExit("bench_ops: no CUDA device; use --smoke for the CPU interpreter run")
    if torch_compile_backend is None:
        torch_compile_backend = "aot_eager" if smoke else "inductor"
    if gn_batches is None:
        gn_batches = SMOKE_GN_BATCHES if smoke else GN_BATCHES
    gn_batches = tuple(int(n) for n in gn_batches)
    timer = _Timer(dev)
    results = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "torch": torch.__version__, "triton": _triton_version(), "python": platform.python_version(),
               "command": command or " ".join([os.path.basename(sys.executable)] + sys.argv),
               "smoke": smoke, "torch_compile_backend": torch_compile_backend if compile_baseline else None,
               "gn_batches": list(gn_batches), "cases": []}
    results["third_party"] = _third_party_versions()
    tp, tp_errors = _load_third_party(third_party, dev, results["third_party"])
    results["third_party_baselines"] = sorted(tp)
    if tp_errors:
        results["third_party_errors"] = tp_errors
    copy_gbs = timer.copy_bandwidth(256 * 2**20 if not smoke else 2**20)
    results["copy_GBps"] = copy_gbs
    log(f"device: {results['device']}  torch {results['torch']}  triton {results['triton']}")
    log(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write counted)")
    log("third party: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in results["third_party"].items())
        + f"; baselines run: {', '.join(sorted(tp)) or 'none'}"
        + "".join(f"; {k}: {v}" for k, v in tp_errors.items()))

    path = None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        name = "smoke" if smoke else "".join(c if c.isalnum() else "_" for c in results["device"].lower())
        path = os.path.join(out_dir, f"ops_{name}_{datetime.date.today().strftime('%Y%m%d')}.json")
    for case in _cases(ops, smoke, gn_acts, dev, torch, fused_ops, gn_batches=gn_batches, third_party=tp):
        results["cases"].append(_run_case(case, timer, compile_baseline, copy_gbs, torch, log,
                                          torch_compile_backend=torch_compile_backend))
        if path:  # rewritten after every case, so an interrupted run keeps what it measured
            with open(path, "w") as f:
                json.dump(results, f, indent=1)

    log("")
    log(_table(results))
    if path:
        log(f"wrote {path}")
        results["path"] = path
    return results


PROFILE_GN = ("C512 32x32 nchw", "C256 256x256 nchw", "C256 256x256 nhwc")


def profile_ops(ops=ALL_OPS, gn_acts=("silu",), log=print):
    """Per op (first case, and the smallest/largest GroupNorm): CPU time to issue one
    fwd+bwd, GPU time of it, and the top kernels by device time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from repa_e_fast import ops as fused_ops

    dev = torch.device("cuda")
    seen = set()
    for case in _cases(ops, False, gn_acts, dev, torch, fused_ops, gn_batches=GN_BATCHES[:1]):
        key = case.op if case.op != "group_norm" else case.name
        if key in seen or (case.op == "group_norm" and not any(s in case.name for s in PROFILE_GN)):
            continue
        seen.add(key)
        inputs, grads = case.make_inputs()

        def step():
            out = case.ours(*inputs)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(list(outs), grads if grads[0] is not None else None)
            for t in inputs:
                t.grad = None

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            step()
        cpu_ms = (time.perf_counter() - t0) / 20 * 1e3
        torch.cuda.synchronize()
        gpu_ms = (time.perf_counter() - t0) / 20 * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        ev = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0]
        ev.sort(key=lambda e: -e.device_time_total)
        log(f"profile {case.op} {case.name}: issue {cpu_ms:.3f} ms/iter, issue+sync {gpu_ms:.3f} ms/iter")
        kernels = [e for e in ev if "autograd" not in e.key and not e.key.startswith("_") or "kernel" in e.key]
        log("    GPU ms/iter: " + "; ".join(f"{e.key[:28]} {e.device_time_total / 5 / 1e3:.4f}" for e in kernels[:6]))


def _cuda_available():
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


def _third_party_versions():
    """{package: version, or None when not installed} for Liger-Kernel, apex, xformers."""
    found = {}
    for name in THIRD_PARTY:
        if importlib.util.find_spec(name) is None:
            found[name] = None
            continue
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # importable without metadata (source tree)
            try:
                found[name] = str(getattr(importlib.import_module(name), "__version__", "unknown"))
            except Exception as e:
                found[name] = f"import failed: {type(e).__name__}"
    return found


# The third-party entry points we benchmark against: (package, module, attribute).
_THIRD_PARTY_OPS = {
    "liger_group_norm": ("liger_kernel", "liger_kernel.ops.group_norm", "LigerGroupNormFunction"),
    "liger_layer_norm": ("liger_kernel", "liger_kernel.ops.layer_norm", "LigerLayerNormFunction"),
    "apex_group_norm": ("apex", "apex.contrib.group_norm", "GroupNorm"),
}


def _load_third_party(mode, dev, versions):
    """The installed third-party kernels to run ({key of _THIRD_PARTY_OPS: object}) and the
    import errors of installed packages. "auto" loads them on CUDA only: Liger's kernels do
    not run under the Triton interpreter and apex's are CUDA extensions."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"third_party must be auto, on or off, got {mode!r}")
    if mode == "off" or (mode == "auto" and dev.type != "cuda"):
        return {}, {}
    found, errors = {}, {}
    for key, (package, module, attr) in _THIRD_PARTY_OPS.items():
        if versions.get(package) is None:
            continue
        try:
            found[key] = getattr(importlib.import_module(module), attr)
        except Exception as e:  # e.g. apex built without its contrib CUDA extensions
            errors[key] = f"{type(e).__name__}: {e}"[:300]
    return found, errors


class _Timer:
    def __init__(self, dev):
        self.dev = dev

    def __call__(self, fn, grad_to_none=None):
        """Milliseconds of one call of ``fn``: the median of many on CUDA."""
        if self.dev.type == "cuda":
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
        # CPU (the smoke run): one call. An interpreted kernel takes up to seconds a call
        # and its timing only shows that it runs; _measure has already warmed it up.
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def graph(self, fn, grad_to_none=None):
        """Median ms of ``fn`` replayed from a CUDA graph: GPU time without Python launch cost."""
        from triton.testing import do_bench_cudagraph
        return do_bench_cudagraph(fn, rep=10, grad_to_none=grad_to_none, return_mode="median")

    def copy_bandwidth(self, nbytes):
        import torch
        a = torch.empty(nbytes, dtype=torch.uint8, device=self.dev)
        b = torch.empty_like(a)
        ms = self(lambda: b.copy_(a))
        return 2 * nbytes / ms / 1e6


class _Case:
    def __init__(self, op, name, ours, eager, make_inputs, passes_fwd, passes_bwd, elem_bytes, numel, check,
                 extra=None, info=None):
        self.op, self.name, self.ours, self.eager = op, name, ours, eager
        self.make_inputs = make_inputs  # (dtype) -> (list of leaf tensors, grad for output(s))
        self.passes_fwd, self.passes_bwd = passes_fwd, passes_bwd
        self.elem_bytes, self.numel, self.check = elem_bytes, numel, check
        self.extra = extra or {}  # more implementations to time: {name: fn(*inputs)}
        self.info = info or {}  # copied into the result row


def _liger_adaln(LigerLayerNorm, D, dev, dtype, torch):
    """adaLN with Liger's LayerNorm: non-affine (unit weight, zero bias, made once here so no
    fill is timed), then the modulation exactly as adaln_modulate_reference writes it."""
    ones = torch.ones(D, device=dev, dtype=dtype)
    zeros = torch.zeros(D, device=dev, dtype=dtype)

    def liger(x, shift, scale):
        return LigerLayerNorm.apply(x, ones, zeros, 1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    return liger


def _liger_group_norm(LigerGroupNorm, C, act, torch):
    def liger(x, w, b):  # Liger has no fused activation: SiLU in PyTorch after it
        y = LigerGroupNorm.apply(x, w, b, C, 32, 1e-6)
        return torch.nn.functional.silu(y) if act else y
    return liger


def _apex_group_norm(ApexGroupNorm, C, act, torch):
    state = {}

    def apex(x, w, b):
        if "module" not in state:  # built on the first call, so a failure is reported as apex_error
            state["module"] = ApexGroupNorm(32, C, eps=1e-6, affine=True, device=x.device, dtype=w.dtype,
                                            act="silu" if act else "")
            # apex silently runs PyTorch for shapes/layouts its kernel does not cover; say so.
            legal = getattr(state["module"], "_check_legality", None)
            if legal is not None:
                apex.notes["fallback_to_pytorch"] = not legal(x)
        # Our weight/bias tensors as the module's parameters, so gradients reach the leaves.
        return torch.func.functional_call(state["module"], {"weight": w, "bias": b}, (x,))
    apex.notes = {}
    return apex


def _cases(ops, smoke, gn_acts, dev, torch, fused_ops, gn_batches=GN_BATCHES, third_party=None):
    tp = third_party or {}
    bf16, fp32 = torch.bfloat16, torch.float32
    B, T, D = (2, 16, 72) if smoke else (32, 256, 1152)

    def randn(*s, dtype, scale=1.0, offset=0.0, grad=True):
        t = torch.randn(*s, device=dev, dtype=torch.float32).mul_(scale).add_(offset).to(dtype)
        return t.requires_grad_(grad)

    dtypes = [bf16] if smoke else [bf16, fp32]
    for dtype in dtypes:
        es = torch.finfo(dtype).bits // 8
        tag = f"B{B} T{T} D{D} {str(dtype)[6:]}"
        if "adaln" in ops:
            def mk(dt=dtype):
                return [randn(B, T, D, dtype=dt), randn(B, D, dtype=dt, scale=0.3), randn(B, D, dtype=dt, scale=0.3)], \
                    [torch.randn(B, T, D, device=dev, dtype=dt)]
            extra = {}
            if "liger_layer_norm" in tp:
                extra["liger"] = _liger_adaln(tp["liger_layer_norm"], D, dev, dtype, torch)
            # fwd: read x, write y; bwd: read x, dy, write dx ([B,D] vectors are negligible).
            yield _Case("adaln_modulate", tag, fused_ops.adaln_modulate, fused_ops.adaln_modulate_reference, mk, 2, 3,
                        es, B * T * D, dtype == dtypes[0], extra=extra)
        if "gated" in ops:
            def mk(dt=dtype):
                return [randn(B, T, D, dtype=dt), randn(B, D, dtype=dt), randn(B, T, D, dtype=dt)], \
                    [torch.randn(B, T, D, device=dev, dtype=dt)]
            # fwd: read x, y, write out; bwd: read dout, y, write dy (dx is dout itself).
            yield _Case("gated_residual", tag, fused_ops.gated_residual, fused_ops.gated_residual_reference, mk, 3, 3,
                        es, B * T * D, dtype == dtypes[0])
        if "fused" in ops:
            def mk(dt=dtype):
                return [randn(B, T, D, dtype=dt), randn(B, D, dtype=dt), randn(B, T, D, dtype=dt),
                        randn(B, D, dtype=dt, scale=0.3), randn(B, D, dtype=dt, scale=0.3)], \
                    [torch.randn(B, T, D, device=dev, dtype=dt), torch.randn(B, T, D, device=dev, dtype=dt)]

            def unfused(x, g, y, sh, sc):
                out = fused_ops.gated_residual(x, g, y)
                return out, fused_ops.adaln_modulate(out, sh, sc)
            # fwd: read x, y, write out, y2; bwd: read dout, dy2, out, y, write dx, dy.
            yield _Case("gated_residual_adaln", tag, fused_ops.gated_residual_adaln_modulate,
                        fused_ops.gated_residual_adaln_modulate_reference, mk, 4, 6, es, B * T * D, dtype == dtypes[0],
                        extra={"ours_unfused": unfused})
        if "repa" in ops:
            Br, Tr, dr = (2, 16, 64) if smoke else (32, 256, 768)

            def mk(dt=dtype):
                return [randn(Br, Tr, dr, dtype=dt, grad=False), randn(Br, Tr, dr, dtype=dt)], [None]
            # fwd: read zs, zs_tilde; bwd: read both again, write d zs_tilde.
            yield _Case("repa_cosine_loss", f"B{Br} T{Tr} d{dr} {str(dtype)[6:]}", fused_ops.repa_cosine_loss,
                        fused_ops.repa_cosine_loss_reference, mk, 2, 3, es, Br * Tr * dr, dtype == dtypes[0])
    if "groupnorm" in ops:
        shapes = {s: {"smoke": 1} for s in SMOKE_GN_SHAPES} if smoke else vae_gn_shapes()
        for (C, HW), uses in shapes.items():
            for N in gn_batches:
                for cl in (False, True):
                    for act in gn_acts:
                        act_arg = None if act == "none" else act
                        fmt = torch.channels_last if cl else torch.contiguous_format

                        def mk(dt=bf16, C=C, HW=HW, fmt=fmt, N=N):
                            x = torch.randn(N, C, HW, HW, device=dev).add_(0.5).to(dt).contiguous(memory_format=fmt)
                            w = torch.randn(C, device=dev).mul_(0.3).add_(1).to(dt)
                            b = torch.randn(C, device=dev).mul_(0.3).to(dt)
                            dy = torch.randn(N, C, HW, HW, device=dev, dtype=dt).contiguous(memory_format=fmt)
                            return [x.requires_grad_(), w.requires_grad_(), b.requires_grad_()], [dy]

                        def ours(x, w, b, act=act_arg):
                            return fused_ops.group_norm(x, 32, w, b, 1e-6, act)

                        def eager(x, w, b, act=act_arg):
                            # What a user runs today: native group_norm (+ silu) in the I/O dtype.
                            y = torch.nn.functional.group_norm(x, 32, w, b, 1e-6)
                            return torch.nn.functional.silu(y) if act else y

                        # Each third-party kernel on the layout it is written for.
                        extra = {}
                        if not cl and "liger_group_norm" in tp:
                            extra["liger"] = _liger_group_norm(tp["liger_group_norm"], C, act_arg, torch)
                        if cl and "apex_group_norm" in tp:
                            extra["apex"] = _apex_group_norm(tp["apex_group_norm"], C, act_arg, torch)
                        layout = "nhwc" if cl else "nchw"
                        info = {"batch": N, "channels": C, "hw": HW, "layout": layout, "activation": act,
                                "vae_uses": uses}
                        # fwd: read x, write y; bwd: read x, dy, write dx.
                        yield _Case("group_norm", f"N{N} C{C} {HW}x{HW} {layout} {act} bf16", ours, eager, mk,
                                    2, 3, 2, N * C * HW * HW, True, extra=extra, info=info)


def _grads_and_outputs(fn, inputs, grads, torch):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(list(outs), [g for g in grads] if grads[0] is not None else None)
    return outs, [t.grad for t in inputs if t.requires_grad]


def _check(case, torch):
    """Max abs error of our op vs float64 reference at the benchmark shape (fp32 inputs)."""
    inputs, grads = case.make_inputs(torch.float32)
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ref_g = [None if g is None else g.double() for g in grads]
    outs, dins = _grads_and_outputs(case.ours, inputs, grads, torch)
    routs, rdins = _grads_and_outputs(case.eager, ref_in, ref_g, torch)
    err = {}
    for i, (a, r) in enumerate(zip(outs, routs)):
        err[f"out{i}"] = (a.double() - r).abs().max().item()
    for i, (a, r) in enumerate(zip(dins, rdins)):
        err[f"grad{i}"] = (a.double() - r).abs().max().item() if a is not None and r is not None else None
    del inputs, grads, ref_in, outs, routs, dins, rdins
    return err


def _memory_skip(case, dev, torch):
    """(reason to skip the case, reason to skip only its fp64 check); None where it fits."""
    if dev.type != "cuda":
        return None, None
    free = torch.cuda.mem_get_info(dev)[0]
    passes = case.passes_fwd + case.passes_bwd
    need_time = passes * case.numel * case.elem_bytes * _TIME_FACTOR
    need_check = passes * case.numel * _CHECK_BYTES_PER_PASS if case.check else 0
    gib = 2**30
    if need_time > free:
        return f"would not fit: needs ~{need_time / gib:.1f} GiB, {free / gib:.1f} GiB free", None
    if need_check > free:
        return None, f"fp64 check would not fit: needs ~{need_check / gib:.1f} GiB, {free / gib:.1f} GiB free"
    return None, None


def _run_case(case, timer, compile_baseline, copy_gbs, torch, log, torch_compile_backend="inductor"):
    r = {"op": case.op, "case": case.name, "passes_fwd": case.passes_fwd, "passes_bwd": case.passes_bwd}
    r.update(case.info)
    skip, skip_check = _memory_skip(case, timer.dev, torch)
    if skip:
        r["skipped"] = skip
        log(f"skip {case.op} {case.name}: {skip}")
        return r
    try:
        _measure(case, r, skip_check, timer, compile_baseline, torch_compile_backend, copy_gbs, torch, log)
    except torch.OutOfMemoryError as e:  # the estimate was too optimistic: report, go on
        r["skipped"] = f"out of memory: {e}"[:300]
        log(f"skip {case.op} {case.name}: {r['skipped']}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return r


def _measure(case, r, skip_check, timer, compile_baseline, torch_compile_backend, copy_gbs, torch, log):
    if case.check and skip_check:
        r["check_skipped"] = skip_check
        log(f"check {case.op} {case.name}: skipped, {skip_check}")
    elif case.check:
        try:
            r["max_abs_err_fp32_vs_fp64"] = _check(case, torch)
            log(f"check {case.op} {case.name}: " + ", ".join(
                f"{k}={v:.2e}" for k, v in r["max_abs_err_fp32_vs_fp64"].items() if v is not None))
        except torch.OutOfMemoryError as e:
            r["check_skipped"] = f"out of memory: {e}"[:300]
            log(f"check {case.op} {case.name}: skipped, {r['check_skipped']}")
            torch.cuda.empty_cache()
    inputs, grads = case.make_inputs()
    leaves = [t for t in inputs if t.requires_grad]
    impls = {"ours": case.ours, "eager": case.eager}
    impls.update(case.extra)
    if compile_baseline:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        impls["compile"] = torch.compile(case.eager, dynamic=False, backend=torch_compile_backend)
    r["impls"] = list(impls)
    bytes_fwd = case.passes_fwd * case.numel * case.elem_bytes
    bytes_fb = (case.passes_fwd + case.passes_bwd) * case.numel * case.elem_bytes
    r["bytes_fwd"], r["bytes_fwd_bwd"] = bytes_fwd, bytes_fb
    # Eager's output at the timing dtype: every other implementation must match it (catches
    # a misused third-party API, not just a slow one).
    with torch.no_grad():
        ref = case.eager(*inputs)
        ref = [o.float() for o in (ref if isinstance(ref, tuple) else (ref,))]
    for name, fn in impls.items():
        def fwd(fn=fn):
            return fn(*inputs)

        def fwd_bwd(fn=fn):
            out = fn(*inputs)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(list(outs), grads if grads[0] is not None else None)
            return outs

        try:
            t0 = time.time()
            outs = fwd_bwd()  # warm-up / compile outside the timing
            if name != "eager":
                r[f"{name}_max_abs_diff_vs_eager"] = max(
                    (o.detach().float() - e).abs().max().item() for o, e in zip(outs, ref))
            del outs
            r[f"{name}_ms_fwd"] = timer(fwd)
            r[f"{name}_ms_fwd_bwd"] = timer(fwd_bwd, grad_to_none=leaves)
            r[f"{name}_setup_s"] = round(time.time() - t0, 1)
        except Exception as e:  # a baseline that fails (to compile, or a wrong API) is reported, not fatal
            r[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
            log(f"  {name} failed: {r[f'{name}_error']}")
            continue
        for k, v in getattr(fn, "notes", {}).items():
            r[f"{name}_{k}"] = v
        if timer.dev.type == "cuda":
            try:
                r[f"{name}_graph_ms_fwd"] = timer.graph(fwd)
                r[f"{name}_graph_ms_fwd_bwd"] = timer.graph(fwd_bwd, grad_to_none=leaves)
            except Exception as e:
                r[f"{name}_graph_error"] = f"{type(e).__name__}: {e}"[:300]
                log(f"  {name} cuda-graph timing failed: {r[f'{name}_graph_error']}")
            torch.cuda.empty_cache()
    for mode, nbytes in (("fwd", bytes_fwd), ("fwd_bwd", bytes_fb)):
        for kind in ("", "graph_"):  # wall time per call (do_bench) / GPU time (CUDA graph replay)
            ms = r.get(f"ours_{kind}ms_{mode}")
            if ms:
                r[f"ours_{kind}GBps_{mode}"] = nbytes / ms / 1e6
                r[f"ours_{kind}pct_copy_{mode}"] = 100 * nbytes / ms / 1e6 / copy_gbs
                for base in impls:
                    if base != "ours" and r.get(f"{base}_{kind}ms_{mode}"):
                        r[f"{kind}speedup_vs_{base}_{mode}"] = r[f"{base}_{kind}ms_{mode}"] / ms
    log(_row(r))  # the tensors are freed when this function returns, before empty_cache()


_HEAD = (f"{'op':20s} {'case':30s} {'mode':7s} | wall ms: {'ours':>6s} {'eager':>6s} {'comp':>6s} {'%copy':>5s} "
         f"{'xeager':>6s} {'xcomp':>6s} | CUDA-graph ms: {'ours':>6s} {'eager':>6s} {'comp':>6s} {'GB/s':>5s} "
         f"{'%copy':>5s} {'xeager':>6s} {'xcomp':>6s}  (other implementations: wall / graph ms, ours x)")
_LABELS = {"ours_unfused": "unfused ours"}


def _row(r):
    if r.get("skipped"):
        return f"{r['op'][:20]:20s} {r['case'][:30]:30s} skipped: {r['skipped']}"
    lines = []
    for mode in ("fwd", "fwd_bwd"):
        def f(k, fmt="{:6.3f}"):
            v = r.get(k)
            return fmt.format(v) if v is not None else "-".rjust(len(fmt.format(0.0)))
        notes = []
        for name in r.get("impls", []):
            if name in ("ours", "eager", "compile"):
                continue
            label = _LABELS.get(name, name)
            if r.get(f"{name}_error"):
                notes.append(f"{label} failed")
            elif r.get(f"{name}_ms_{mode}"):
                graph = r.get(f"{name}_graph_ms_{mode}")
                kind = "graph_" if graph else ""
                notes.append(f"{label} {r[f'{name}_ms_{mode}']:.3f}" + (f" / {graph:.3f}" if graph else "")
                             + (f" x{r[f'{kind}speedup_vs_{name}_{mode}']:.2f}"
                                if r.get(f"{kind}speedup_vs_{name}_{mode}") else ""))
        lines.append(f"{r['op'][:20]:20s} {r['case'][:30]:30s} {mode:7s} | wall ms: {f(f'ours_ms_{mode}')} "
                     f"{f(f'eager_ms_{mode}')} {f(f'compile_ms_{mode}')} {f(f'ours_pct_copy_{mode}', '{:5.1f}')} "
                     f"{f(f'speedup_vs_eager_{mode}', '{:6.2f}')} {f(f'speedup_vs_compile_{mode}', '{:6.2f}')} | "
                     f"CUDA-graph ms: {f(f'ours_graph_ms_{mode}')} "
                     f"{f(f'eager_graph_ms_{mode}')} {f(f'compile_graph_ms_{mode}')} "
                     f"{f(f'ours_graph_GBps_{mode}', '{:5.0f}')} {f(f'ours_graph_pct_copy_{mode}', '{:5.1f}')} "
                     f"{f(f'graph_speedup_vs_eager_{mode}', '{:6.2f}')} {f(f'graph_speedup_vs_compile_{mode}', '{:6.2f}')}"
                     + (f"  ({', '.join(notes)})" if notes else ""))
    return "\n".join(lines)


def _table(results):
    return "\n".join([_HEAD] + [_row(r) for r in results["cases"]])


def main(argv=None):
    args = _parse(argv)
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    unknown = set(ops) - set(ALL_OPS)
    if unknown:
        raise SystemExit(f"bench_ops: unknown ops {sorted(unknown)}; choose from {ALL_OPS}")
    acts = tuple(a.strip() for a in args.gn_act.split(",") if a.strip())
    if args.profile:
        return profile_ops(ops, acts)
    batches = None if args.gn_batches is None else tuple(int(n) for n in args.gn_batches.split(",") if n.strip())
    run_benchmarks(ops, smoke=args.smoke, compile_baseline=not args.no_compile, gn_acts=acts,
                   out_dir=args.out_dir, command=" ".join(["python"] + sys.argv),
                   torch_compile_backend=args.torch_compile_backend, gn_batches=batches, third_party=args.third_party)


if __name__ == "__main__":
    main()
