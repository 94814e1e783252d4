"""Nothing lost on kill -9, SIGTERM, NaN, damaged checkpoints or a full disk (issue #9).
Every run is a real subprocess of the command line, bounded by a timeout."""

import copy
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from _faults import LossFault
from _paths import REPO
from _train_helpers import (assert_same_weights, checkpoint_dir, load_official, run_train, train_command,
                            train_env)
from repa_e_fast.engine.checkpoint import CheckpointManager, verify_checkpoint


def _start(output_dir, *extra):
    return subprocess.Popen(train_command(output_dir, *extra), cwd=REPO, env=train_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_kill_9_at_random_points_then_resume_auto_matches_an_uninterrupted_run(tmp_path):
    steps = ("--max-train-steps", 8, "--checkpointing-steps", 1)
    reference = tmp_path / "reference"
    assert run_train(reference, *steps).returncode == 0
    victim = tmp_path / "victim"
    metrics = victim / "run" / "metrics.jsonl"
    manager = CheckpointManager(victim / "run" / "checkpoints")
    rng = random.Random(0)
    kills = 0
    for attempt in range(12):
        good = manager.latest_good()
        resumed_at = int(good.name) if good else 0
        process = _start(victim, *steps, "--resume", "auto")
        if kills < 3:
            # Kill a few steps after this attempt's start, at a random moment: inside a step or
            # inside a checkpoint write (one is written after every step).
            goal = resumed_at + rng.randint(1, 2)
            deadline = time.time() + 240
            while process.poll() is None and time.time() < deadline:
                if metrics.is_file() and len(metrics.read_text().splitlines()) >= goal:
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.4))
            if process.poll() is None:
                process.kill()
                kills += 1
        output, _ = process.communicate(timeout=300)
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, output[-2000:]
        good = manager.latest_good()
        assert good is None or verify_checkpoint(good) is None  # whatever was killed, what is left is whole
    assert kills >= 2 and process.returncode == 0
    assert_same_weights(load_official(reference, 8), load_official(victim, 8))


def test_sigterm_writes_a_checkpoint_and_exits_75(tmp_path):
    process = _start(tmp_path, "--max-train-steps", 100000, "--checkpointing-steps", 100000)
    deadline = time.time() + 240
    metrics = tmp_path / "run" / "metrics.jsonl"
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 75, output[-2000:]
    assert "preempted by signal" in output
    good = CheckpointManager(tmp_path / "run" / "checkpoints").latest_good()
    assert good is not None and int(good.name) >= 2
    resumed = run_train(tmp_path, "--max-train-steps", int(good.name) + 1, "--resume", "auto")
    assert resumed.returncode == 0 and f"at step {int(good.name)}" in resumed.stdout


def test_injected_nan_skips_the_step_for_every_model():
    from test_step import batch, tiny_setup

    step, backend = tiny_setup()
    images, labels, zs = batch()
    step(images, labels, 0, zs=zs)
    before = {name: copy.deepcopy(backend.unwrap(name).state_dict()) for name in ("sit", "vae", "vae_loss")}
    optim_before = {name: copy.deepcopy(o.state_dict()) for name, o in backend.optimizers.items()}
    ema_before = copy.deepcopy(step.ema.state_dict())
    fault = LossFault(None)
    fault.install(backend)
    for loss in ("vae_loss", "d_loss", "sit_loss"):
        fault.loss = loss
        step(images, labels, 1, zs=zs)
        assert step.last_fault == loss
        for name in ("sit", "vae", "vae_loss"):
            for key, value in backend.unwrap(name).state_dict().items():
                if "running" in key or "num_batches" in key:
                    continue  # BN statistics of forward passes that ran before the fault
                assert torch.equal(value, before[name][key]), f"{name}.{key} changed on a skipped step"
            assert all(p.grad is None for p in backend.unwrap(name).parameters())
        for name, optimizer in backend.optimizers.items():
            steps = [float(s["step"]) for s in optimizer.state_dict()["state"].values()]
            assert steps == [float(s["step"]) for s in optim_before[name]["state"].values()] and set(steps) == {1.0}
        assert all(torch.equal(v, ema_before[k]) for k, v in step.ema.state_dict().items())
    fault.loss = None
    step(images, labels, 1, zs=zs)
    assert step.last_fault is None and backend.optimizers["sit"].state_dict()["state"][0]["step"] == 2


