"""Our modules' state-dict keys and shapes equal the official manifests (built on meta)."""

import json
import os
import time

import pytest
import torch

from repa_e_fast.models.discriminator import NLayerDiscriminator
from repa_e_fast.models.encoder_checkpoints import clip_visual_to_state_dict, official_to_state_dict
from repa_e_fast.models.encoders import EncoderSpec, build_dinov2, build_encoder_backbone, parse_enc_type
from repa_e_fast.models.lpips import LPIPS
from repa_e_fast.models.sit import build_sit
from repa_e_fast.models.vae import build_vae

from _paths import MANIFESTS

SIT_KWARGS = dict(num_classes=1000, class_dropout_prob=0.1, z_dims=[768], encoder_depth=8, bn_momentum=0.1)


def dinov2(config, registers, grid):
    return lambda: build_dinov2(EncoderSpec("dinov2reg" if registers else "dinov2", "vit", config), grid=grid)


def encoder(enc_type):
    return lambda: build_encoder_backbone(parse_enc_type(enc_type)[0], grid=16)


BUILDERS = {
    "sit_xl_2_f8d4": lambda: build_sit("SiT-XL/2", input_size=32, in_channels=4, **SIT_KWARGS),
    "sit_xl_1_f16d32": lambda: build_sit("SiT-XL/1", input_size=16, in_channels=32, **SIT_KWARGS),
    "sit_b_2_f8d4": lambda: build_sit("SiT-B/2", input_size=32, in_channels=4, **SIT_KWARGS),
    "sit_l_2_f8d4": lambda: build_sit("SiT-L/2", input_size=32, in_channels=4, **SIT_KWARGS),
    "vae_f8d4": lambda: build_vae("f8d4"),
    "vae_f16d32": lambda: build_vae("f16d32"),
    "discriminator": NLayerDiscriminator,
    "lpips": LPIPS,
    "dinov2_vitb14_hub": dinov2("b", False, 37),
    "dinov2_vitl14_hub": dinov2("l", False, 37),
    "dinov2_vitg14_hub": dinov2("g", False, 37),
    "dinov2_vitb14_reg_hub": dinov2("b", True, 37),
    "dinov2_vitb14_repae_256": dinov2("b", False, 16),
    "dinov2_vitl14_repae_256": dinov2("l", False, 16),
    "dinov2_vitg14_repae_256": dinov2("g", False, 16),
    "dinov2_vitb14_reg_repae_256": dinov2("b", True, 16),
    # Same key names as the official encoder after load_encoders (timm layout).
    "mocov3_vits16_repae_256": encoder("mocov3-vit-s"),
    "mocov3_vitb16_repae_256": encoder("mocov3-vit-b"),
    "mocov3_vitl16_repae_256": encoder("mocov3-vit-l"),
    "mae_vitl16_repae_256": encoder("mae-vit-l"),
    "ijepa_vith14_repae_256": encoder("jepa-vit-h"),
}

# Official file layouts (and CLIP, whose keys we rename): manifest -> what the official
# loader reads -> our conversion -> strict load into our full-size encoder.
OFFICIAL_FILES = {
    "mocov3_vits16_checkpoint": ("mocov3-vit-s", lambda state: {"state_dict": state}),
    "mocov3_vitb16_checkpoint": ("mocov3-vit-b", lambda state: {"state_dict": state}),
    "mocov3_vitl16_checkpoint": ("mocov3-vit-l", lambda state: {"state_dict": state}),
    "mae_vitl16_checkpoint": ("mae-vit-l", lambda state: {"model": state}),
    "ijepa_vith14_checkpoint": ("jepa-vit-h", lambda state: {"encoder": state}),
    # clip.load(...).visual: the archive holds these keys under "visual." (with the text tower)
    "clip_vitl14_visual": ("clip-vit-L", lambda state: {f"visual.{k}": v for k, v in state.items()}),
}


