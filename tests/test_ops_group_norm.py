"""GroupNorm (+SiLU) kernels vs the float64 reference, both memory formats; the
FusedGroupNorm module and replace_group_norms."""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from repa_e_fast import ops
from repa_e_fast.ops import _dispatch
from _ops_helpers import SUBNORMAL_STEP, TOL, case_seed, needs_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CL = torch.channels_last


def close(actual, ref, dtype, what):
    assert actual.dtype == dtype and actual.shape == ref.shape, what
    tol = TOL[dtype]
    scale = ref.abs().max().item()
    torch.testing.assert_close(actual.double(), ref, rtol=tol, atol=tol * scale + SUBNORMAL_STEP[dtype],
                               msg=lambda m: f"{what}: {m}")


def run_case(shape, groups, dtype, channels_last, activation, seed, offset=0.5, affine=True):
    N, C, H, W = shape
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype)
    w = (torch.randn(C, generator=gen, dtype=torch.float64) * 0.5 + 1).to(dtype)
    b = (torch.randn(C, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    dy = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    fmt = CL if channels_last else torch.contiguous_format
    xk = x.to(DEVICE).clone(memory_format=fmt).requires_grad_(True)
    wk, bk = w.to(DEVICE).clone().requires_grad_(True), b.to(DEVICE).clone().requires_grad_(True)
    y = ops.group_norm(xk, groups, wk if affine else None, bk if affine else None, eps=1e-6, activation=activation)
    assert y.is_contiguous(memory_format=fmt), "output must keep the input's memory format"
    y.backward(dy.to(DEVICE))
    xr = x.double().to(DEVICE).requires_grad_(True)
    wr, br = w.double().to(DEVICE).requires_grad_(True), b.double().to(DEVICE).requires_grad_(True)
    yr = ops.group_norm_reference(xr, groups, wr if affine else None, br if affine else None, 1e-6, activation)
    yr.backward(dy.double().to(DEVICE))
    close(y, yr, dtype, "y")
    close(xk.grad, xr.grad, dtype, "dx")
    if affine:
        close(wk.grad, wr.grad, dtype, "dweight")
        close(bk.grad, br.grad, dtype, "dbias")


# (N, C, H, W, groups): VAE widths with 32 groups, H = W = 1 / 3 / 32, odd group sizes.
CASES = [
    (2, 128, 1, 1, 32),
    (1, 256, 3, 3, 32),
    (1, 512, 32, 32, 32),
    (2, 128, 16, 16, 32),
    (2, 96, 5, 7, 32),    # 3 channels per group (not a power of two)
    (1, 20, 9, 11, 5),    # 4 channels per group, 5 groups
    (3, 6, 4, 4, 1),      # one group
    (2, 12, 3, 5, 12),    # one channel per group (InstanceNorm-like)
]


@needs_triton
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_group_norm_kernel_fp32(kernel_env, case, channels_last, activation):
    *shape, groups = case
    run_case(tuple(shape), groups, torch.float32, channels_last, activation, seed=case_seed(case, channels_last, activation))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", [(2, 128, 8, 8, 32), (1, 96, 3, 3, 32), (1, 512, 16, 16, 32)],
                         ids=lambda c: "x".join(map(str, c)))
def test_group_norm_kernel_low_precision(kernel_env, case, channels_last, dtype):
    *shape, groups = case
    run_case(tuple(shape), groups, dtype, channels_last, "silu", seed=case_seed(case, channels_last, str(dtype)))


@needs_triton
def test_group_norm_no_affine(kernel_env):
    run_case((2, 64, 5, 5), 32, torch.float32, True, "silu", seed=3, affine=False)
    run_case((2, 64, 5, 5), 32, torch.float32, False, None, seed=4, affine=False)


@needs_triton
@pytest.mark.parametrize("case,channels_last,programs", [
    ((1, 512, 27, 25, 32), True, 17),    # 85 tiles of 8 px: 17 chunks of 5 tiles, the last tile 3 px
    ((1, 512, 27, 25, 32), True, 300),   # 85 chunks of one tile: > 64 partials per group to sum
    ((1, 32, 97, 89, 32), False, 4),     # NCHW: 3 tiles of 4096 px in one chunk, the last partial
    ((2, 32, 97, 89, 32), False, 300),   # NCHW: one tile per chunk
], ids=["nhwc-17", "nhwc-300", "nchw-4", "nchw-300"])
def test_group_norm_split_reduction_odd_sizes(kernel_env, monkeypatch, case, channels_last, programs):
    """The per-lane statistics and backward sums across several tiles of a chunk with a
    partial last tile, and the dx kernel's sum over many chunk partials."""
    from repa_e_fast.kernels import group_norm as kgn

    monkeypatch.setattr(kgn, "target_programs", lambda device: programs)
    *shape, groups = case
    plan = kgn._Plan(torch.empty(*shape, device="meta"), groups, channels_last)
    assert plan.n_chunks > 1 or plan.tiles_per_chunk > 1
    run_case(tuple(shape), groups, torch.float32, channels_last, "silu", seed=programs, offset=3.0)


@needs_triton
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_statistics_large_group_with_offset(kernel_env, channels_last):
    # Large groups with a mean offset of 100 (a naive fp32 E[x^2] - E[x]^2 loses ~4 digits
    # of the variance here). On CUDA the VAE's largest GroupNorm, C=512 at 256x256
    # (2^20 elements per group); in the interpreter 128x128 (2^18 per group) to stay fast.
    # The statistics kernels (stats + finalize) are compared to float64 directly.
    from repa_e_fast.kernels import group_norm as kgn

    gen = torch.Generator().manual_seed(5)
    hw = 256 if DEVICE == "cuda" else 128
    x64 = torch.randn(1, 512, hw, hw, generator=gen, dtype=torch.float64)
    x64 = x64 * torch.linspace(0.5, 2.0, 512, dtype=torch.float64).view(1, 512, 1, 1) + 100.0
    x = x64.float()
    if channels_last:
        x = x.contiguous(memory_format=CL)
    mean, rstd = kgn.group_norm_stats(x.to(DEVICE), 32, 1e-6, channels_last)
    groups = x.double().reshape(1, 32, -1)  # the exact fp32 values, in float64
    ref_mean = groups.mean(-1)
    ref_var = groups.var(-1, unbiased=False)
    torch.testing.assert_close(mean.double().cpu(), ref_mean, rtol=2e-6, atol=0)
    var = 1 / rstd.double().cpu() ** 2 - 1e-6
    torch.testing.assert_close(var, ref_var, rtol=2e-5, atol=0)
    # The naive single-pass formula in fp32 is far off: the test can tell the difference.
    naive = (x.double().reshape(1, 32, -1).float() ** 2).mean(-1) - x.double().reshape(1, 32, -1).float().mean(-1) ** 2
    assert ((naive.double() - ref_var).abs() / ref_var).max() > 1e-3


@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_reference_gradcheck(monkeypatch, activation):
    monkeypatch.setenv("REPA_E_FAST_OPS", "torch")
    gen = torch.Generator().manual_seed(6)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    assert torch.autograd.gradcheck(lambda x, w, b: ops.group_norm(x, 2, w, b, 1e-6, activation),
                                    (mk(2, 4, 3, 2), mk(4), mk(4)))


def test_group_norm_reference_definition():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 3, 3, generator=gen, dtype=torch.float64)
    gn = nn.GroupNorm(4, 8, eps=1e-6).double()
    torch.testing.assert_close(ops.group_norm_reference(x, 4, gn.weight, gn.bias, 1e-6, "silu"),
                               torch.nn.functional.silu(gn(x)))


