"""The official train_repae.py command line with our entry point: --loss-cfg-path
configs/l1_lpips_kl_gan.yaml (our file, official values), --logging-dir, --wandb-history-path,
--continue-train-exp-dir with --resume-step on an official run directory, and a run directory
in the official layout (checkpoints/<step>.pt) for the official generate.py --exp-path."""

import json
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


# ----------------------------------------------------------------------------------------
# The official README's command lines (End2End-Diffusion/REPA-E), verbatim after the script name
# ----------------------------------------------------------------------------------------
OFFICIAL_TRAIN_REPAE = [
    "--max-train-steps=400000", "--report-to=wandb", "--allow-tf32", "--mixed-precision=fp16", "--seed=0",
    "--data-dir=data", "--output-dir=exps", "--batch-size=256", "--path-type=linear", "--prediction=v",
    "--weighting=uniform", "--model=SiT-XL/2", "--checkpointing-steps=50000",
    "--loss-cfg-path=configs/l1_lpips_kl_gan.yaml", "--vae=f8d4", "--vae-ckpt=pretrained/sdvae/sdvae-f8d4.pt",
    "--disc-pretrained-ckpt=pretrained/sdvae/sdvae-f8d4-discriminator-ckpt.pt", "--enc-type=dinov2-vit-b",
    "--proj-coeff=0.5", "--encoder-depth=8", "--vae-align-proj-coeff=1.5", "--bn-momentum=0.1",
    "--exp-name=sit-xl-dinov2-b-enc8-repae-sdvae-0.5-1.5-400k"]
OFFICIAL_CACHE_LATENTS = ["--vae-arch=f16d32", "--vae-ckpt-path=pretrained/e2e-vavae/e2e-vavae-400k.pt",
                          "--vae-latents-name=e2e-vavae", "--pproc-batch-size=128"]
OFFICIAL_TRAIN_LDM_ONLY = [
    "--max-train-steps=4000000", "--report-to=wandb", "--allow-tf32", "--mixed-precision=fp16", "--seed=0",
    "--data-dir=data", "--batch-size=256", "--path-type=linear", "--prediction=v", "--weighting=uniform",
    "--model=SiT-XL/1", "--checkpointing-steps=50000", "--vae=f16d32",
    "--vae-ckpt=pretrained/e2e-vavae/e2e-vavae-400k.pt", "--vae-latents-name=e2e-vavae", "--learning-rate=1e-4",
    "--enc-type=dinov2-vit-b", "--proj-coeff=0.5", "--encoder-depth=8", "--output-dir=exps",
    "--exp-name=sit-xl-1-dinov2-b-enc8-ldm-only-e2e-vavae-0.5-4m"]


def test_official_train_repae_command_line_parses_unchanged():
    from repa_e_fast.config import parse_config

    config, _ = parse_config(OFFICIAL_TRAIN_REPAE)
    assert (config.train_mode, config.model, config.vae, config.precision, config.batch_size) == \
        ("repae", "SiT-XL/2", "f8d4", "fp16", 256)
    assert config.loss_cfg_path == "configs/l1_lpips_kl_gan.yaml" and config.report_to == "wandb"
    assert str(config.experiment_dir) == "exps/sit-xl-dinov2-b-enc8-repae-sdvae-0.5-1.5-400k"


def test_official_preprocess_cache_and_ldm_only_commands_run_on_tiny_data(tmp_path):
    """preprocessing.py -> cache_latents.py -> train_ldm_only.py, each with its official flags
    unchanged (cwd = a fresh project folder with data/ and pretrained/); the LDM run appends
    overrides that make the SiT-XL/1 tiny (later flags win)."""
    import subprocess
    import sys

    from _train_helpers import train_env
    from repa_e_fast.data import ensure_demo_dataset
    from repa_e_fast.models.vae import build_vae

    env = {**train_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}

    def run(module, *argv):
        done = subprocess.run([sys.executable, "-m", module, *map(str, argv)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run("repa_e_fast.data.prepare", "--imagenet-path", ensure_demo_dataset(), "--max-images", 8, "--no-progress")
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["num_images"] == 8

    (tmp_path / "pretrained" / "e2e-vavae").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_vae("f16d32").state_dict(), tmp_path / "pretrained" / "e2e-vavae" / "e2e-vavae-400k.pt")
    torch.save({"latents_scale": torch.ones(1, 32, 1, 1), "latents_bias": torch.zeros(1, 32, 1, 1)},
               tmp_path / "pretrained" / "e2e-vavae" / "e2e-vavae-400k-latents-stats.pt")
    run("repa_e_fast.cache_latents", *OFFICIAL_CACHE_LATENTS, "--num-workers", 0)
    assert json.loads((tmp_path / "data" / "e2e-vavae" / "meta.json").read_text())["count"] == 8

    tiny = ["--model-overrides", '{"depth": 2, "hidden_size": 32, "num_heads": 2, "projector_dim": 32}',
            "--encoder-depth", 1, "--allow-random-encoder", "--max-train-steps", 1, "--batch-size", 4,
            "--mixed-precision", "no", "--num-workers", 0, "--sample-grid-size", 1, "--sample-num-steps", 1,
            "--num-classes", 10]
    trained = run("repa_e_fast.train_ldm_only", *OFFICIAL_TRAIN_LDM_ONLY, *tiny)
    experiment = tmp_path / "exps" / "sit-xl-1-dinov2-b-enc8-ldm-only-e2e-vavae-0.5-4m"
    official = torch.load(experiment / "checkpoints" / "0000001.pt", weights_only=False)
    assert set(official) == {"model", "ema", "opt", "args", "steps"} and official["steps"] == 1
    assert official["args"].train_mode == "ldm" and official["args"].latents_path == "data/e2e-vavae"
    assert "initialised" not in trained.stdout
