"""The launch commands of docs/training.md: torchrun (DDP, 2 CPU ranks with gloo) and the deepspeed
launcher (DeepSpeed's CPU accelerator), each training, checkpointing and resuming."""

import shutil
import socket
import sys

import pytest

from _train_helpers import checkpoint_dir, load_official, run_train


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_ranks_train_checkpoint_and_resume(tmp_path):
    def launcher():
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), "repa_e_fast/train.py"]

    result = run_train(tmp_path, "--max-train-steps", 2, "--checkpointing-steps", 2, launcher=launcher())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ddp backend, 2 rank(s)" in result.stdout
    directory = checkpoint_dir(tmp_path, 2)
    assert sorted(p.name for p in (directory / "rng").iterdir()) == ["rank00000.pt", "rank00001.pt"]
    first = load_official(tmp_path, 2)
    assert first["steps"] == 2 and "bn.running_mean" in first["model"]  # SyncBN keeps the official keys
    resumed = run_train(tmp_path, "--max-train-steps", 3, "--resume", "auto", launcher=launcher())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and load_official(tmp_path, 3)["steps"] == 3


def test_deepspeed_launcher_trains_and_resumes(tmp_path):
    pytest.importorskip("deepspeed")
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    launcher = ["deepspeed", "--master_port", str(free_port()), "repa_e_fast/train.py"]
    result = run_train(tmp_path, "--max-train-steps", 2, "--checkpointing-steps", 2, launcher=launcher)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "deepspeed backend, 1 rank(s)" in result.stdout
    directory = checkpoint_dir(tmp_path, 2)
    assert (directory / "deepspeed").is_dir() and load_official(tmp_path, 2)["steps"] == 2
    resumed = run_train(tmp_path, "--max-train-steps", 3, "--resume", "auto", launcher=launcher)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert "resumed from" in resumed.stdout and load_official(tmp_path, 3)["steps"] == 3
