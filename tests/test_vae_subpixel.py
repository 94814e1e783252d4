"""Opt-in sub-pixel upsample (lever 8): nearest-2x + 3x3 conv computed as one 2x2 conv on
the source grid equals the official op sequence (float64 exactly up to rounding, fp32
within rounding), in both memory formats; parity fixtures with it on."""


import pytest
import torch
import torch.nn.functional as F

from repa_e_fast.models.vae import AutoencoderKL, Upsample, subpixel_upsample_conv

from _paths import failed_parity_checks


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_subpixel_equals_upsample_then_conv_float64(channels_last):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 6, generator=gen, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = torch.randn(4, 5, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    reference = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    ours = subpixel_upsample_conv(x, weight, bias)
    assert ours.shape == (2, 4, 14, 12)
    assert ours.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    grad = torch.randn(reference.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(ours, (x, weight, bias), grad),
                    torch.autograd.grad(reference, (x, weight, bias), grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_vae_decoder_with_subpixel_upsample_fp32():
    torch.manual_seed(1)
    vae = AutoencoderKL(embed_dim=4, ch_mult=(1, 2, 2), ch=32, num_res_blocks=1, resolution=16, attn_resolutions=())
    z = torch.randn(2, 4, 4, 4)
    reference = vae.decode(z).sample
    fast = vae.set_subpixel_upsample(True).decode(z).sample
    assert all(m.subpixel for m in vae.modules() if isinstance(m, Upsample))
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    vae.set_subpixel_upsample(False)
    assert torch.equal(vae.decode(z).sample, reference)


@pytest.mark.parametrize("name", ["vae_forward.pt", "e2e_step.pt"])
def test_parity_fixtures_with_subpixel_upsample(monkeypatch, name):
    monkeypatch.setattr(Upsample, "subpixel", True)
    failed, _ = failed_parity_checks(name)
    assert not failed, "\n".join(failed[:20])