def load_manifest(name):
    path = os.path.join(MANIFESTS, f"{name}.json")
    if not os.path.exists(path):
        pytest.skip(f"manifest {path} not present (it lives in ../shared beside the checkout)")
    with open(path) as handle:
        return json.load(handle)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_state_dict_matches_manifest(name):
    manifest = load_manifest(name)
    with torch.device("meta"):
        BUILDERS[name]()  # the first meta call of an init function imports torch internals (~1 s)
    start = time.perf_counter()
    with torch.device("meta"):
        module = BUILDERS[name]()
    elapsed = time.perf_counter() - start
    state = module.state_dict()
    assert list(state) == list(manifest), set(state).symmetric_difference(manifest)
    for key, entry in manifest.items():
        assert list(state[key].shape) == entry["shape"], key
        assert str(state[key].dtype).removeprefix("torch.") == entry["dtype"], key
    assert elapsed < 1.0, f"building {name} on meta took {elapsed:.2f}s"


def meta_state(manifest):
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    return {k: torch.empty(e["shape"], dtype=dtypes[e["dtype"]], device="meta") for k, e in manifest.items()}


def strict_meta_load(enc_type, state):
    with torch.device("meta"):
        module = encoder(enc_type)()
    module.load_state_dict(state, strict=True)  # raises on any missing/unexpected key or shape
    return module


@pytest.mark.parametrize("name", sorted(OFFICIAL_FILES))
def test_official_encoder_file_loads_strictly(name):
    enc_type, as_file = OFFICIAL_FILES[name]
    manifest = load_manifest(name)
    family = parse_enc_type(enc_type)[0].family
    state = official_to_state_dict(family, as_file(meta_state(manifest)), 16, name)
    module = strict_meta_load(enc_type, state)
    assert module.pos_embed.shape[1] == 256 + int(family != "jepa")
    # the ViT-L file's misnamed keys (docs/numerics.md#encoder-checkpoints-and-key-fixes) are really there
    if name == "mocov3_vitl16_checkpoint":
        assert "module.base_encoder.blocks.13.norm13.weight" in manifest
        assert "module.base_encoder.blocks.14.mlp.fc14.weight" in manifest


def test_clip_repae_encoder_maps_onto_ours():
    # REPA-E's UpdatedVisionTransformer: "model." + the visual keys; ln_post is our unused
    # `norm`, proj (image-text projection) is dropped.
    manifest = load_manifest("clip_vitl14_repae_256")
    state = clip_visual_to_state_dict(meta_state(manifest), 16, prefix="model.")
    assert len(state) == len(manifest) - 1 and "norm.weight" in state
    module = strict_meta_load("clip-vit-L", state)
    assert module.embed_dim == 1024 and module.blocks[0].attn.num_heads == 16


def test_encoder_manifest_index_is_covered():
    index = load_manifest("index_encoders")
    covered = set(BUILDERS) | set(OFFICIAL_FILES) | {"clip_vitl14_repae_256"}
    assert set(index) <= covered, set(index) - covered
    for name, entry in index.items():
        if name in BUILDERS:
            with torch.device("meta"):
                module = BUILDERS[name]()
            assert len(module.state_dict()) == entry["num_keys"], name
            assert sum(t.numel() for t in module.state_dict().values()) == entry["num_elements"], name


def test_manifest_index_is_covered():
    index = load_manifest("index")
    # Loss-module and torchvision manifests are the concern of the VAE loss (Core 2) and
    # of LPIPS key conversion (tested in test_models.py).
    covered = set(BUILDERS) | {"vae_loss_l1_lpips_kl_gan", "vae_loss_l1_lpips_kl_gan_lecam", "torchvision_vgg16"}
    assert set(index) <= covered, set(index) - covered
    for name, entry in index.items():
        if name in BUILDERS:
            with torch.device("meta"):
                module = BUILDERS[name]()
            assert len(module.state_dict()) == entry["num_keys"]
            assert sum(t.numel() for t in module.state_dict().values()) == entry["num_elements"], name
