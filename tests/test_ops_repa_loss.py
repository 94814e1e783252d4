"""REPA cosine loss: Triton kernels vs the float64 reference (F.normalize semantics)."""

import pytest
import torch

from repa_e_fast import ops
from _ops_helpers import DTYPES, SUBNORMAL_STEP, TOL, case_seed, needs_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def close(actual, ref, dtype, what):
    assert actual.dtype == dtype and actual.shape == ref.shape, what
    tol = TOL[dtype]
    # Where the exact value overflows dtype (fp16 zero-row gradients), demand the same inf.
    over = ref.to(dtype).isinf()
    assert torch.equal(actual[over].double(), ref.to(dtype)[over].double()), f"{what}: overflowed entries differ"
    a, r = actual.double()[~over], ref[~over]
    scale = r.abs().max().item() if r.numel() else 0.0
    torch.testing.assert_close(a, r, rtol=tol, atol=tol * scale + SUBNORMAL_STEP[dtype], msg=lambda m: f"{what}: {m}")


def pairs(gen, B, Ts, ds, dtype):
    zs, zts = [], []
    for T, d in zip(Ts, ds):
        zs.append((torch.randn(B, T, d, generator=gen, dtype=torch.float64) + 0.3).to(dtype).to(DEVICE))
        zts.append((torch.randn(B, T, d, generator=gen, dtype=torch.float64) * 3).to(dtype).to(DEVICE))
    return zs, zts


def run_both(zs, zts, grad_targets=False):
    """Kernel loss + grads, and float64 reference loss + grads on the same rounded values."""
    a_z = [z.clone().requires_grad_(grad_targets) for z in zs]
    a_t = [t.clone().requires_grad_(True) for t in zts]
    loss = ops.repa_cosine_loss(a_z, a_t)
    (loss * 0.7).backward()
    r_z = [z.double().requires_grad_(grad_targets) for z in zs]
    r_t = [t.double().requires_grad_(True) for t in zts]
    ref = ops.repa_cosine_loss_reference(r_z, r_t)
    (ref * 0.7).backward()
    return loss, ref, a_z, a_t, r_z, r_t


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Ts,ds", [(2, [1], [768]), (3, [255], [77]), (2, [256], [72]), (2, [16, 9, 4], [72, 1152, 5])],
                         ids=["T1-d768", "T255-d77", "T256-d72", "3enc"])
def test_repa_loss_kernel(kernel_env, B, Ts, ds, dtype):
    gen = torch.Generator().manual_seed(case_seed(B, tuple(Ts), tuple(ds), str(dtype)))
    zs, zts = pairs(gen, B, Ts, ds, dtype)
    loss, ref, a_z, a_t, r_z, r_t = run_both(zs, zts, grad_targets=len(Ts) > 1)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref.item()) <= 2e-6 * max(1.0, abs(ref.item())), (loss.item(), ref.item())
    for i in range(len(Ts)):
        close(a_t[i].grad, r_t[i].grad, dtype, f"d zs_tilde[{i}]")
        if len(Ts) > 1:
            close(a_z[i].grad, r_z[i].grad, dtype, f"d zs[{i}]")
        else:
            assert a_z[i].grad is None


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_repa_loss_zero_rows(kernel_env, dtype):
    gen = torch.Generator().manual_seed(11)
    zs, zts = pairs(gen, 2, [5, 3], [24, 40], dtype)
    zts[0][0, 1] = 0  # zero projector row
    zs[0][1, 2] = 0   # zero target row
    zts[1][1, 0] = 0
    zs[1][1, 0] = 0   # both zero
    loss, ref, a_z, a_t, r_z, r_t = run_both(zs, zts, grad_targets=True)
    assert abs(loss.item() - ref.item()) <= 2e-6
    for i in range(2):
        assert not a_t[i].grad.isnan().any() and not a_z[i].grad.isnan().any()
        close(a_t[i].grad, r_t[i].grad, dtype, f"d zs_tilde[{i}]")
        close(a_z[i].grad, r_z[i].grad, dtype, f"d zs[{i}]")
    # Documented values: the zero projector row gets w * zs/(eps*max(|zs|, eps)), w = -0.7/(E*B*T).
    w = -0.7 / (2 * 2 * 5)
    z = zs[0][0, 1].double()
    expected = (w * z / (1e-12 * z.norm())).to(dtype)
    torch.testing.assert_close(a_t[0].grad[0, 1], expected, rtol=TOL[dtype], atol=0)
    assert torch.all(a_t[0].grad[1, 2] == 0)  # its target is zero: no gradient
    assert torch.all(a_t[1].grad[1, 0] == 0) and torch.all(a_z[1].grad[1, 0] == 0)
    if dtype == torch.float16:  # ~1e12 * w overflows float16, like the reference cast
        assert a_t[0].grad[0, 1].isinf().any()


