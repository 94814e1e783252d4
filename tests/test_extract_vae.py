"""extract_vae.py (docs/workflows.md#repa_e_fastextract_vae): the three files, their contents
(VAE weights that load strictly into build_vae, latent statistics from the EMA BatchNorm
buffers, the discriminator), atomic writes, the official flag names, and errors."""

import argparse
import os

import pytest
import torch

from repa_e_fast import extract_vae
from repa_e_fast.models import NLayerDiscriminator, build_vae
from repa_e_fast.models.checkpoints import load_state_dict_strict


@pytest.fixture(scope="module")
def repae_checkpoint(tmp_path_factory):
    """A REPA-E checkpoint with the entries extraction reads. The live model's BN buffers
    differ from the EMA's, so a test can tell which ones were used."""
    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    vae = build_vae("f8d4", ch=32)
    discriminator = NLayerDiscriminator(ndf=8)
    ema_bn = {"bn.running_mean": torch.randn(4), "bn.running_var": torch.rand(4) + 0.5,
              "bn.num_batches_tracked": torch.tensor(7)}
    live_bn = {key: value + 1 for key, value in ema_bn.items()}
    path = root / "exp" / "checkpoints" / "0000010.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": live_bn, "ema": ema_bn, "vae": vae.state_dict(), "discriminator": discriminator.state_dict(),
                "args": argparse.Namespace(vae="f8d4"), "steps": 10}, path)
    return path, vae, discriminator, ema_bn


def test_extracts_vae_statistics_and_discriminator(repae_checkpoint, tmp_path):
    path, vae, discriminator, ema_bn = repae_checkpoint
    paths = extract_vae.extract_vae(str(path), str(tmp_path), "e2e-tiny")
    folder = tmp_path / "e2e-tiny"
    assert sorted(os.listdir(folder)) == ["e2e-tiny-discriminator-ckpt.pt", "e2e-tiny-latents-stats.pt", "e2e-tiny.pt"]
    assert paths["vae"] == str(folder / "e2e-tiny.pt")

    # The VAE file loads strictly into build_vae and reproduces the checkpoint's VAE.
    loaded = build_vae("f8d4", ch=32)
    load_state_dict_strict(loaded, torch.load(folder / "e2e-tiny.pt", weights_only=True), "extracted VAE")
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(image).mode()).sample,
                                   vae.decode(vae.encode(image).mode()).sample, rtol=0, atol=0)

    # Statistics from the EMA BN (not the live model's): scale = rsqrt(var), bias = mean, [1, C, 1, 1].
    stats = torch.load(folder / "e2e-tiny-latents-stats.pt", weights_only=True)
    assert sorted(stats) == ["latents_bias", "latents_scale"]
    assert stats["latents_scale"].shape == (1, 4, 1, 1) and stats["latents_bias"].shape == (1, 4, 1, 1)
    torch.testing.assert_close(stats["latents_scale"].flatten(), 1 / ema_bn["bn.running_var"].sqrt())
    torch.testing.assert_close(stats["latents_bias"].flatten(), ema_bn["bn.running_mean"], rtol=0, atol=0)

    disc = NLayerDiscriminator(ndf=8)
    load_state_dict_strict(disc, torch.load(folder / "e2e-tiny-discriminator-ckpt.pt", weights_only=True), "disc")
    for key, value in discriminator.state_dict().items():
        assert torch.equal(disc.state_dict()[key], value)
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]  # no temporary files left


def test_command_line_with_official_flag_names(repae_checkpoint, tmp_path, capsys):
    path = repae_checkpoint[0]
    assert extract_vae.main(["--repae-ckpt", str(path), "--vae-name", "e2e-x", "--save-dir", str(tmp_path)]) == 0
    assert "saved vae:" in capsys.readouterr().out and (tmp_path / "e2e-x" / "e2e-x.pt").is_file()
    # --exp-path / --train-steps find the same checkpoint.
    exp = path.parent.parent
    assert extract_vae.main(["--exp-path", str(exp), "--train-steps", "10", "--name", "e2e-y",
                             "--save-dir", str(tmp_path)]) == 0
    assert torch.equal(torch.load(tmp_path / "e2e-y" / "e2e-y-latents-stats.pt")["latents_scale"],
                       torch.load(tmp_path / "e2e-x" / "e2e-x-latents-stats.pt")["latents_scale"])


def test_errors_are_reported_before_anything_is_written(repae_checkpoint, tmp_path, capsys):
    path, vae, _, ema_bn = repae_checkpoint
    ldm_only = tmp_path / "ldm.pt"
    torch.save({"ema": ema_bn, "args": {"vae": "f8d4"}}, ldm_only)
    assert extract_vae.main(["--ckpt", str(ldm_only), "--name", "n", "--save-dir", str(tmp_path / "out")]) == 2
    assert "has no 'vae' entry" in capsys.readouterr().err

    no_disc = tmp_path / "no-disc.pt"
    torch.save({"ema": ema_bn, "vae": vae.state_dict()}, no_disc)
    assert extract_vae.main(["--ckpt", str(no_disc), "--name", "n", "--save-dir", str(tmp_path / "out")]) == 2
    assert "--no-discriminator" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # Without the discriminator on request; the layout comes from the VAE's latent width.
    assert extract_vae.main(["--ckpt", str(no_disc), "--name", "n", "--save-dir", str(tmp_path / "out"),
                             "--no-discriminator"]) == 0
    assert sorted(os.listdir(tmp_path / "out" / "n")) == ["n-latents-stats.pt", "n.pt"]

    broken = tmp_path / "broken.pt"
    state = vae.state_dict()
    state.pop("decoder.conv_out.bias")
    torch.save({"ema": ema_bn, "vae": state, "discriminator": {}}, broken)
    assert extract_vae.main(["--ckpt", str(broken), "--name", "b", "--save-dir", str(tmp_path / "bad")]) == 2
    assert "missing keys (1): decoder.conv_out.bias" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()

    assert extract_vae.main(["--ckpt", str(tmp_path / "absent.pt"), "--name", "n"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
