"""Model behaviour beyond the fixtures: every config builds and runs, switches agree,
initialisation is the official one, bad arguments fail clearly."""

import argparse
import warnings

import pytest
import torch

from repa_e_fast.models.attention import check_attention_kernel
from repa_e_fast.models.encoders import (DinoVisionTransformer, load_encoders, parse_enc_type,
                                         preprocess_raw_image, resample_pos_embed)
from repa_e_fast.models.lpips import LPIPS, vgg16_to_lpips_keys
from repa_e_fast.models.sit import SIT_MODEL_NAMES, SiT, build_sit, sincos_pos_embed_2d, timestep_frequency_embedding
from repa_e_fast.models.vae import build_vae, preprocess_images_for_vae


def tiny_sit(**overrides):
    kwargs = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                  num_classes=10, z_dims=[16], projector_dim=32, encoder_depth=2)
    kwargs.update(overrides)
    return SiT(**kwargs)


@pytest.mark.parametrize("name", SIT_MODEL_NAMES)
def test_every_sit_config_builds_with_expected_sizes(name):
    with torch.device("meta"):
        model = build_sit(name, input_size=32, in_channels=4)
    size, patch = name[4:].split("/")
    depth, hidden, heads = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}[size]
    assert len(model.blocks) == depth and model.pos_embed.shape == (1, (32 // int(patch)) ** 2, hidden)
    assert model.final_layer.linear.weight.shape == (int(patch) ** 2 * 4, hidden)
    assert model.blocks[0].attn.num_heads == heads


def test_sit_s_runs_forward_and_backward():
    # The official SiT-S configs crash (final layer built for width 768); ours run.
    torch.manual_seed(0)
    model = build_sit("SiT-S/8", input_size=16, in_channels=4, num_classes=10, z_dims=[8], encoder_depth=4,
                      projector_dim=16)
    model.train()
    out = model(torch.randn(2, 4, 16, 16), torch.tensor([1, 2]), [torch.randn(2, 4, 8)])
    (out["denoising_loss"].mean() + out["proj_loss"]).backward()
    assert out["model_output"].shape == (2, 4, 16, 16)
    # Gates start at zero (adaLN-Zero), so the first gradients reach the adaLN linears.
    assert model.blocks[0].adaLN_modulation[1].weight.grad.abs().sum() > 0


def test_official_initialisation_makes_identity_blocks_and_zero_output():
    torch.manual_seed(0)
    model = tiny_sit().eval()
    out = model.inference(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3]))
    assert torch.count_nonzero(out) == 0
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(32, 4).float())
    # created frozen; REPA-E unfreezes it (docs/numerics.md#pos_embed-is-trained)
    assert not model.pos_embed.requires_grad
    w = model.blocks[0].attn.qkv.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # Xavier-uniform on the full matrix


def test_spec_test_vectors():
    # Appendix B of the spec.
    table = sincos_pos_embed_2d(8, 2)
    expected_token1 = torch.tensor([0.841471, 0.01, 0.540302, 0.99995, 0, 0, 1, 1], dtype=torch.float64)
    assert torch.allclose(table[1], expected_token1, atol=1e-6)
    assert torch.allclose(table[2], expected_token1.roll(4), atol=1e-6)
    emb = timestep_frequency_embedding(torch.tensor([0.5]))
    assert emb[0, 0].item() == pytest.approx(0.877583, abs=1e-6)
    assert emb[0, 128].item() == pytest.approx(0.479426, abs=1e-6)
    assert emb[0, 255].item() == pytest.approx(5.373e-5, rel=1e-3)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_attention_backends_agree(qk_norm):
    torch.manual_seed(0)
    sdpa = tiny_sit(qk_norm=qk_norm, attention="sdpa").eval()
    math_kernel = tiny_sit(qk_norm=qk_norm, attention="math").eval()
    with torch.no_grad():
        for p in sdpa.parameters():
            p.normal_(0, 0.3)
    math_kernel.load_state_dict(sdpa.state_dict())
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    assert torch.allclose(sdpa.inference(x, t, y), math_kernel.inference(x, t, y), atol=1e-5)
    if qk_norm:
        assert "blocks.0.attn.q_norm.weight" in sdpa.state_dict()


