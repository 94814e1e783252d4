"""The REPA-E and LDM-only steps beyond the fixture: gradient routing, no requires_grad
toggling, accumulation, precisions, EMA."""

import copy

import pytest
import torch

from repa_e_fast.engine.backends import SingleProcessBackend, build_adamw
from repa_e_fast.engine.ema import update_ema
from repa_e_fast.engine.step import LDMStep, REPAEStep, StepConfig, frozen_call
from repa_e_fast.losses.vae_loss import VAELossConfig, VAERegularizationLoss
from repa_e_fast.models.sit import SiT
from repa_e_fast.models.vae import AutoencoderKL


def tiny_setup(precision="fp32", accumulation=1, lecam=0.0, seed=0):
    torch.manual_seed(seed)
    sit = SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
              z_dims=[8], projector_dim=16, encoder_depth=1)
    with torch.no_grad():  # leave the zero init so every path carries gradient
        for p in sit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ema = copy.deepcopy(sit).requires_grad_(False)
    vae = AutoencoderKL(embed_dim=4, ch_mult=(1, 2, 2, 2), ch=32, num_res_blocks=1, resolution=32)
    loss_fn = VAERegularizationLoss(VAELossConfig(lecam_regularization_weight=lecam))
    optimizers = {"sit": build_adamw(sit), "vae": build_adamw(vae), "vae_loss": build_adamw(loss_fn)}
    backend = SingleProcessBackend({"sit": sit, "vae": vae, "vae_loss": loss_fn}, optimizers, precision, accumulation)
    return REPAEStep(backend, ema), backend


def batch(seed=1, size=2):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=gen)
    return images, torch.tensor([1, 3, 0, 2][:size]), [torch.randn(size, 4, 8, generator=gen)]


def test_step_logs_the_official_values_and_updates_everything():
    step, backend = tiny_setup()
    sit, vae, loss_fn = (backend.models[k] for k in ("sit", "vae", "vae_loss"))
    before = {k: copy.deepcopy(m.state_dict()) for k, m in backend.models.items()}
    ema_before = copy.deepcopy(step.ema.state_dict())
    images, labels, zs = batch()
    logs = step(images, labels, 0, zs=zs)
    expected = {"sit_loss", "denoising_loss", "proj_loss", "grad_norm_sit", "vae_loss", "reconstruction_loss",
                "perceptual_loss", "kl_loss", "weighted_gan_loss", "discriminator_factor", "gan_loss", "d_weight",
                "grad_norm_vae", "vae_align_loss", "d_loss", "grad_norm_disc", "logits_real", "logits_fake", "lecam_loss"}
    assert set(logs) == expected
    assert all(torch.isfinite(v) for v in logs.values())
    assert torch.allclose(logs["sit_loss"], logs["denoising_loss"] + 0.5 * logs["proj_loss"])
    changed = lambda name, key: not torch.equal(backend.models[name].state_dict()[key], before[name][key])  # noqa: E731
    assert changed("sit", "pos_embed")  # trained in REPA-E (docs/numerics.md#pos_embed-is-trained)
    assert changed("vae", "encoder.conv_in.weight") and changed("vae", "decoder.conv_out.weight")
    assert changed("vae_loss", "discriminator.main.0.weight")
    assert not changed("vae_loss", "perceptual_loss.lpips.lin0.model.1.weight") and not changed("vae_loss", "logvar")
    assert sit.bn.num_batches_tracked.item() == 1  # only pass (C) updates the latent BN
    assert loss_fn.discriminator.main[3].num_batches_tracked.item() == 3  # fake (A), real + fake (B)
    ema_now = step.ema.state_dict()
    key = "blocks.0.attn.qkv.weight"
    assert torch.allclose(ema_now[key], 0.9999 * ema_before[key] + 0.0001 * sit.state_dict()[key], atol=1e-7)


def test_align_pass_gives_sit_no_gradient_and_toggles_nothing():
    step, backend = tiny_setup()
    sit = backend.models["sit"]
    flags = {n: p.requires_grad for n, p in sit.named_parameters()}
    fired = []
    for name, p in sit.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _p, name=name: fired.append(name))
    images, labels, zs = batch()
    step(images, labels, 0, zs=zs)
    # Each SiT parameter's hook fires exactly once: in pass (C), never in the align pass.
    assert sorted(fired) == sorted(n for n, _ in sit.named_parameters())
    assert {n: p.requires_grad for n, p in sit.named_parameters()} == {**flags, "pos_embed": True}