@needs_triton
def test_repa_loss_mixed_dtypes_and_noncontiguous(kernel_env):
    gen = torch.Generator().manual_seed(12)
    z = torch.randn(3, 8, 2, 10, generator=gen).to(DEVICE)[:, :, 0]  # [3, 8, 10], not contiguous
    t = torch.randn(3, 8, 10, generator=gen).to(torch.bfloat16).to(DEVICE)
    assert not z.is_contiguous()
    loss = ops.repa_cosine_loss(z, t)
    ref = ops.repa_cosine_loss_reference(z.double(), t.double())
    assert abs(loss.item() - ref.item()) < 1e-6


def test_repa_reference_matches_official_formula():
    # The official loop: per sample mean over tokens of -(zn * ztn).sum(-1), summed over
    # samples and encoders, divided by E*B.
    gen = torch.Generator().manual_seed(13)
    zs = [torch.randn(4, 6, 8, generator=gen, dtype=torch.float64), torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)]
    zts = [torch.randn_like(z) for z in zs]
    total = 0.0
    for z, zt in zip(zs, zts):
        for n in range(4):
            zn = z[n] / z[n].norm(dim=-1, keepdim=True)
            ztn = zt[n] / zt[n].norm(dim=-1, keepdim=True)
            total += (-(zn * ztn).sum(-1)).mean()
    assert abs(ops.repa_cosine_loss_reference(zs, zts).item() - total.item() / 8) < 1e-12
    # Perfect alignment gives -1.
    assert abs(ops.repa_cosine_loss_reference(zs, [2 * z for z in zs]).item() + 1) < 1e-12


def test_repa_reference_gradcheck(monkeypatch):
    monkeypatch.setenv("REPA_E_FAST_OPS", "torch")
    gen = torch.Generator().manual_seed(14)
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    assert torch.autograd.gradcheck(lambda a, b, c, d: ops.repa_cosine_loss([a, c], [b, d]),
                                    (mk(2, 3, 4), mk(2, 3, 4), mk(2, 2, 6), mk(2, 2, 6)))


def test_repa_validation_errors():
    z = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="differ in shape"):
        ops.repa_cosine_loss(z, torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="one zs_tilde per zs"):
        ops.repa_cosine_loss([z, z], [z])
    with pytest.raises(ValueError, match="same batch size"):
        ops.repa_cosine_loss([z, torch.randn(3, 3, 8)], [z, torch.randn(3, 3, 8)])
    with pytest.raises(ValueError, match="3-D"):
        ops.repa_cosine_loss(z[0], z[0])
    with pytest.raises(TypeError, match="float32"):
        ops.repa_cosine_loss(z.int(), z.int())
    with pytest.raises(TypeError, match="list/tuple of tensors"):
        ops.repa_cosine_loss("z", z)


def test_repa_reference_refuses_what_the_fused_op_refuses():
    # The models call the reference directly when their fast path is off: it must not
    # broadcast mismatched pairs or drop an unpaired encoder silently.
    z = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"zs\[1\] \(2, 3, 8\) and zs_tilde\[1\] \(2, 1, 8\) differ in shape"):
        ops.repa_cosine_loss_reference([z, z], [z, z[:, :1]])
    with pytest.raises(ValueError, match="one zs_tilde per zs and at least one pair, got 2 and 1"):
        ops.repa_cosine_loss_reference([z, z], [z])
    with pytest.raises(ValueError, match="at least one pair, got 0 and 0"):
        ops.repa_cosine_loss_reference([], [])
    with pytest.raises(TypeError, match="list/tuple of tensors"):
        ops.repa_cosine_loss_reference(z, "z")


def test_sit_reference_path_is_the_ops_reference():
    # One REPA definition: the SiT off its fast path computes exactly the ops reference,
    # in fp32 for bf16 projector outputs.
    from repa_e_fast.models.sit import SiT

    torch.manual_seed(0)
    sit = SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
              z_dims=[8, 6], projector_dim=16, encoder_depth=1)
    zs = [torch.randn(2, 4, 8), torch.randn(2, 4, 6)]
    out = sit(torch.randn(2, 4, 4, 4), torch.tensor([1, 3]), zs)
    assert torch.equal(out["proj_loss"], ops.repa_cosine_loss_reference(zs, out["zs_tilde"]))
    bf16 = [t.bfloat16() for t in out["zs_tilde"]]
    loss = sit.projection_loss(zs, bf16)
    assert loss.dtype == torch.float32 and torch.equal(loss, ops.repa_cosine_loss_reference(zs, bf16))
