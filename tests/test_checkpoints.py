"""Loading weights from local files: formats, wrappers, and clear errors."""

import argparse

import pytest
import torch
from safetensors.torch import save_file

from repa_e_fast.models.checkpoints import (CheckpointError, load_latents_stats, load_state_dict_file, load_weights)
from repa_e_fast.models.discriminator import NLayerDiscriminator


def disc():
    torch.manual_seed(0)
    return NLayerDiscriminator(ndf=8)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_round_trip_each_format(tmp_path, suffix):
    source = disc()
    path = tmp_path / f"d{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    target = NLayerDiscriminator(ndf=8)
    load_weights(target, str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_official_training_checkpoint_entry_and_wrappers(tmp_path):
    source = disc()
    wrapped = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    checkpoint = {"model": wrapped, "ema": source.state_dict(), "args": argparse.Namespace(model="SiT-XL/2"), "steps": 5}
    torch.save(checkpoint, tmp_path / "0000005.pt")
    target = NLayerDiscriminator(ndf=8)
    load_weights(target, str(tmp_path / "0000005.pt"), key="model")
    assert torch.equal(target.main[0].weight, source.main[0].weight)
    with pytest.raises(CheckpointError, match="no entry 'vae'"):
        load_state_dict_file(str(tmp_path / "0000005.pt"), key="vae")


def test_missing_unexpected_and_mismatched_keys_are_listed(tmp_path):
    state = disc().state_dict()
    state.pop("main.0.bias")
    state["main.99.weight"] = torch.zeros(1)
    state["main.2.weight"] = torch.zeros(3, 3, 4, 4)
    torch.save(state, tmp_path / "bad.pt")
    target = NLayerDiscriminator(ndf=8)
    before = target.main[2].weight.clone()
    with pytest.raises(CheckpointError) as error:
        load_weights(target, str(tmp_path / "bad.pt"), name="discriminator")
    message = str(error.value)
    assert "missing keys (1): main.0.bias" in message
    assert "unexpected keys (1): main.99.weight" in message
    assert "main.2.weight: checkpoint (3, 3, 4, 4) vs model (16, 8, 4, 4)" in message
    assert str(tmp_path / "bad.pt") in message
    assert torch.equal(target.main[2].weight, before)  # nothing was loaded


def test_missing_file_and_garbage_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_weights(disc(), str(tmp_path / "nope.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="could not read"):
        load_state_dict_file(str(tmp_path / "garbage.pt"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_state_dict_file(str(tmp_path / "list.pt"))


def test_latents_stats_file(tmp_path):
    path = tmp_path / "sdvae-f8d4-latents-stats.pt"
    torch.save({"latents_scale": torch.ones(1, 4, 1, 1) * 2, "latents_bias": torch.zeros(1, 4, 1, 1)}, path)
    stats = load_latents_stats(str(path))
    assert stats["latents_scale"].shape == (1, 4, 1, 1) and stats["latents_scale"].sum() == 8
    with pytest.raises(FileNotFoundError, match="latents-stats"):
        load_latents_stats(str(tmp_path / "other-latents-stats.pt"))
