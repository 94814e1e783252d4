"""Our modules' state-dict keys and shapes equal the official manifests (built on meta)."""

import json
import os
import time

import pytest
import torch

from repa_e_fast.models.discriminator import NLayerDiscriminator
from repa_e_fast.models.encoders import EncoderSpec, build_dinov2
from repa_e_fast.models.lpips import LPIPS
from repa_e_fast.models.sit import build_sit
from repa_e_fast.models.vae import build_vae

from _paths import MANIFESTS

SIT_KWARGS = dict(num_classes=1000, class_dropout_prob=0.1, z_dims=[768], encoder_depth=8, bn_momentum=0.1)


def dinov2(config, registers, grid):
    return lambda: build_dinov2(EncoderSpec("dinov2reg" if registers else "dinov2", "vit", config), grid=grid)


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
