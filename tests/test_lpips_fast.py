"""The fast LPIPS (one 2B VGG batch, in-place ReLUs, one function per tap) against the
official op sequence: float64 equality, fp32 parity fixture, zero-feature pixels."""

import copy

import pytest
import torch

from repa_e_fast import parity
from repa_e_fast.losses.vae_loss import VAERegularizationLoss
from repa_e_fast.models.lpips import LPIPS, _TapDistance
from repa_e_fast.models.vae import DiagonalGaussianDistribution

from _paths import failed_parity_checks


def _perturbed_lpips():
    torch.manual_seed(0)
    model = LPIPS().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def test_fast_lpips_equals_reference_float64():
    reference = _perturbed_lpips()
    fast = copy.deepcopy(reference).set_fused_ops(True)
    gen = torch.Generator().manual_seed(1)
    real = torch.rand(2, 3, 24, 40, generator=gen, dtype=torch.float64) * 2 - 1
    fake = torch.rand(2, 3, 24, 40, generator=gen, dtype=torch.float64) * 2 - 1
    grads = []
    outputs = []
    for model in (reference, fast):
        x = fake.clone().requires_grad_(True)
        out = model(real, x)
        (out * torch.tensor([1.0, -2.0], dtype=torch.float64).view(2, 1, 1, 1)).sum().backward()
        outputs.append(out)
        grads.append(x.grad)
    assert outputs[1].shape == outputs[0].shape == (2, 1, 1, 1)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12 * grads[0].abs().max().item())
    assert grads[0].abs().max() > 0
    # set_fused_ops(False) gives back the official op sequence, bit for bit
    fast.set_fused_ops(False)
    assert not fast.net.fused_ops and torch.equal(fast(real, fake), reference(real, fake))


def test_tap_distance_gradcheck_and_zero_features():
    gen = torch.Generator().manual_seed(2)
    f0 = torch.rand(2, 5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    f1 = torch.rand(2, 5, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(1, 5, 1, 1, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: _TapDistance.apply(a, b, weight, 1e-10), (f0, f1))
    # A pixel whose features are all zero (a ReLU tap can be): there f / (||f|| + eps) has
    # the derivative 1/eps along every ray, and the gradient is finite (the reference's
    # autograd through sqrt(0) gives NaN there).
    f1 = f1.detach().clone()
    f1[0, :, 1, 2] = 0
    f1.requires_grad_(True)
    _TapDistance.apply(f0.detach(), f1, weight, 1e-10).sum().backward()
    assert torch.isfinite(f1.grad).all()
    a = f0[0, :, 1, 2] / f0[0, :, 1, 2].norm()
    expected = -2.0 / 12 * weight.flatten() * a / 1e-10  # dL/db at b = 0, b = f / eps
    torch.testing.assert_close(f1.grad[0, :, 1, 2], expected.detach(), rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="frozen"):
        _TapDistance.apply(f0, f1, weight.clone().requires_grad_(True), 1e-10)


def test_vae_loss_fast_lpips_fp32():
    torch.manual_seed(3)
    reference = VAERegularizationLoss()
    fast = copy.deepcopy(reference).set_fused_ops(True)
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    fake = torch.rand(2, 3, 32, 32) * 2 - 1
    moments = torch.randn(2, 8, 4, 4)
    results = []
    for module in (reference, fast):
        x = fake.clone().requires_grad_(True)
        loss, logs = module(real, x, DiagonalGaussianDistribution(moments), 0, "generator")
        loss.backward()
        results.append((logs["perceptual_loss"], x.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5 * results[0][1].abs().max().item())


def test_vae_loss_fixture_with_fast_lpips(monkeypatch):
    build = parity.build_vae_loss
    monkeypatch.setattr(parity, "build_vae_loss", lambda *args, **kwargs: build(*args, **kwargs).set_fused_ops(True))
    failed, count = failed_parity_checks("vae_loss.pt")
    assert not failed, "\n".join(failed)
    assert count >= 80
