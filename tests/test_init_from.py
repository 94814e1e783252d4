"""--init-from <official single file>: an LDM-only checkpoint starts an LDM run (it has no
vae/discriminator), a REPA-E checkpoint refuses nothing it has, and under DeepSpeed the Adam
states go into ZeRO's partitions (two CPU ranks)."""

import json
import subprocess
import sys

import pytest
import torch

from _paths import REPO
from _train_helpers import cache_demo_latents, checkpoint_dir, load_official, run_train, train_env


def test_deepspeed_loads_the_official_adam_states_into_zero_partitions(tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "tests/_deepspeed_init_from.py", str(out)], cwd=REPO, env=train_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    for name in ("zero0", "zero2"):
        # Re-exported exactly; the next step equals the single-process AdamW's third step
        # (fp32: only the 2-rank gradient average's rounding differs).
        assert results[name]["state_diff"] == 0.0, results
        assert results[name]["steps"] == [2.0], results
        assert results[name]["weight_diff"] < 1e-6, results
    # Control: without the states, Adam's first step is ~lr per weight, far from the reference.
    assert results["zero2_fresh_adam"]["state_diff"] is None
    assert results["zero2_fresh_adam"]["weight_diff"] > 1e-3, results


def test_ldm_run_starts_from_an_official_ldm_only_checkpoint(tmp_path):
    cache = tmp_path / "latents"
    cache_demo_latents(cache)
    ldm = ("--train-mode", "ldm", "--latents-path", cache)
    first = run_train(tmp_path / "a", *ldm, "--max-train-steps", 2, "--checkpointing-steps", 2)
    assert first.returncode == 0, first.stderr[-3000:]
    official_file = checkpoint_dir(tmp_path / "a", 2) / "official.pt"
    source = load_official(tmp_path / "a", 2)
    assert "vae" not in source and "opt" in source  # the official LDM-only layout

    started = run_train(tmp_path / "b", *ldm, "--max-train-steps", 3, "--init-from", official_file)
    assert started.returncode == 0, started.stderr[-3000:]  # was: KeyError: 'vae'
    assert "initialised from" in started.stdout and "optimizer states not loaded" not in started.stdout
    assert load_official(tmp_path / "b", 3)["steps"] == 3

    # A REPA-E run cannot start from it: one line naming what is missing, exit 2.
    refused = run_train(tmp_path / "c", "--max-train-steps", 1, "--init-from", official_file)
    assert refused.returncode == 2
    assert "has no ['vae', 'discriminator'] entries" in refused.stderr and "Traceback" not in refused.stderr
    torch.load(official_file, weights_only=False)  # untouched
