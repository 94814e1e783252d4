"""The REPA target encoders beyond DINOv2 (MoCo v3, MAE, I-JEPA, CLIP): enc_type parsing,
official file layouts read from ``pretrained/``, preprocessing, several encoders at once.
Numerics against the official code: tests/test_parity_fixtures.py (fixture kind ``encoder``)."""

import os
import pickle
import zipfile
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from repa_e_fast.models import encoders as enc
from repa_e_fast.models.checkpoints import CheckpointError
from repa_e_fast.models.encoder_checkpoints import (mocov3_to_state_dict, read_official_checkpoint,
                                                     read_torchscript_state_dict)
from repa_e_fast.models.encoders import build_backbone, load_encoders, parse_enc_type, preprocess_raw_image

from _paths import fixture


def raw_images(batch=1, size=256, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def randomize(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return module


# ----------------------------------------------------------------------------------------
# enc_type
# ----------------------------------------------------------------------------------------
def test_every_official_enc_type_parses_with_its_file_and_width():
    specs = parse_enc_type("mocov3-vit-s,mocov3-vit-b,mocov3-vit-l,mae-vit-l,jepa-vit-h,clip-vit-L,dinov2reg-vit-g")
    assert [s.family for s in specs] == ["mocov3", "mocov3", "mocov3", "mae", "jepa", "clip", "dinov2"]
    assert [s.checkpoint_name for s in specs] == [
        "mocov3_vits.pth", "mocov3_vitb.pth", "mocov3_vitl.pth", "mae_vitl.pth", "ijepa_vith.pth", "ViT-L-14.pt",
        "dinov2_vitg14_reg4_pretrain.pth"]
    assert [s.embed_dim for s in specs] == [384, 768, 1024, 1024, 1280, 1024, 1536]
    assert str(specs[5]) == "clip-vit-L"


@pytest.mark.parametrize("enc_type, message", [
    ("dinov1-vit-b", "models/dinov1.py, which is not in the repository"),
    ("clip-vit-B", "'ViT-B/14', a model openai/CLIP does not have"),
    ("mocov3-resnet-b", "NotImplementedError"),
    ("mae-vit-b", "always builds MAE ViT-L/16"),
    ("jepa-vit-l", "always builds I-JEPA ViT-H/14"),
    ("mocov3-vit-g", "use mocov3-vit-s, mocov3-vit-b, mocov3-vit-l"),
    ("simclr-vit-b", "unknown encoder type 'simclr'"),
])
def test_families_the_official_code_cannot_run_are_one_clear_line(enc_type, message):
    with pytest.raises(ValueError) as error:
        parse_enc_type(f"dinov2-vit-b,{enc_type}")
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("enc_type, file, origin", [
    ("mocov3-vit-l", "mocov3_vitl.pth", "facebookresearch/moco-v3"),
    ("mae-vit-l", "mae_vitl.pth", "mae_pretrain_vit_large.pth"),
    ("jepa-vit-h", "ijepa_vith.pth", "IN1K-vit.h.14-300e.pth.tar"),
    ("clip-vit-L", "ViT-L-14.pt", "clip.load('ViT-L/14')"),
])
def test_missing_file_error_names_the_file_and_where_it_comes_from(tmp_path, enc_type, file, origin):
    with pytest.raises(FileNotFoundError) as error:
        load_encoders(enc_type, pretrained_dir=str(tmp_path))
    assert str(tmp_path / file) in str(error.value) and origin in str(error.value)


# ----------------------------------------------------------------------------------------
# Preprocessing (docs/numerics.md#encoder-preprocessing-per-family)
# ----------------------------------------------------------------------------------------
def test_preprocessing_per_family():
    images = raw_images(2)
    x = images.float() / 255

    def normalize(t, mean, std):
        return (t - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    imagenet = normalize(x, enc.IMAGENET_MEAN, enc.IMAGENET_STD)
    assert torch.equal(preprocess_raw_image(images, "mocov3"), imagenet)  # no resize
    assert torch.equal(preprocess_raw_image(images, "mae"), imagenet)
    jepa = preprocess_raw_image(images, "jepa")
    assert torch.equal(jepa, F.interpolate(imagenet, 224, mode="bicubic"))
    assert torch.equal(jepa, preprocess_raw_image(images, "dinov2"))
    clip = preprocess_raw_image(images, "clip")  # resize FIRST, then CLIP statistics
    assert torch.equal(clip, normalize(F.interpolate(x, 224, mode="bicubic"), enc.CLIP_MEAN, enc.CLIP_STD))
    with pytest.raises(ValueError, match="dinov1"):
        preprocess_raw_image(images, "dinov1")


# ----------------------------------------------------------------------------------------
# Targets: which tokens, with or without the final norm (docs/numerics.md#encoder-targets)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, prefix, final_norm", [
    ("mocov3", 1, True), ("mae", 1, False), ("jepa", 0, True), ("clip", 1, False)])
def test_repa_target_tokens(family, prefix, final_norm):
    torch.manual_seed(0)
    model = randomize(build_backbone(family, 64, 1, 1, grid=4)).eval()
    size = 4 * enc.PATCH_SIZES[family]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        tokens = model.forward_tokens(x)
        target = model.repa_target(x)
    assert tokens.shape == (2, prefix + 16, 64) and target.shape == (2, 16, 64)
    expected = (model.norm(tokens) if final_norm else tokens)[:, prefix:]
    assert torch.equal(target, expected)


def test_clip_block_uses_quick_gelu_and_no_patch_bias():
    model = build_backbone("clip", 64, 1, 1, grid=2)
    assert model.patch_embed.proj.bias is None and model.norm.eps == 1e-5
    x = torch.randn(5)
    assert torch.allclose(model.blocks[0].mlp.act(x), x * torch.sigmoid(1.702 * x))
    assert "norm_pre.weight" in model.state_dict()


# ----------------------------------------------------------------------------------------
# Official file layouts
# ----------------------------------------------------------------------------------------
def tiny_mocov3_file(depth=15, dim=32, heads=2, seed=0):
    """A MoCo v3 training checkpoint (224 px: 14x14 table) of a tiny ViT with the ViT-L
    naming bug in blocks 13/14, a projection head, a momentum encoder and a predictor."""
    base = randomize(build_backbone("mocov3", dim, depth, heads, grid=14), seed)
    state = OrderedDict()
    for key, value in base.state_dict().items():
        for right, wrong in (("blocks.13.norm1", "blocks.13.norm13"), ("blocks.13.mlp.fc1", "blocks.13.mlp.fc13"),
                             ("blocks.14.norm2", "blocks.14.norm14"), ("blocks.14.mlp.fc2", "blocks.14.mlp.fc14")):
            key = key.replace(right, wrong)
        state[f"module.base_encoder.{key}"] = value
        state[f"module.momentum_encoder.{key}"] = value + 1
    state["module.base_encoder.head.0.weight"] = torch.ones(8, dim)
    state["module.predictor.0.weight"] = torch.ones(8, 8)
    return base, {"state_dict": state, "epoch": 300, "arch": "vit_large"}


def test_mocov3_file_keys_are_repaired_and_the_table_resampled():
    base, raw = tiny_mocov3_file()
    state = mocov3_to_state_dict(raw, grid=16)
    target = build_backbone("mocov3", 32, 15, 2, grid=16)
    target.load_state_dict(state, strict=True)
    assert torch.equal(target.blocks[13].norm1.weight, base.blocks[13].norm1.weight)
    assert torch.equal(target.blocks[14].mlp.fc2.weight, base.blocks[14].mlp.fc2.weight)
    assert torch.equal(target.pos_embed[:, 0], base.pos_embed[:, 0])  # cls row kept
    expected = F.interpolate(base.pos_embed[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2), size=(16, 16),
                             mode="bicubic", antialias=True, align_corners=False)
    assert torch.equal(target.pos_embed[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 256, 32))


def test_load_encoders_reads_the_official_files(tmp_path, monkeypatch):
    # Tiny sizes stand in for the full ones; the files are in the official layouts. At 64 px
    # the token grid is 4x4: the MoCo v3 table is resampled 14x14 -> 4x4, the I-JEPA table
    # (written at 4x4, no cls row) stays as it is.
    monkeypatch.setitem(enc.FAMILY_ARCHS["mocov3"], "l", (32, 15, 2))
    monkeypatch.setitem(enc.FAMILY_ARCHS["jepa"], "h", (32, 2, 2))
    base, raw = tiny_mocov3_file()
    torch.save(raw, tmp_path / "mocov3_vitl.pth")
    jepa = randomize(build_backbone("jepa", 32, 2, 2, grid=4), seed=1)
    ddp = {f"module.{k}": v for k, v in jepa.state_dict().items()}
    torch.save({"encoder": ddp, "predictor": {}, "epoch": 300, "lr": 1e-3}, tmp_path / "ijepa_vith.pth")

    mocov3, ijepa = load_encoders("mocov3-vit-l,jepa-vit-h", resolution=64, pretrained_dir=str(tmp_path))
    assert torch.equal(ijepa.backbone.pos_embed, jepa.pos_embed)
    assert torch.equal(mocov3.backbone.blocks[13].norm1.weight, base.blocks[13].norm1.weight)
    images = raw_images(2, 64)
    with torch.no_grad():
        expected = jepa.eval().repa_target(preprocess_raw_image(images, "jepa", 64))
        assert torch.equal(ijepa(images), expected)
        assert mocov3(images).shape == (2, 16, 32)
    assert not any(p.requires_grad for p in mocov3.parameters()) and not mocov3.training

    torch.save({"model": jepa.state_dict()}, tmp_path / "wrong_entry.pth")
    with pytest.raises(CheckpointError, match="has no 'encoder' entry .found .'model'.."):
        load_encoders("jepa-vit-h", 64, checkpoint_paths=[str(tmp_path / "wrong_entry.pth")])


def test_several_encoders_at_once_give_one_target_each(tmp_path, monkeypatch):
    monkeypatch.setitem(enc.DINOV2_ARCHS, "s", (32, 1, 2, "mlp"))
    monkeypatch.setitem(enc.FAMILY_ARCHS["clip"], "l", (64, 1, 1))
    with pytest.warns(UserWarning, match="RANDOM encoder weights"):
        encoders = load_encoders("dinov2-vit-s,clip-vit-L", resolution=64, pretrained_dir=str(tmp_path),
                                 allow_random=True)
    assert [e.embed_dim for e in encoders] == [32, 64]
    targets = [e(raw_images(2, 64)) for e in encoders]
    assert [t.shape for t in targets] == [(2, 16, 32), (2, 16, 64)]  # 4x4 tokens each at 64 px


# ----------------------------------------------------------------------------------------
# CLIP's TorchScript archive
# ----------------------------------------------------------------------------------------
class _ClipBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, width // 64)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        return x + self.mlp(self.ln_2(x))


class _ClipTransformer(nn.Module):
    def __init__(self, width, layers):
        super().__init__()
        self.resblocks = nn.Sequential(*[_ClipBlock(width) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class _ClipVisual(nn.Module):
    """openai/CLIP's VisionTransformer state-dict layout (tiny)."""

    def __init__(self, width=64, layers=2, patch=14, grid=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _ClipTransformer(width, layers)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, 32))

    def forward(self, x):
        return self.transformer(self.ln_pre(self.conv1(x).flatten(2).transpose(1, 2)))


class _Clip(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = _ClipVisual()
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, x):
        return self.visual(x) * self.logit_scale


def test_clip_archive_is_read_without_running_it(tmp_path):
    torch.manual_seed(0)
    model = randomize(_Clip()).half()  # the released archive stores fp16
    path = tmp_path / "ViT-L-14.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    state = read_official_checkpoint(str(path))
    expected = model.state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) and state[k].dtype == torch.float16 for k in expected)

    # The same weights through load_encoders: the conversion applied to our ViT reproduces a
    # direct computation with CLIP's own module layout (ln_pre, blocks, no ln_post, cls dropped).
    encoder = build_backbone("clip", 64, 2, 1, grid=16)
    enc.load_official_state_dict(encoder, "clip", state, "archive")
    assert torch.equal(encoder.cls_token.view(-1), model.visual.class_embedding.float())
    assert torch.equal(encoder.blocks[1].attn.qkv.weight, model.visual.transformer.resblocks[1].attn.in_proj_weight.float())
    assert torch.equal(encoder.norm.weight, model.visual.ln_post.weight.float())

    # A plain state dict of the vision tower alone (torch.save(model.visual.state_dict())) works too.
    torch.save(model.visual.state_dict(), tmp_path / "visual.pt")
    plain = build_backbone("clip", 64, 2, 1, grid=16)
    enc.load_official_state_dict(plain, "clip", read_official_checkpoint(str(tmp_path / "visual.pt")), "visual")
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), encoder.state_dict().values()))


