"""`benchmarks/bench_ops.py --smoke` keeps working (CPU, Triton interpreter): its correctness
check at the benchmark shapes passes, the torch.compile baseline runs, the GroupNorm cases
cover every batch size asked for; the VAE GroupNorm shapes match the spec's channel plans;
an installed Liger-Kernel / apex is picked up as a baseline (fake ones, in PyTorch, here)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from repa_e_fast.ops import _dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_triton = pytest.mark.skipif(not _dispatch.triton_available(), reason="triton not installed")


def _bench_ops():
    spec = importlib.util.spec_from_file_location("bench_ops", os.path.join(ROOT, "benchmarks", "bench_ops.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_triton
def test_bench_ops_smoke(tmp_path):
    env = dict(os.environ)
    env.pop("REPA_E_FAST_OPS", None)
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_ops.py"), "--smoke", "--gn-act", "silu",
           "--gn-batches", "1,2", "--out-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = tmp_path.glob("ops_smoke_*.json")
    res = json.loads(path.read_text())
    ops = {c["op"] for c in res["cases"]}
    assert ops == {"adaln_modulate", "gated_residual", "gated_residual_adaln", "repa_cosine_loss", "group_norm"}
    assert res["torch_compile_backend"] == "aot_eager" and res["gn_batches"] == [1, 2]
    assert set(res["third_party"]) == {"liger_kernel", "apex", "xformers"}
    assert res["third_party_baselines"] == []  # "auto" runs them on CUDA only
    for case in res["cases"]:
        assert "skipped" not in case, case
        for impl in ("ours", "eager", "compile"):
            assert case[f"{impl}_ms_fwd"] > 0 and case[f"{impl}_ms_fwd_bwd"] > 0, (impl, case)
        assert case["speedup_vs_compile_fwd_bwd"] > 0 and case["ours_pct_copy_fwd_bwd"] > 0, case
        # bf16 outputs: ours within a few bf16 ulps of eager; aot_eager runs eager's own ops.
        assert case["ours_max_abs_diff_vs_eager"] < 0.1, case
        assert case["compile_max_abs_diff_vs_eager"] < 1e-2, case
        for name, err in case.get("max_abs_err_fp32_vs_fp64", {}).items():
            assert err is not None and err < 1e-4, (case["op"], case["case"], name, err)
    gn = [c for c in res["cases"] if c["op"] == "group_norm"]
    batches = {}
    for c in gn:
        batches.setdefault((c["channels"], c["hw"], c["layout"]), set()).add(c["batch"])
        assert c["case"].startswith(f"N{c['batch']} C{c['channels']} ")
    assert batches == {(32, 5, layout): {1, 2} for layout in ("nchw", "nhwc")}


def test_vae_gn_shapes_match_the_channel_plans():
    """By hand: (C, H) of every GroupNorm input at 256 px; the first norm of a
    channel-changing ResBlock sees the block's input channels, attention norms sit at the
    16x16 level of f16d32 and in both mid blocks."""
    shapes = _bench_ops().vae_gn_shapes()
    f8d4 = {(128, 256), (128, 128), (256, 128), (256, 64), (512, 64), (512, 32), (512, 128), (256, 256)}
    f16d32 = {(128, 256), (128, 128), (128, 64), (256, 64), (256, 32), (256, 16), (512, 16), (512, 32),
              (256, 128)}
    assert {s for s, uses in shapes.items() if "f8d4" in uses} == f8d4
    assert {s for s, uses in shapes.items() if "f16d32" in uses} == f16d32
    assert len(shapes) == len(f8d4 | f16d32) == 12
    # GroupNorm calls per forward: f8d4 enc 4 levels x 2 blocks x 2 + mid 5 + out 1, dec mid 5 +
    # 4 x 3 x 2 + out 1; f16d32 enc 5 x 2 x 2 + 2 attn + mid 5 + out 1, dec mid 5 + 5 x 3 x 2 + 3 attn + out 1.
    assert sum(u.get("f8d4", 0) for u in shapes.values()) == 22 + 30
    assert sum(u.get("f16d32", 0) for u in shapes.values()) == 28 + 39
    # 512@16 (f16d32 only): encoder level 4 (block0 norm2, block1 norm1/norm2, 2 attn) + mid 5 +
    # norm_out; decoder mid 5 + level 4 (3 blocks x 2 + 3 attn). block0's norm1 is 256@16.
    assert shapes[(512, 16)] == {"f16d32": (5 + 5 + 1) + (5 + 6 + 3)}
    assert shapes[(256, 16)] == {"f16d32": 1}


FAKE_LIGER = {
    "liger_kernel/__init__.py": '__version__ = "0.0.0+fake"\n',
    "liger_kernel/ops/__init__.py": "CALLS = []\n",
    "liger_kernel/ops/group_norm.py": '''
        import torch
        import torch.nn.functional as F
        from . import CALLS


        class LigerGroupNormFunction(torch.autograd.Function):
            """Liger's contract: (X, weight, bias, num_channels, num_groups, eps), NCHW contiguous."""

            @staticmethod
            def forward(ctx, X, W, B, num_channels, num_groups, eps):
                assert X.is_contiguous() and X.shape[1] == num_channels and W.shape == B.shape == (num_channels,)
                CALLS.append(("group_norm.forward", num_channels, num_groups, eps))
                ctx.save_for_backward(X, W, B)
                ctx.cfg = (num_groups, eps)
                return F.group_norm(X, num_groups, W, B, eps)

            @staticmethod
            def backward(ctx, dY):
                CALLS.append(("group_norm.backward",))
                X, W, B = (t.detach().requires_grad_() for t in ctx.saved_tensors)
                with torch.enable_grad():
                    Y = F.group_norm(X, ctx.cfg[0], W, B, ctx.cfg[1])
                    dX, dW, dB = torch.autograd.grad(Y, (X, W, B), dY)
                return dX, dW, dB, None, None, None
    ''',
    "liger_kernel/ops/layer_norm.py": '''
        import torch
        import torch.nn.functional as F
        from . import CALLS


        class LigerLayerNormFunction(torch.autograd.Function):
            """Liger's contract: (X, W, B, eps) over the last dim."""

            @staticmethod
            def forward(ctx, X, W, B, eps):
                assert W.shape == B.shape == (X.shape[-1],)
                CALLS.append(("layer_norm.forward", bool((W == 1).all() and (B == 0).all()), eps))
                ctx.save_for_backward(X, W, B)
                ctx.eps = eps
                return F.layer_norm(X, (X.shape[-1],), W, B, eps)

            @staticmethod
            def backward(ctx, dY):
                CALLS.append(("layer_norm.backward",))
                X, W, B = (t.detach().requires_grad_() for t in ctx.saved_tensors)
                with torch.enable_grad():
                    Y = F.layer_norm(X, (X.shape[-1],), W, B, ctx.eps)
                    dX, dW, dB = torch.autograd.grad(Y, (X, W, B), dY)
                return dX, dW, dB, None
    ''',
}


# apex.contrib.group_norm.GroupNorm's interface: a module with its own weight/bias, NHWC
# input, SiLU fused with act="silu", PyTorch fallback outside its supported channel counts.
FAKE_APEX = {
    "apex/__init__.py": "",
    "apex/contrib/__init__.py": "",
    "apex/contrib/group_norm/__init__.py": '''
        import torch
        import torch.nn.functional as F

        CALLS = []


        class GroupNorm(torch.nn.Module):
            def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, act=""):
                super().__init__()
                self.num_groups, self.num_channels, self.eps, self.act = num_groups, num_channels, eps, act
                self.weight = torch.nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
                self.bias = torch.nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))

            def _check_legality(self, x):
                return x.is_contiguous(memory_format=torch.channels_last) and self.num_channels in (128, 256, 512)

            def forward(self, x):
                CALLS.append((self.num_groups, self.num_channels, self.eps, self.act))
                y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
                return F.silu(y) if self.act == "silu" else y
    ''',
}
_FAKES = ("liger_kernel", "apex")


@pytest.fixture
def fake_third_party(tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n.split(".")[0] in _FAKES]:  # a real one imported before
        monkeypatch.delitem(sys.modules, name)
    for rel, text in {**FAKE_LIGER, **FAKE_APEX}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in [n for n in sys.modules if n.split(".")[0] in _FAKES]:
        del sys.modules[name]


@needs_triton
def test_third_party_baselines_are_benchmarked(fake_third_party, monkeypatch):
    import torch

    bench_ops = _bench_ops()
    monkeypatch.setattr(bench_ops, "SMOKE_GN_SHAPES", [(64, 4)])  # C != 32 groups
    # Our ops as their PyTorch references: this test is about the third-party baselines;
    # test_bench_ops_smoke runs our kernels (interpreted) through the same benchmark code.
    monkeypatch.setenv("REPA_E_FAST_OPS", "torch")
    cpu = torch.device("cpu")
    versions = bench_ops._third_party_versions()
    assert versions["liger_kernel"] and versions["apex"]  # "0.0.0+fake" unless a real one has metadata
    assert bench_ops._load_third_party("auto", cpu, versions) == ({}, {})  # default: CUDA only
    res = bench_ops.run_benchmarks(ops=("adaln", "groupnorm"), smoke=True, compile_baseline=False,
                                   gn_acts=("silu",), gn_batches=(1,), third_party="on", log=lambda *a: None)
    assert res["third_party"]["liger_kernel"] == versions["liger_kernel"]
    assert set(res["third_party_baselines"]) == {"liger_group_norm", "liger_layer_norm", "apex_group_norm"}
    by_op = {}
    for c in res["cases"]:
        by_op.setdefault((c["op"], c.get("layout")), []).append(c)
    for key in (("adaln_modulate", None), ("group_norm", "nchw")):
        (c,) = by_op[key]
        assert "liger_error" not in c, c["liger_error"]
        assert "liger" in c["impls"]
        assert c["liger_ms_fwd"] > 0 and c["liger_ms_fwd_bwd"] > 0, c
        assert c["speedup_vs_liger_fwd"] > 0 and c["speedup_vs_liger_fwd_bwd"] > 0, c
        assert c["liger_max_abs_diff_vs_eager"] < 0.05, c  # same function as eager, bf16
    (nchw,) = by_op[("group_norm", "nchw")]
    (nhwc,) = by_op[("group_norm", "nhwc")]
    # Each GroupNorm kernel on its own layout: Liger NCHW, apex NHWC.
    assert "liger" not in nhwc["impls"] and not any(k.startswith("liger_") for k in nhwc)
    assert "apex" not in nchw["impls"] and not any(k.startswith("apex_") for k in nchw)
    assert "apex_error" not in nhwc, nhwc["apex_error"]
    assert nhwc["apex_ms_fwd"] > 0 and nhwc["speedup_vs_apex_fwd_bwd"] > 0, nhwc
    assert nhwc["apex_max_abs_diff_vs_eager"] < 0.05, nhwc
    assert nhwc["apex_fallback_to_pytorch"] is True  # C=64 is not one of apex's channel counts
    table = bench_ops._table(res)
    assert "liger" in table and "apex" in table

    from liger_kernel.ops import CALLS
    assert ("group_norm.forward", 64, 32, 1e-6) in CALLS and ("group_norm.backward",) in CALLS
    assert ("layer_norm.forward", True, 1e-6) in CALLS and ("layer_norm.backward",) in CALLS
    from apex.contrib.group_norm import CALLS as APEX_CALLS
    assert (32, 64, 1e-6, "silu") in APEX_CALLS