def test_group_norm_validation_errors():
    x = torch.randn(2, 8, 3, 3)
    with pytest.raises(ValueError, match="dividing C=8"):
        ops.group_norm(x, 3)
    with pytest.raises(ValueError, match="dividing C=3"):  # [8, 3, 3] is N=8, C=3, as for nn.GroupNorm
        ops.group_norm(x[0], 2)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        ops.group_norm(x, 2, torch.ones(7))
    with pytest.raises(ValueError, match="activation"):
        ops.group_norm(x, 2, activation="gelu")
    with pytest.raises(TypeError, match="float32"):
        ops.group_norm(x.to(torch.int32), 2)
    with pytest.raises(ValueError, match="one device"):
        ops.group_norm(x, 2, torch.ones(8, device="meta"))


@needs_triton
def test_group_norm_arbitrary_strides_are_copied(kernel_env):
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(2, 32, 6, 10, generator=gen).to(DEVICE)
    x = base[:, :, :, ::2]  # neither NCHW- nor channels_last-contiguous
    y = ops.group_norm(x, 8, activation="silu")
    close(y, ops.group_norm_reference(x.double(), 8, activation="silu"), torch.float32, "y")


def test_fused_group_norm_state_dict_compatible():
    torch.manual_seed(0)
    gn = nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    fused = ops.FusedGroupNorm(4, 16, eps=1e-6, activation="silu")
    assert list(fused.state_dict().keys()) == list(gn.state_dict().keys()) == ["weight", "bias"]
    fused.load_state_dict(gn.state_dict(), strict=True)
    gn.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(fused(x), torch.nn.functional.silu(gn(x)), rtol=1e-5, atol=1e-5)
    assert isinstance(fused, nn.GroupNorm) and "activation='silu'" in repr(fused)
    with pytest.raises(ValueError, match="activation"):
        ops.FusedGroupNorm(4, 16, activation="relu")