def test_one_switch_sets_every_fast_path_and_attention_kernel():
    from repa_e_fast.models.attention import Attention
    from repa_e_fast.models.fast_path import FastPath, set_fast_path

    torch.manual_seed(0)
    sit = tiny_sit().eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    sdpa_out = sit.inference(x, t, y)
    switches = [m for m in sit.modules() if isinstance(m, FastPath)]
    assert len(switches) == 2 + len(sit.blocks)  # the SiT, its blocks and its final layer
    assert set_fast_path(sit, fused_ops=True, attention="math") is sit
    assert all(m.fused_ops for m in switches)
    assert {m.kernel for m in sit.modules() if isinstance(m, Attention)} == {"math"}
    sit.set_fused_ops(False)  # the attention kernel is left as it is
    assert not any(m.fused_ops for m in switches)
    assert {m.kernel for m in sit.modules() if isinstance(m, Attention)} == {"math"}
    assert torch.allclose(sit.inference(x, t, y), sdpa_out, atol=1e-5)
    with pytest.raises(ValueError, match="attention must be one of"):
        set_fast_path(sit, attention="fast")
    # fused_attn=False is honoured (the explicit formula), an unknown argument refused
    assert {m.kernel for m in tiny_sit(fused_attn=False).modules() if isinstance(m, Attention)} == {"math"}
    with pytest.raises(TypeError, match="fused_atn"):
        tiny_sit(fused_atn=False)


def test_missing_attention_package_is_a_clear_error():
    import importlib.util

    for kernel in ("flash_attn", "xformers"):
        if importlib.util.find_spec(kernel) is None:
            with pytest.raises(ValueError, match="not installed"):
                check_attention_kernel(kernel)
    with pytest.raises(ValueError, match="attention must be one of"):
        tiny_sit(attention="fast")


def test_init_bn_and_latent_stats_round_trip():
    model = tiny_sit()
    scale, bias = torch.tensor([0.5, 1.0, 2.0, 4.0]), torch.tensor([0.1, -0.2, 0.3, 0.0])
    model.init_bn(scale.view(1, 4, 1, 1), bias.view(1, 4, 1, 1))
    assert torch.allclose(model.bn.running_var, torch.tensor([4.0, 1.0, 0.25, 0.0625]))
    stats = model.extract_latents_stats()
    assert torch.allclose(stats["latents_scale"].flatten(), scale) and torch.equal(stats["latents_bias"].flatten(), bias)
    with pytest.raises(ValueError, match="channels"):
        model.init_bn(torch.ones(3), torch.zeros(3))


def test_bn_train_vs_eval_and_label_dropout_mode():
    torch.manual_seed(0)
    model = tiny_sit(class_dropout_prob=0.5)
    x = torch.randn(8, 4, 8, 8) * 3 + 1
    zs = [torch.randn(8, 16, 16)]
    model.train()
    model(x, torch.arange(8), zs)
    assert model.bn.num_batches_tracked.item() == 1
    expected_mean = 0.9 * 0 + 0.1 * x.mean(dim=(0, 2, 3))
    assert torch.allclose(model.bn.running_mean, expected_mean, atol=1e-6)
    before = model.bn.running_mean.clone()
    model.eval()
    labels = []
    model.y_embedder.embedding_table.register_forward_pre_hook(lambda _m, a: labels.append(a[0]))
    model(x, torch.arange(8), zs, align_only=True)
    assert torch.equal(model.bn.running_mean, before)
    assert torch.equal(labels[-1], torch.arange(8))  # no label dropout in eval mode


def test_sit_rejects_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="decoder_hidden_size"):
        tiny_sit(decoder_hidden_size=64)
    with pytest.raises(ValueError, match="encoder_depth"):
        tiny_sit(encoder_depth=4)
    with pytest.raises(ValueError, match="patch_size"):
        tiny_sit(patch_size=3)
    with pytest.raises(ValueError, match="unknown SiT model"):
        build_sit("SiT-M/2")
    model = tiny_sit()
    with pytest.raises(ValueError, match="8x8 latents"):
        model(torch.randn(1, 4, 16, 16), torch.tensor([0]), [torch.randn(1, 16, 16)])
    with pytest.raises(ValueError, match="projectors"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([0]), [])
    with pytest.raises(ValueError, match="path_type"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([0]), [torch.randn(1, 16, 16)], path_type="vp")


def test_align_only_can_skip_the_final_layer():
    torch.manual_seed(0)
    model = tiny_sit().eval()
    x, y, zs = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), [torch.randn(2, 16, 16)]
    t, noise = torch.rand(2, 1, 1, 1), torch.randn(2, 4, 8, 8)
    full = model(x, y, zs, align_only=True, time_input=t, noises=noise)
    fast = model(x, y, zs, align_only=True, time_input=t, noises=noise, align_only_final_layer=False)
    assert fast["model_output"] is None and torch.equal(full["proj_loss"], fast["proj_loss"])


