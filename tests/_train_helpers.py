"""Shared pieces of the training tests: a tiny REPA-E config on the demo dataset, and a
runner for the real command line in a subprocess (what a user types)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from _paths import REPO

# 32 px images -> 4x4 latents -> 4 SiT tokens, matching 4 DINOv2 tokens at 32 px.
TINY = [
    "--demo-dataset", "--resolution", "32", "--num-classes", "10", "--model", "SiT-S/2",
    "--model-overrides", '{"depth": 2, "hidden_size": 32, "num_heads": 2, "projector_dim": 32}',
    "--encoder-depth", "1", "--vae", "f8d4", "--vae-ch", "32", "--vae-ckpt", "none",
    "--enc-type", "dinov2-vit-s", "--allow-random-encoder", "--allow-random-lpips",
    "--batch-size", "4", "--mixed-precision", "no", "--num-workers", "0", "--data-loader", "torch",
    "--sampling-steps", "1000", "--sample-num-steps", "2", "--sample-grid-size", "4", "--learning-rate", "0.001",
]


def train_command(output_dir, *extra, launcher=None):
    base = launcher or [sys.executable, "-m", "repa_e_fast.train"]
    return [*base, *TINY, "--output-dir", str(output_dir), "--exp-name", "run", *map(str, extra)]


def train_env():
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_train(output_dir, *extra, timeout=300, launcher=None, **kwargs):
    return subprocess.run(train_command(output_dir, *extra, launcher=launcher), cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def checkpoint_dir(output_dir, step):
    return Path(output_dir) / "run" / "checkpoints" / f"{step:07d}"


def load_official(output_dir, step):
    from repa_e_fast.models.checkpoints import safe_torch_load

    return safe_torch_load(checkpoint_dir(output_dir, step) / "official.pt")


def assert_same_weights(a, b, keys=("model", "ema", "vae", "discriminator")):
    for key in keys:
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"


def cache_demo_latents(output):
    """Latents of the demo dataset through a random tiny f8d4 VAE (32 px), written by
    ``cache_latents`` in a subprocess, as an LDM run reads them."""
    from repa_e_fast.data import ensure_demo_dataset

    cached = subprocess.run(
        [sys.executable, "-m", "repa_e_fast.cache_latents", "--data-dir", str(ensure_demo_dataset()), "--output",
         str(output), "--vae", "f8d4", "--vae-ch", "32", "--allow-random-vae", "--resolution", "32",
         "--batch-size", "64", "--num-workers", "0", "--data-loader", "torch"],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=300)
    assert cached.returncode == 0, cached.stderr[-3000:]
    return output