def faulty_train(fault: str) -> list:
    """The trainer's command line with ``fault`` (tests/_faults.py) injected from outside."""
    return [sys.executable, os.path.join(REPO, "tests", "_faults.py"), fault]


def test_repeated_nan_aborts_with_exit_65_and_keeps_the_last_checkpoint(tmp_path):
    result = run_train(tmp_path, "--max-train-steps", 20, "--checkpointing-steps", 2, "--max-consecutive-faults", 3,
                       launcher=faulty_train('{"loss": "sit_loss", "steps": [2], "count": 100}'))
    assert result.returncode == 65, result.stderr[-2000:]
    assert "3 consecutive steps had non-finite values (last: sit_loss)" in result.stderr
    assert "Traceback" not in result.stderr
    assert "step 2: non-finite sit_loss; update skipped (1 in a row" in result.stdout
    assert verify_checkpoint(checkpoint_dir(tmp_path, 2)) is None
    assert load_official(tmp_path, 2)["steps"] == 2


def test_one_nan_step_is_skipped_and_counted(tmp_path):
    result = run_train(tmp_path, "--max-train-steps", 3, "--checkpointing-steps", 3,
                       launcher=faulty_train('{"loss": "vae_loss", "steps": [1]}'))
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["skipped_steps"] == 1


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_is_detected_and_the_previous_one_used(tmp_path, damage):
    assert run_train(tmp_path, "--max-train-steps", 4, "--checkpointing-steps", 2).returncode == 0
    target = checkpoint_dir(tmp_path, 4) / "official.pt"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:
        data[len(data) // 3] ^= 0xFF
        target.write_bytes(bytes(data))
    problem = verify_checkpoint(checkpoint_dir(tmp_path, 4))
    assert problem and ("truncated" in problem if damage == "truncate" else "CRC-32" in problem)
    result = run_train(tmp_path, "--max-train-steps", 5, "--checkpointing-steps", 2, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "is damaged" in result.stderr and "resumed from" in result.stdout and "0000002 at step 2" in result.stdout
    assert verify_checkpoint(checkpoint_dir(tmp_path, 4)) is None  # rewritten whole by the resumed run


def test_explicit_damaged_checkpoint_is_a_clear_error(tmp_path):
    assert run_train(tmp_path, "--max-train-steps", 2, "--checkpointing-steps", 2).returncode == 0
    target = checkpoint_dir(tmp_path, 2) / "trainer.pt"
    target.write_bytes(target.read_bytes()[:100])
    result = run_train(tmp_path, "--resume", checkpoint_dir(tmp_path, 2), "--max-train-steps", 3)
    assert result.returncode == 2
    assert "cannot resume from" in result.stderr and "trainer.pt has 100 bytes" in result.stderr
    assert "Traceback" not in result.stderr


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path):
    assert run_train(tmp_path, "--max-train-steps", 2, "--checkpointing-steps", 2).returncode == 0
    size = (checkpoint_dir(tmp_path, 2) / "official.pt").stat().st_size

    def limit_file_size():
        # Writes past the limit fail with EFBIG, as a full disk fails them with ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    result = run_train(tmp_path, "--max-train-steps", 4, "--checkpointing-steps", 2, "--resume", "auto",
                       preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "could not write the checkpoint for step 4" in result.stderr
    assert "0000002 is intact" in result.stderr and "Traceback" not in result.stderr
    manager = CheckpointManager(tmp_path / "run" / "checkpoints")
    assert manager.latest_good() == checkpoint_dir(tmp_path, 2)
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_retention_keeps_the_newest_k(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, lambda d, step=step: (d / "payload.bin").write_bytes(bytes([step]) * 10))
    assert [p.name for p in manager.complete_checkpoints()] == ["0000002", "0000003"]
    assert (tmp_path / "latest").read_text().strip() == "0000003"
    # a crashed write leaves a temporary directory that is never taken for a checkpoint
    (tmp_path / ".tmp-0000004").mkdir()
    (tmp_path / "0000005").mkdir()  # no manifest: incomplete
    assert manager.latest_good() == tmp_path / "0000003"
