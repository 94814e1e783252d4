"""The official train_repae.py command line with our entry point: --loss-cfg-path
configs/l1_lpips_kl_gan.yaml (our file, official values), --logging-dir, --wandb-history-path,
--continue-train-exp-dir with --resume-step on an official run directory, and a run directory
in the official layout (checkpoints/<step>.pt) for the official generate.py --exp-path."""

import os
import shutil

import torch
import yaml

from _paths import REPO
from _train_helpers import checkpoint_dir, load_official, run_train
from repa_e_fast.engine.checkpoint import CheckpointManager
from repa_e_fast.losses.vae_loss import VAELossConfig


def test_shipped_loss_config_has_the_official_values():
    with open(os.path.join(REPO, "configs", "l1_lpips_kl_gan.yaml")) as handle:
        loaded = VAELossConfig.from_official(yaml.safe_load(handle))
    assert loaded == VAELossConfig(
        discriminator_start=0, discriminator_factor=1.0, discriminator_weight=0.1, quantizer_weight=1.0,
        perceptual_loss="lpips", perceptual_weight=1.0, reconstruction_loss="l1", reconstruction_weight=1.0,
        lecam_regularization_weight=0.0, kl_weight=1e-6, logvar_init=0.0)


def test_official_layout_links_follow_retention(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints", keep_last=1)
    for step in (1, 2):
        manager.save(step, lambda directory, step=step: torch.save({"steps": step}, directory / "official.pt"))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["0000002", "0000002.pt", "latest"]
    assert os.path.samefile(root / "0000002.pt", root / "0000002" / "official.pt")
    manager.save(2, lambda directory: torch.save({"steps": 22}, directory / "official.pt"))  # saved again
    assert torch.load(root / "0000002.pt")["steps"] == 22


def test_official_train_repae_flags_and_resume_step_on_an_official_run(tmp_path):
    official_flags = ("--loss-cfg-path", "configs/l1_lpips_kl_gan.yaml", "--logging-dir", "logs",
                      "--wandb-history-path", str(tmp_path / "history.json"))
    first = run_train(tmp_path / "a", "--max-train-steps", 2, "--checkpointing-steps", 2, *official_flags)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = tmp_path / "a" / "run" / "checkpoints"
    assert os.path.samefile(checkpoints / "0000002.pt", checkpoint_dir(tmp_path / "a", 2) / "official.pt")

    # An official run directory: args.json + checkpoints/0000002.pt only.
    official_run = tmp_path / "official-exp"
    (official_run / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoints / "0000002.pt", official_run / "checkpoints" / "0000002.pt")
    shutil.copy(tmp_path / "a" / "run" / "args.json", official_run / "args.json")
    resumed = run_train(tmp_path / "b", "--max-train-steps", 3, "--continue-train-exp-dir", official_run,
                        "--resume-step", 2, *official_flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"initialised from {official_run / 'checkpoints' / '0000002.pt'} (step 2)" in resumed.stdout
    started, source = load_official(tmp_path / "b", 3), load_official(tmp_path / "a", 2)
    assert started["steps"] == 3
    assert not torch.equal(started["model"]["blocks.0.attn.qkv.weight"], source["model"]["blocks.0.attn.qkv.weight"])

    # Our own run directory: --resume-step resumes the checkpoint directory exactly.
    again = run_train(tmp_path / "a", "--max-train-steps", 3, "--resume-step", 2, *official_flags)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and load_official(tmp_path / "a", 3)["steps"] == 3
    missing = run_train(tmp_path / "c", "--max-train-steps", 3, "--continue-train-exp-dir", official_run,
                        "--resume-step", 7)
    assert missing.returncode == 2 and "resume_step 7: neither" in missing.stderr