def test_torchscript_reader_refuses_anything_but_tensors(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(Payload(), protocol=2))
        archive.writestr("evil/constants.pkl", pickle.dumps(()))
    with pytest.raises(CheckpointError, match="refers to (posix|os|nt).system"):
        read_torchscript_state_dict(str(path))
    assert not (tmp_path / "pwned").exists()


# ----------------------------------------------------------------------------------------
# The official fixtures' files through load_encoders (file names, families, sizes)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["encoder_mocov3.pt", "encoder_mae.pt", "encoder_jepa.pt", "encoder_clip.pt"])
def test_load_encoders_on_the_fixture_files(tmp_path, monkeypatch, name):
    path = fixture(name)
    if not os.path.exists(path):
        pytest.skip(f"reference fixture {path} not present (it lives in ../shared beside the checkout)")
    data = torch.load(path, map_location="cpu", weights_only=True)
    config = data["config"]
    (spec,) = parse_enc_type(config["enc_type"])
    if spec.family == "clip":
        visual = config["visual_kwargs"]
        sizes = (visual["width"], visual["layers"], visual["heads"])
    else:
        sizes = tuple(config["kwargs"][k] for k in ("embed_dim", "depth", "num_heads"))
    monkeypatch.setitem(enc.FAMILY_ARCHS[spec.family], spec.config, sizes)
    torch.save(data["raw_checkpoint"], tmp_path / spec.checkpoint_name)
    (encoder,) = load_encoders(config["enc_type"], pretrained_dir=str(tmp_path))
    assert encoder.embed_dim == config["z_dim"]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        target = encoder(data["inputs"]["raw_uint8"])
    finally:
        torch.set_num_threads(previous)
    assert torch.allclose(target, data["outputs"]["zs"][0], atol=2e-5, rtol=1e-4)