def test_frozen_call_reaches_inputs_only():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3, requires_grad=True)
    frozen_call(layer, x).sum().backward()
    assert layer.weight.grad is None and x.grad is not None
    assert torch.allclose(x.grad, layer.weight.sum(0).expand(4, 3))


def test_gradient_accumulation_updates_every_second_micro_step():
    step, backend = tiny_setup(accumulation=2)
    sit = backend.models["sit"]
    images, labels, zs = batch()
    w0 = sit.blocks[0].attn.qkv.weight.detach().clone()
    logs = step(images, labels, 0, zs=zs)
    assert "grad_norm_sit" not in logs and torch.equal(sit.blocks[0].attn.qkv.weight, w0)
    assert sit.blocks[0].attn.qkv.weight.grad is not None  # accumulated, not stepped
    logs = step(images, labels, 0, zs=zs)
    assert "grad_norm_sit" in logs and not torch.equal(sit.blocks[0].attn.qkv.weight, w0)
    assert sit.blocks[0].attn.qkv.weight.grad is None
    assert backend.optimizers["sit"].state_dict()["state"][0]["step"].item() == 1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_run_with_fp32_master_state(precision):
    step, backend = tiny_setup(precision=precision)
    images, labels, zs = batch()
    for index in range(3):
        logs = step(images, labels, index, zs=zs)
        assert all(torch.isfinite(v) for k, v in logs.items() if not k.startswith("grad_norm"))
    # fp16: the shared scaler starts at 2^16; an overflow (non-finite grad norm) skips that
    # optimizer's step and halves the scale, as in the official run.
    assert all(torch.isfinite(v) for v in logs.values())
    assert all(p.dtype == torch.float32 for m in backend.models.values() for p in m.parameters())
    assert (backend.scaler is not None) == (precision == "fp16")
    if precision == "fp16":
        assert backend.scaler.get_scale() <= 2.0**16


def test_lecam_buffers_move_and_wrong_inputs_fail():
    step, backend = tiny_setup(lecam=0.001)
    images, labels, zs = batch()
    logs = step(images, labels, 0, zs=zs)
    assert logs["lecam_loss"] > 0 and backend.models["vae_loss"].ema_real_logits_mean.abs().item() > 0
    with pytest.raises(TypeError, match="uint8"):
        step(images.float(), labels, 1, zs=zs)


def test_update_ema_semantics():
    torch.manual_seed(0)
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(1.0)
        model.num_batches_tracked.fill_(7)
    update_ema(ema, model, decay=0.9)
    assert torch.allclose(ema.weight, torch.full((3,), 0.9 + 0.2))
    assert torch.allclose(ema.running_mean, torch.full((3,), 0.1))
    assert ema.num_batches_tracked.item() == 7
    update_ema(ema, model, decay=0.0)
    assert torch.equal(ema.weight, model.weight) and torch.equal(ema.running_mean, model.running_mean)


def test_ldm_step_keeps_latent_statistics_and_pos_embed_fixed():
    torch.manual_seed(0)
    sit = SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
              z_dims=[8], projector_dim=16, encoder_depth=1)
    sit.init_bn(torch.full((4,), 2.0), torch.zeros(4))
    ema = copy.deepcopy(sit).requires_grad_(False)
    backend = SingleProcessBackend({"sit": sit}, {"sit": build_adamw(sit)})
    step = LDMStep(backend, ema)
    pos_before = sit.pos_embed.detach().clone()
    moments = torch.cat([torch.randn(2, 4, 4, 4), torch.rand(2, 4, 4, 4)], dim=1)
    logs = step(moments, torch.tensor([0, 4]), zs=[torch.randn(2, 4, 8)])
    assert set(logs) == {"grad_norm_sit", "sit_loss", "denoising_loss", "proj_loss"}
    assert sit.bn.num_batches_tracked.item() == 0 and torch.allclose(sit.bn.running_var, torch.full((4,), 0.25))
    assert sit.pos_embed.grad is None and torch.equal(sit.pos_embed, pos_before)  # frozen in LDM-only
    with pytest.raises(ValueError, match="zs"):
        step(moments, torch.tensor([0, 4]))


def test_backend_rejects_bad_settings():
    step, backend = tiny_setup()
    with pytest.raises(ValueError, match="precision"):
        SingleProcessBackend(backend.models, backend.optimizers, precision="fp8")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        SingleProcessBackend(backend.models, backend.optimizers, gradient_accumulation_steps=0)