def test_replace_group_norms():
    torch.manual_seed(1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.GroupNorm(4, 8, eps=1e-6), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1),
                                      nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 1))
            self.norm = nn.GroupNorm(4, 8)  # followed by a functional silu: not detectable

        def forward(self, x):
            return torch.nn.functional.silu(self.norm(self.body(x)))

    model = Block()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_()
                m.bias.normal_()
    x = torch.randn(2, 8, 6, 6)
    expected = model(x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: p for k, p in model.named_parameters()}
    assert ops.replace_group_norms(model) is model
    assert isinstance(model.body[0], ops.FusedGroupNorm) and model.body[0].activation == "silu"
    assert isinstance(model.body[1], nn.Identity)
    assert isinstance(model.body[3], ops.FusedGroupNorm) and model.body[3].activation is None
    assert isinstance(model.norm, ops.FusedGroupNorm) and model.norm.activation is None
    assert model.body[0].eps == 1e-6 and model.body[3].num_groups == 2
    # Same keys, same values, same Parameter objects (optimizers stay valid).
    assert model.state_dict().keys() == sd.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k])
    for k, p in model.named_parameters():
        assert p is params[k]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # Idempotent; a bare GroupNorm is returned replaced.
    ops.replace_group_norms(model)
    assert isinstance(model.body[1], nn.Identity) and isinstance(model.body[2], nn.Conv2d)
    assert isinstance(ops.replace_group_norms(nn.GroupNorm(2, 4)), ops.FusedGroupNorm)
    # fuse_silu=False keeps the SiLU module.
    seq = ops.replace_group_norms(nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()), fuse_silu=False)
    assert isinstance(seq[1], nn.SiLU) and seq[0].activation is None


