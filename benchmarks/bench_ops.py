"""Benchmark the fused ops against PyTorch eager and torch.compile, in one run.

    python benchmarks/bench_ops.py                   # paper shapes on the GPU
    python benchmarks/bench_ops.py --smoke           # tiny shapes, CPU interpreter, < 60 s
    python benchmarks/bench_ops.py --ops groupnorm --no-compile

For every case: a correctness check of our op against the float64 reference at the
benchmark shape (fp32 inputs; max abs error of the output and of every gradient), then
median times (``triton.testing.do_bench``) of the forward and of forward+backward for
ours / eager / ``torch.compile(eager)``. Bandwidth is reported against the *minimal*
bytes each op must move (count of full-tensor reads and writes, listed per case) and as
a % of the device-to-device copy bandwidth measured in the same run.

``run_benchmarks(...)`` is the entry point for other scripts (benchmarks/throughput.py).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

# Runnable from a checkout without installing: put the repository root on the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

ALL_OPS = ("adaln", "gated", "fused", "repa", "groupnorm")

# Distinct GroupNorm shapes of the SD-VAE f8d4 at 256 px (spec §5.2/5.3/5.5, channel plan):
# encoder 128@256 | 128@128 (first norm of the 128->256 block) 256@128 | 256@64 512@64 |
# 512@32 (level 3, mid, out); decoder 512@32 | 512@64 | 512@128 (first norm of 512->256)
# 256@128 | 256@256 (first norm of 256->128) 128@256 (incl. norm_out).
VAE_GN_SHAPES = [(128, 256), (128, 128), (256, 128), (256, 64), (512, 64), (512, 32), (512, 128), (256, 256)]


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU under the Triton interpreter")
    p.add_argument("--ops", default=",".join(ALL_OPS), help=f"comma list of {ALL_OPS}")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--gn-act", default="silu,none", help="GroupNorm activations to run: silu,none")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, profile ours fwd+bwd once per op (CPU launch cost vs GPU kernels)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    return p.parse_args(argv)


def run_benchmarks(ops=ALL_OPS, smoke=False, compile_baseline=True, gn_acts=("silu", "none"), out_dir=None,
                   command=None, log=print):
    """Run the benchmark; returns the result dict (also written as JSON when out_dir is given)."""
    if smoke and not _cuda_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    from repa_e_fast import ops as F

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not smoke:
        raise SystemExit("bench_ops: no CUDA device; use --smoke for the CPU interpreter run")
    compile_baseline = compile_baseline and not smoke
    timer = _Timer(dev)
    results = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "torch": torch.__version__, "triton": _triton_version(), "python": platform.python_version(),
               "command": command or " ".join([os.path.basename(sys.executable)] + sys.argv),
               "smoke": smoke, "cases": []}
    copy_gbs = timer.copy_bandwidth(256 * 2**20 if not smoke else 2**20)
    results["copy_GBps"] = copy_gbs
    log(f"device: {results['device']}  torch {results['torch']}  triton {results['triton']}")
    log(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write counted)")

    path = None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        name = "smoke" if smoke else "".join(c if c.isalnum() else "_" for c in results["device"].lower())
        path = os.path.join(out_dir, f"ops_{name}_{datetime.date.today().strftime('%Y%m%d')}.json")
    for case in _cases(ops, smoke, gn_acts, dev, torch, F):
        results["cases"].append(_run_case(case, timer, compile_baseline, copy_gbs, torch, log))
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

    from repa_e_fast import ops as F

    dev = torch.device("cuda")
    seen = set()
    for case in _cases(ops, False, gn_acts, dev, torch, F):
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


class _Timer:
    def __init__(self, dev):
        self.dev = dev

    def __call__(self, fn, grad_to_none=None):
        """Median milliseconds."""
        if self.dev.type == "cuda":
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
        times = []
        for i in range(4):
            if grad_to_none:
                for t in grad_to_none:
                    t.grad = None
            t0 = time.perf_counter()
            fn()
            if i:
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

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
                 extra=None):
        self.op, self.name, self.ours, self.eager = op, name, ours, eager
        self.make_inputs = make_inputs  # (dtype) -> (list of leaf tensors, grad for output(s))
        self.passes_fwd, self.passes_bwd = passes_fwd, passes_bwd
        self.elem_bytes, self.numel, self.check = elem_bytes, numel, check
        self.extra = extra or {}


def _cases(ops, smoke, gn_acts, dev, torch, F):
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
            # fwd: read x, write y; bwd: read x, dy, write dx ([B,D] vectors are negligible).
            yield _Case("adaln_modulate", tag, F.adaln_modulate, F.adaln_modulate_reference, mk, 2, 3, es,
                        B * T * D, dtype == dtypes[0])
        if "gated" in ops:
            def mk(dt=dtype):
                return [randn(B, T, D, dtype=dt), randn(B, D, dtype=dt), randn(B, T, D, dtype=dt)], \
                    [torch.randn(B, T, D, device=dev, dtype=dt)]
            # fwd: read x, y, write out; bwd: read dout, y, write dy (dx is dout itself).
            yield _Case("gated_residual", tag, F.gated_residual, F.gated_residual_reference, mk, 3, 3, es,
                        B * T * D, dtype == dtypes[0])
        if "fused" in ops:
            def mk(dt=dtype):
                return [randn(B, T, D, dtype=dt), randn(B, D, dtype=dt), randn(B, T, D, dtype=dt),
                        randn(B, D, dtype=dt, scale=0.3), randn(B, D, dtype=dt, scale=0.3)], \
                    [torch.randn(B, T, D, device=dev, dtype=dt), torch.randn(B, T, D, device=dev, dtype=dt)]

            def unfused(x, g, y, sh, sc):
                out = F.gated_residual(x, g, y)
                return out, F.adaln_modulate(out, sh, sc)
            # fwd: read x, y, write out, y2; bwd: read dout, dy2, out, y, write dx, dy.
            yield _Case("gated_residual_adaln", tag, F.gated_residual_adaln_modulate,
                        F.gated_residual_adaln_modulate_reference, mk, 4, 6, es, B * T * D, dtype == dtypes[0],
                        extra={"ours_unfused": unfused})
        if "repa" in ops:
            Br, Tr, dr = (2, 16, 64) if smoke else (32, 256, 768)

            def mk(dt=dtype):
                return [randn(Br, Tr, dr, dtype=dt, grad=False), randn(Br, Tr, dr, dtype=dt)], [None]
            # fwd: read zs, zs_tilde; bwd: read both again, write d zs_tilde.
            yield _Case("repa_cosine_loss", f"B{Br} T{Tr} d{dr} {str(dtype)[6:]}", F.repa_cosine_loss,
                        F.repa_cosine_loss_reference, mk, 2, 3, es, Br * Tr * dr, dtype == dtypes[0])
    if "groupnorm" in ops:
        N = 1 if smoke else 8
        shapes = [(64, 8), (32, 5)] if smoke else VAE_GN_SHAPES
        for C, HW in shapes:
            for cl in (False, True):
                for act in gn_acts:
                    act_arg = None if act == "none" else act
                    fmt = torch.channels_last if cl else torch.contiguous_format

                    def mk(dt=bf16, C=C, HW=HW, fmt=fmt):
                        x = torch.randn(N, C, HW, HW, device=dev).add_(0.5).to(dt).contiguous(memory_format=fmt)
                        w = torch.randn(C, device=dev).mul_(0.3).add_(1).to(dt)
                        b = torch.randn(C, device=dev).mul_(0.3).to(dt)
                        dy = torch.randn(N, C, HW, HW, device=dev, dtype=dt).contiguous(memory_format=fmt)
                        return [x.requires_grad_(), w.requires_grad_(), b.requires_grad_()], [dy]

                    def ours(x, w, b, act=act_arg):
                        return F.group_norm(x, 32, w, b, 1e-6, act)

                    def eager(x, w, b, act=act_arg):
                        # What a user runs today: native group_norm (+ silu) in the I/O dtype.
                        y = torch.nn.functional.group_norm(x, 32, w, b, 1e-6)
                        return torch.nn.functional.silu(y) if act else y

                    # fwd: read x, write y; bwd: read x, dy, write dx.
                    yield _Case("group_norm", f"N{N} C{C} {HW}x{HW} {'nhwc' if cl else 'nchw'} "
                                f"{act} bf16", ours, eager, mk, 2, 3, 2, N * C * HW * HW, True)


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


def _run_case(case, timer, compile_baseline, copy_gbs, torch, log):
    r = {"op": case.op, "case": case.name, "passes_fwd": case.passes_fwd, "passes_bwd": case.passes_bwd}
    if case.check:
        r["max_abs_err_fp32_vs_fp64"] = _check(case, torch)
        log(f"check {case.op} {case.name}: " + ", ".join(f"{k}={v:.2e}" for k, v in r["max_abs_err_fp32_vs_fp64"].items()
                                                          if v is not None))
    inputs, grads = case.make_inputs()
    leaves = [t for t in inputs if t.requires_grad]
    impls = {"ours": case.ours, "eager": case.eager}
    impls.update(case.extra)
    if compile_baseline:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        impls["compile"] = torch.compile(case.eager, dynamic=False)
    bytes_fwd = case.passes_fwd * case.numel * case.elem_bytes
    bytes_fb = (case.passes_fwd + case.passes_bwd) * case.numel * case.elem_bytes
    r["bytes_fwd"], r["bytes_fwd_bwd"] = bytes_fwd, bytes_fb
    for name, fn in impls.items():
        def fwd(fn=fn):
            return fn(*inputs)

        def fwd_bwd(fn=fn):
            out = fn(*inputs)
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(list(outs), grads if grads[0] is not None else None)

        try:
            t0 = time.time()
            fwd_bwd()  # warm-up / compile outside the timing
            r[f"{name}_ms_fwd"] = timer(fwd)
            r[f"{name}_ms_fwd_bwd"] = timer(fwd_bwd, grad_to_none=leaves)
            r[f"{name}_setup_s"] = round(time.time() - t0, 1)
        except Exception as e:  # a baseline that fails to compile is reported, not fatal
            r[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
            log(f"  {name} failed: {r[f'{name}_error']}")
            continue
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
                for base in ("eager", "compile", "ours_unfused"):
                    if r.get(f"{base}_{kind}ms_{mode}"):
                        r[f"{kind}speedup_vs_{base}_{mode}"] = r[f"{base}_{kind}ms_{mode}"] / ms
    log(_row(r))
    del inputs, grads, leaves
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return r


_HEAD = (f"{'op':20s} {'case':30s} {'mode':7s} | wall ms: {'ours':>6s} {'eager':>6s} {'comp':>6s} | "
         f"CUDA-graph ms: {'ours':>6s} {'eager':>6s} {'comp':>6s} {'GB/s':>5s} {'%copy':>5s} {'xeager':>6s} {'xcomp':>6s}")


def _row(r):
    lines = []
    for mode in ("fwd", "fwd_bwd"):
        def f(k, fmt="{:6.3f}"):
            v = r.get(k)
            return fmt.format(v) if v is not None else "-".rjust(len(fmt.format(0.0)))
        unf = [f"unfused ours {r[k]:.3f}" for k in (f"ours_unfused_ms_{mode}", f"ours_unfused_graph_ms_{mode}") if r.get(k)]
        lines.append(f"{r['op'][:20]:20s} {r['case'][:30]:30s} {mode:7s} | wall ms: {f(f'ours_ms_{mode}')} "
                     f"{f(f'eager_ms_{mode}')} {f(f'compile_ms_{mode}')} | CUDA-graph ms: {f(f'ours_graph_ms_{mode}')} "
                     f"{f(f'eager_graph_ms_{mode}')} {f(f'compile_graph_ms_{mode}')} "
                     f"{f(f'ours_graph_GBps_{mode}', '{:5.0f}')} {f(f'ours_graph_pct_copy_{mode}', '{:5.1f}')} "
                     f"{f(f'graph_speedup_vs_eager_{mode}', '{:6.2f}')} {f(f'graph_speedup_vs_compile_{mode}', '{:6.2f}')}"
                     + (f"  ({', '.join(unf)})" if unf else ""))
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
    run_benchmarks(ops, smoke=args.smoke, compile_baseline=not args.no_compile, gn_acts=acts,
                   out_dir=args.out_dir, command=" ".join(["python"] + sys.argv))


if __name__ == "__main__":
    main()