def test_vae_layouts_shapes_and_errors():
    torch.manual_seed(0)
    for layout, latent in (("f8d4", (4, 4, 4)), ("f16d32", (32, 2, 2))):
        vae = build_vae(layout, ch=32).eval()
        images = preprocess_images_for_vae(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))
        posterior, z, recon = vae(images)
        assert z.shape == (1, *latent) and recon.shape == images.shape
        assert posterior.logvar.min() >= -30 and posterior.logvar.max() <= 20
        _, _, none = vae(images, decode=False)
        assert none is None
    with pytest.raises(ValueError, match="unknown VAE layout"):
        build_vae("f4d8")
    with pytest.raises(TypeError, match="uint8"):
        preprocess_images_for_vae(torch.zeros(1, 3, 8, 8))


def test_vae_nominal_resolution_decides_attention_placement():
    with torch.device("meta"):
        f8, f16 = build_vae("f8d4"), build_vae("f16d32")
    assert all(len(stage.attn) == 0 for stage in f8.encoder.down)
    assert len(f16.encoder.down[4].attn) == 2 and len(f16.decoder.up[4].attn) == 3


def test_dinov2_pos_embed_resampling_and_preprocessing():
    table = torch.randn(1, 1 + 37 * 37, 8)
    out = resample_pos_embed(table, 16)
    assert out.shape == (1, 257, 8) and torch.equal(out[:, 0], table[:, 0])
    assert resample_pos_embed(out, 16) is out
    images = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8)
    assert preprocess_raw_image(images, "dinov2", 512).shape == (1, 3, 448, 448)
    with pytest.raises(TypeError):
        preprocess_raw_image(images.float(), "dinov2")


def test_dinov2_registers_and_runtime_interpolation():
    torch.manual_seed(0)
    model = DinoVisionTransformer(32, 1, 2, "mlp", 14, num_register_tokens=4, grid=16).eval()
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 224, 224))
        other = model.forward_features(torch.randn(1, 3, 112, 112))  # 8x8 grid: interpolated table
    assert out["x_norm_regtokens"].shape == (1, 4, 32) and out["x_norm_patchtokens"].shape == (1, 256, 32)
    assert other["x_norm_patchtokens"].shape == (1, 64, 32)


def test_enc_type_parsing_and_missing_checkpoint(tmp_path):
    specs = parse_enc_type("dinov2-vit-b,dinov2reg-vit-l")
    assert [s.checkpoint_name for s in specs] == ["dinov2_vitb14_pretrain.pth", "dinov2_vitl14_reg4_pretrain.pth"]
    for bad in ("dinov2-vit", "dinov1-vit-b", "dinov2-vit-x"):
        with pytest.raises(ValueError):
            parse_enc_type(bad)
    with pytest.raises(FileNotFoundError, match="dinov2_vits14_pretrain.pth"):
        load_encoders("dinov2-vit-s", pretrained_dir=str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoders = load_encoders("dinov2-vit-s", pretrained_dir=str(tmp_path), allow_random=True)
    assert any("RANDOM encoder weights" in str(w.message) for w in caught)
    features = encoders[0](torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8))
    assert features.shape == (1, 256, 384)


def test_load_encoders_from_a_local_hub_checkpoint(tmp_path):
    # A ViT-S/14 checkpoint in the hub layout (37x37 table) loads and is resampled to 16x16.
    torch.manual_seed(0)
    from repa_e_fast.models.encoders import EncoderSpec, build_dinov2

    hub = build_dinov2(EncoderSpec("dinov2", "vit", "s"), grid=37)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(hub.state_dict(), path)
    (encoder,) = load_encoders("dinov2-vit-s", pretrained_dir=str(tmp_path))
    assert encoder.backbone.pos_embed.shape == (1, 257, 384)
    assert torch.equal(encoder.backbone.blocks[3].mlp.fc1.weight, hub.blocks[3].mlp.fc1.weight)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_lpips_from_torchvision_and_lin_files(tmp_path):
    torch.manual_seed(0)
    reference = LPIPS()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.05)
    vgg = {f"features.{k.split('.', 2)[2]}": v for k, v in reference.state_dict().items() if k.startswith("net.")}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)
    assert set(vgg16_to_lpips_keys(vgg)) == {k for k in reference.state_dict() if k.startswith("net.")}
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save({k: v for k, v in reference.state_dict().items() if k.startswith("lin")}, tmp_path / "vgg.pth")
    loaded = LPIPS.from_files(str(tmp_path / "vgg16.pth"), str(tmp_path / "vgg.pth"))
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded(a, b), reference(a, b))
    assert loaded(a, a).abs().max() == 0 and loaded(a, b).shape == (2, 1, 1, 1)
    loaded.train()
    assert not loaded.training  # LPIPS stays in eval mode (dropout off)
    with pytest.raises(FileNotFoundError, match="vgg.pth"):
        LPIPS.from_files(str(tmp_path / "vgg16.pth"), str(tmp_path / "missing" / "vgg.pth"))