def test_dispatch_rules(monkeypatch):
    x = torch.randn(1, 4, 2, 2)
    monkeypatch.setenv("REPA_E_FAST_OPS", "cuda")
    with pytest.raises(ValueError, match="REPA_E_FAST_OPS"):
        ops.group_norm(x, 2)
    monkeypatch.setenv("REPA_E_FAST_OPS", "torch")
    assert not _dispatch.use_triton("t", x)
    monkeypatch.delenv("REPA_E_FAST_OPS")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _dispatch.use_triton("t", x) == (x.is_cuda and _dispatch.triton_available())
    monkeypatch.setenv("REPA_E_FAST_OPS", "triton")
    with pytest.raises(RuntimeError, match="CUDA tensors or TRITON_INTERPRET=1"):
        ops.group_norm(x, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _dispatch.triton_available():
        with pytest.raises(TypeError, match="float32/bfloat16/float16"):
            ops.group_norm(x.double(), 2)
    monkeypatch.delenv("REPA_E_FAST_OPS")
    # float64 takes the reference even when the kernels could run.
    assert not _dispatch.use_triton("t", x.double())


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, repa_e_fast.ops as ops\n"
        "assert not ops.triton_available()\n"
        "x = torch.randn(2, 3, 8)\n"
        "v = torch.randn(2, 8)\n"
        "y = ops.adaln_modulate(x, v, v)\n"
        "assert torch.allclose(y, ops.adaln_modulate_reference(x, v, v))\n"
        "ops.group_norm(torch.randn(1, 4, 2, 2), 2, activation='silu')\n"
        "print('ok')\n"
    )
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    import os
    env = {**os.environ, **env}
    env.pop("REPA_E_FAST_OPS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ----------------------------------------------------------------- any rank, defaults


RANK_CASES = [
    ((3, 32), "contiguous"),                   # [N, C] (8 channels per group)
    ((2, 8, 7), "contiguous"),                 # [B, C, L], as diffusers' attention uses
    ((2, 8, 7), "channels_minor"),             # the [B, C, H*W] of a channels_last image
    ((2, 8, 3, 4, 5), "contiguous"),           # video VAEs
    ((2, 8, 3, 4, 5), "channels_last_3d"),
    ((2, 8, 3, 4, 5), "strided"),              # copied
]


def make_layout(x, layout):
    if layout == "channels_minor":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "strided":
        return x.repeat_interleave(2, dim=-1)[..., ::2]
    return x


@needs_triton
@pytest.mark.parametrize("shape,layout", RANK_CASES)
def test_group_norm_any_rank(kernel_env, shape, layout):
    gen = torch.Generator().manual_seed(11)
    x = make_layout(torch.randn(*shape, generator=gen, dtype=torch.float64) * 2 + 0.5, layout)
    C = shape[1]
    w, b = torch.randn(C, generator=gen, dtype=torch.float64), torch.randn(C, generator=gen, dtype=torch.float64)
    dy = torch.randn(*shape, generator=gen, dtype=torch.float64)
    xk = x.float().to(DEVICE).requires_grad_(True)
    if layout != "strided":
        assert xk.stride() == x.stride()
    wk, bk = w.float().to(DEVICE).requires_grad_(True), b.float().to(DEVICE).requires_grad_(True)
    y = ops.group_norm(xk, 4, wk, bk, activation="silu")
    if layout in ("channels_minor", "channels_last_3d"):
        assert y.stride() == xk.stride(), "a channels-minor input keeps its layout (no copy)"
    y.backward(dy.float().to(DEVICE))
    xr, wr, br = (t.to(DEVICE).requires_grad_(True) for t in (x, w, b))
    yr = torch.nn.functional.silu(torch.nn.functional.group_norm(xr, 4, wr, br))  # eps: both default to 1e-5
    yr.backward(dy.to(DEVICE))
    close(y, yr.detach(), torch.float32, "y")
    close(xk.grad, xr.grad, torch.float32, "dx")
    close(wk.grad, wr.grad, torch.float32, "dweight")


def test_group_norm_defaults_and_integer_like_groups():
    import inspect

    import numpy as np

    assert inspect.signature(ops.group_norm).parameters["eps"].default == \
        inspect.signature(torch.nn.functional.group_norm).parameters["eps"].default == 1e-5
    assert inspect.signature(ops.group_norm_reference).parameters["eps"].default == 1e-5
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(ops.group_norm(x, np.int64(2)), torch.nn.functional.group_norm(x, 2))
    gn = nn.GroupNorm(np.int64(4), 8)
    fused = ops.FusedGroupNorm.from_module(gn, "silu")
    assert fused.num_groups == 4 and fused.weight is gn.weight and fused.bias is gn.bias
    torch.testing.assert_close(fused(x), torch.nn.functional.silu(gn(x)))
    for bad in (True, 2.0, 3, 0):
        with pytest.raises(ValueError, match="num_groups"):
            ops.group_norm(x, bad)
    with pytest.raises(TypeError, match="nn.GroupNorm"):
        ops.FusedGroupNorm.from_module(nn.LayerNorm(8))
    with pytest.raises(ValueError, match=r"\[N, C, \*\]"):
        ops.group_norm(torch.randn(8), 2)


def test_import_is_light_and_reads_triton_interpret_when_a_kernel_first_runs():
    code = (
        "import os, sys, torch\n"
        "import repa_e_fast.ops as ops\n"
        "heavy = [m for m in ('triton', 'torch._dynamo', 'repa_e_fast.kernels') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"  # set after the import: still honoured
        "os.environ['REPA_E_FAST_OPS'] = 'triton'\n"
        "x = torch.randn(2, 8, 5)\n"
        "y = ops.group_norm(x, 4, activation='silu')\n"
        "assert 'repa_e_fast.kernels.group_norm' in sys.modules\n"
        "torch.testing.assert_close(y, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4)))\n"
        "print('ok')\n"
    )
    import os

    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.pop("REPA_E_FAST_OPS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    if not _dispatch.triton_available():
        pytest.skip("triton not installed")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
