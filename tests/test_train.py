"""The training entry point: configs and flags, the real command line end to end, exact
resume, official-format checkpoints, LDM-only training on cached latents."""

import json

import pytest
import torch

from _paths import REPO
from _train_helpers import assert_same_weights, cache_demo_latents, checkpoint_dir, load_official, run_train
from repa_e_fast.config import ConfigError, make_config, parse_config, validate_files, validate_world


# -- configuration --------------------------------------------------------------------------
def test_official_flags_override_the_yaml(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model: SiT-B/2\nproj-coeff: 0.25\nmixed_precision: bf16\n")
    config, local_rank = parse_config(["--config", str(yaml_file), "--proj-coeff", "0.75", "--mixed-precision", "no",
                                       "--enc-type", "dinov2-vit-l", "--allow-tf32", "--encoder-depth", "4",
                                       "--local_rank=3"])
    assert (config.model, config.proj_coeff, config.precision, config.enc_type) == ("SiT-B/2", 0.75, "fp32",
                                                                                    "dinov2-vit-l")
    assert config.allow_tf32 is True and config.encoder_depth == 4 and local_rank == 3
    # the official defaults
    defaults, _ = parse_config([])
    assert (defaults.batch_size, defaults.max_train_steps, defaults.vae_align_proj_coeff, defaults.bn_momentum,
            defaults.precision, defaults.encoder_depth) == (256, 400000, 1.5, 0.1, "fp16", 8)


@pytest.mark.parametrize("values, message", [
    ({"modle": "SiT-XL/2"}, "unknown config key 'modle' (did you mean 'model'?)"),
    ({"model": "SiT-XXL/2"}, "unknown SiT model"),
    ({"model": "SiT-XL/4"}, "tokens but the encoder"),  # 8x8 tokens vs 16x16 DINOv2 tokens
    ({"resolution": 260}, "multiple of the f8d4 VAE"),
    ({"encoder_depth": 13, "model": "SiT-B/2"}, "encoder_depth 13 must be in [1, depth of SiT-B/2 = 12]"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"cfg_prob": 1.5}, "cfg_prob must be in [0, 1)"),
    ({"train_mode": "ldm"}, "needs latents_path"),
    ({"enc_type": "dinov1-vit-b"}, "cannot run DINOv1"),
])
def test_config_errors_are_one_clear_line(values, message):
    with pytest.raises(ConfigError) as error:
        make_config(values)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_missing_files_and_bad_world_size_are_reported_before_any_model(tmp_path):
    config = make_config({"vae_ckpt": str(tmp_path / "missing-vae.pt"), "data_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="VAE checkpoint .vae_ckpt. not found: .*missing-vae.pt"):
        validate_files(config)
    config = make_config({"vae_ckpt": None, "data_dir": str(tmp_path), "allow_random_lpips": True})
    with pytest.raises(ConfigError, match="encoder checkpoint not found: pretrained/dinov2_vitb14_pretrain.pth"):
        validate_files(config)
    with pytest.raises(ConfigError, match="divisible by world_size"):
        validate_world(make_config({"batch_size": 256}), 3)
    assert validate_world(make_config({"batch_size": 256, "gradient_accumulation_steps": 2}), 8) == 16


def test_missing_dataset_is_a_clear_error_and_exit_code_2(tmp_path):
    result = run_train(tmp_path, "--no-demo-dataset", "--data-dir", tmp_path / "nowhere", "--max-train-steps", 1)
    assert result.returncode == 2
    assert "dataset (data_dir) not found" in result.stderr and "Traceback" not in result.stderr


# -- the real command line ------------------------------------------------------------------
def test_train_leaves_checkpoint_metrics_samples_and_curve(tmp_path):
    result = run_train(tmp_path, "--max-train-steps", 3, "--checkpointing-steps", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = tmp_path / "run"
    assert "RANDOM encoder weights" in result.stderr  # the loud warning of the demo settings
    records = [json.loads(line) for line in (experiment / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    official_keys = {"sit_loss", "denoising_loss", "proj_loss", "grad_norm_sit", "epoch", "vae_loss",
                     "reconstruction_loss", "perceptual_loss", "kl_loss", "weighted_gan_loss", "discriminator_factor",
                     "gan_loss", "d_weight", "grad_norm_vae", "vae_align_loss", "d_loss", "grad_norm_disc",
                     "logits_real", "logits_fake", "lecam_loss"}
    assert official_keys <= set(records[0])
    assert all(isinstance(r["sit_loss"], float) and r["sit_loss"] > 0 for r in records)
    for step in (2, 3):
        assert (checkpoint_dir(tmp_path, step) / "MANIFEST.json").is_file()
    assert (experiment / "checkpoints" / "latest").read_text().strip() == "0000003"
    official = load_official(tmp_path, 3)
    assert {"model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "args", "steps"} <= set(official)
    assert official["steps"] == 3 and official["args"].model == "SiT-S/2"
    grid = experiment / "samples" / "samples_0000003.png"
    from PIL import Image

    assert Image.open(grid).size == (64, 64)  # 4 samples of 32 px in a 2x2 grid
    assert Image.open(experiment / "loss_curve.png").size == (900, 520)
    args = json.loads((experiment / "args.json").read_text())
    assert args["resolution"] == 32 and args["batch_size"] == 4


def test_resume_is_bit_exact_and_official_checkpoints_resume(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run_train(straight, "--max-train-steps", 4, "--checkpointing-steps", 2).returncode == 0
    assert run_train(interrupted, "--max-train-steps", 2, "--checkpointing-steps", 2).returncode == 0
    resumed = run_train(interrupted, "--max-train-steps", 4, "--checkpointing-steps", 2, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = load_official(straight, 4), load_official(interrupted, 4)
    assert_same_weights(a, b)
    for key in ("opt", "opt_vae", "opt_disc"):
        for index, state in a[key]["state"].items():
            assert torch.equal(state["exp_avg_sq"], b[key]["state"][index]["exp_avg_sq"])
    lines = (interrupted / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]

    # The official single file of step 2 starts a new run with its weights, optimizers and step.
    official_file = checkpoint_dir(straight, 2) / "official.pt"
    started = run_train(tmp_path / "from_official", "--max-train-steps", 3, "--init-from", official_file)
    assert started.returncode == 0, started.stderr[-3000:]
    assert "initialised from" in started.stdout and load_official(tmp_path / "from_official", 3)["steps"] == 3


def test_ldm_training_on_cached_latents(tmp_path):
    cache = tmp_path / "latents"
    cache_demo_latents(cache)
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["count"] == 400 and meta["num_classes"] == 10
    from repa_e_fast.data.cached_latents import CachedLatentLoader

    loader = CachedLatentLoader(cache, 8, shuffle=False)
    moments, images, labels = next(iter(loader))
    assert moments.shape == (8, 8, 4, 4) and images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8
    assert (moments[:, 4:] > 0).all()  # the second half is a standard deviation
    assert labels.tolist() == [0] * 8  # dataset order: the first class folder comes first

    result = run_train(tmp_path / "ldm", "--train-mode", "ldm", "--latents-path", cache, "--max-train-steps", 2,
                       "--checkpointing-steps", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    official = load_official(tmp_path / "ldm", 2)
    assert set(official) == {"model", "ema", "opt", "args", "steps"}  # the official LDM-only layout
    first = json.loads((tmp_path / "ldm" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"sit_loss", "denoising_loss", "proj_loss", "grad_norm_sit"} <= set(first)


def test_generate_and_extract_vae_read_a_training_run(tmp_path):
    import subprocess
    import sys

    import numpy as np

    from _train_helpers import train_env

    assert run_train(tmp_path, "--max-train-steps", 2, "--checkpointing-steps", 2).returncode == 0
    experiment = tmp_path / "run"
    generated = subprocess.run(
        [sys.executable, "-m", "repa_e_fast.generate", "--exp-path", str(experiment), "--train-steps", "2",
         "--num-fid-samples", "4", "--pproc-batch-size", "4", "--num-steps", "2", "--sample-dir", str(tmp_path / "s")],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert generated.returncode == 0, generated.stderr[-3000:]
    samples = np.load(tmp_path / "s" / "run_0000002_cfg1.5-0.0-1.0.npz")["arr_0"]
    assert samples.shape == (4, 32, 32, 3) and samples.dtype == np.uint8
    extracted = subprocess.run(
        [sys.executable, "-m", "repa_e_fast.extract_vae", "--exp-path", str(experiment), "--train-steps", "2",
         "--save-dir", str(tmp_path / "vae"), "--name", "e2e"],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert extracted.returncode == 0, extracted.stderr[-3000:]
    official = load_official(tmp_path, 2)
    vae_state = torch.load(tmp_path / "vae" / "e2e" / "e2e.pt", weights_only=True)
    assert all(torch.equal(vae_state[k], official["vae"][k]) for k in official["vae"])
    stats = torch.load(tmp_path / "vae" / "e2e" / "e2e-latents-stats.pt", weights_only=True)
    assert torch.allclose(stats["latents_bias"].flatten(), official["ema"]["bn.running_mean"])
