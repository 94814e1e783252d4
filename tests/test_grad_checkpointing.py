"""--grad-checkpointing sit,vae: per-block activation checkpointing gives bitwise the
gradients and updates of the plain run (the same operations recomputed on the same inputs,
on CPU's deterministic kernels), and the blocks really are recomputed in the backward."""

import copy

import pytest
import torch

from repa_e_fast.config import ConfigError, parse_config
from repa_e_fast.models.checkpointing import enable_grad_checkpointing
from repa_e_fast.models.sit import SiT, SiTBlock
from repa_e_fast.models.vae import AttnBlock, AutoencoderKL, ResnetBlock
from test_step import batch, tiny_setup


def tiny_models():
    torch.manual_seed(0)
    sit = SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=5,
              z_dims=[8], projector_dim=16, encoder_depth=2)
    with torch.no_grad():
        for p in sit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vae = AutoencoderKL(embed_dim=4, ch_mult=(1, 2, 2, 2), ch=32, num_res_blocks=1, resolution=32)
    return sit, vae


def gradients(sit, vae):
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    noise = torch.randn(2, 4, 4, 4, generator=generator)
    zs = [torch.randn(2, 4, 8, generator=generator)]
    posterior, z, recon = vae(images, noise=torch.randn(2, 4, 4, 4, generator=generator))
    out = sit(z, torch.tensor([1, 3]), zs, time_input=torch.tensor([0.3, 0.8]).view(2, 1, 1, 1), noises=noise)
    loss = out["denoising_loss"].mean() + 0.5 * out["proj_loss"] + (recon - images).abs().mean()
    loss.backward()
    return {f"sit.{n}": p.grad for n, p in sit.named_parameters() if p.grad is not None} | \
        {f"vae.{n}": p.grad for n, p in vae.named_parameters() if p.grad is not None}


def test_checkpointed_gradients_are_bitwise_the_plain_ones(monkeypatch):
    sit, vae = tiny_models()
    plain = gradients(sit, vae)
    sit2, vae2 = tiny_models()
    counts = enable_grad_checkpointing(["sit", "vae"], sit=sit2, vae=vae2)
    vae_blocks = sum(isinstance(m, (ResnetBlock, AttnBlock)) for m in vae2.modules())
    assert counts == {"sit": 3, "vae": vae_blocks} and vae_blocks >= 10  # encoder, decoder, mid blocks
    calls = {"sit": 0, "vae": 0}
    sit_forward, vae_forward = SiTBlock.forward, ResnetBlock.forward

    def counted_sit(self, *args):
        calls["sit"] += 1
        return sit_forward(self, *args)

    def counted_vae(self, *args):
        calls["vae"] += 1
        return vae_forward(self, *args)

    monkeypatch.setattr(SiTBlock, "forward", counted_sit)
    monkeypatch.setattr(ResnetBlock, "forward", counted_vae)
    checkpointed = gradients(sit2, vae2)
    resnet_blocks = sum(isinstance(m, ResnetBlock) for m in vae2.modules())
    assert calls == {"sit": 2 * 3, "vae": 2 * resnet_blocks}  # each block ran again in the backward
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name
    # No gradient recorded: plain calls, nothing to recompute; state-dict keys unchanged.
    calls.update(sit=0, vae=0)
    with torch.no_grad():
        sit2(torch.randn(2, 4, 4, 4), torch.tensor([0, 1]), [torch.randn(2, 4, 8)])
    assert calls["sit"] == 3
    assert sit2.state_dict().keys() == sit.state_dict().keys()


def test_repae_steps_with_checkpointing_match_the_plain_run():
    """Two full REPA-E steps (the align pass calls the SiT with detached parameters: those
    blocks run plainly) give bitwise the same weights, optimizer moments and EMA."""
    results = []
    for checkpointing in (False, True):
        step, backend = tiny_setup()
        if checkpointing:
            enable_grad_checkpointing(["sit", "vae"], sit=backend.unwrap("sit"), vae=backend.unwrap("vae"))
        for index in range(2):
            images, labels, zs = batch(seed=index + 1)
            step(images, labels, index, zs=zs)
        results.append({**{f"{k}.{n}": v for k in backend.models for n, v in backend.unwrap(k).state_dict().items()},
                        **{f"ema.{n}": v for n, v in step.ema.state_dict().items()},
                        **{f"opt.{k}.{i}": s["exp_avg_sq"] for k, o in backend.optimizers.items()
                           for i, s in enumerate(o.state.values())}})
    plain, checkpointed = results
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name


def test_copies_keep_their_own_blocks():
    sit, _ = tiny_models()
    enable_grad_checkpointing(["sit"], sit=sit)
    copied = copy.deepcopy(sit)
    assert copied.blocks[0].forward.__self__ is copied.blocks[0]


def test_unknown_target_is_a_config_error():
    with pytest.raises(ConfigError, match="grad_checkpointing must be a comma list of sit, vae"):
        parse_config(["--grad-checkpointing", "sit,unet", "--vae-ckpt", "none", "--demo-dataset"])
