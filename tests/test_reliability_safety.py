"""Issue 16: no checkpoint runs code, preemption never loses a run, nothing restarts silently.
Every case is a real subprocess of the command line (tiny configs), bounded by a timeout."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _paths import REPO
from _train_helpers import checkpoint_dir, run_train, train_command, train_env
from repa_e_fast.engine.checkpoint import CheckpointManager, RunLock, verify_checkpoint, write_manifest
from repa_e_fast.engine.official_format import read_checkpoint
from repa_e_fast.models.checkpoints import CheckpointError, load_state_dict_file, safe_torch_load
from repa_e_fast.models.encoder_checkpoints import read_official_checkpoint


class _RunsCode:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do with a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_code_pickle(path, marker, **entries):
    torch.save({**entries, "payload": _RunsCode(marker)}, path)


def _one_line_refusal(result, *needles):
    """Exit 2, no traceback, exactly one error line, containing every needle."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _module(*argv, timeout=300, **kwargs):
    return subprocess.run([sys.executable, "-m", *map(str, argv)], cwd=REPO, env=train_env(), capture_output=True,
                          text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step run with a checkpoint at step 2 (copied by each test that changes it)."""
    folder = tmp_path_factory.mktemp("finished")
    result = run_train(folder, "--max-train-steps", 2, "--checkpointing-steps", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def _copy_run(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path, dirs_exist_ok=True)
    return tmp_path


# ---------------------------------------------------------------------------------------
# Security: nothing loaded from disk can run code
# ---------------------------------------------------------------------------------------
def test_the_crafted_pickle_runs_code_when_loaded_unsafely(tmp_path):
    """The attack the tests below refuse is real: an unsafe load runs the command."""
    marker = tmp_path / "ran"
    _write_code_pickle(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_safe_torch_load_refuses_code_and_reads_our_files(tmp_path, finished_run):
    marker = tmp_path / "ran"
    _write_code_pickle(tmp_path / "evil.pt", marker, model={"w": torch.zeros(2)})
    for load in (safe_torch_load, load_state_dict_file, read_checkpoint, read_official_checkpoint):
        # One line, said once: a reader that wraps the refusal again would not match "^".
        with pytest.raises(CheckpointError, match=r"^refusing to load .*evil.pt.*unsupported GLOBAL posix.system"):
            load(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    # Everything a checkpoint holds passes the allow-list: argparse.Namespace, numpy RNG state.
    directory = checkpoint_dir(finished_run, 2)
    official = safe_torch_load(directory / "official.pt")
    assert official["args"].learning_rate == 0.001 and official["steps"] == 2
    rng = safe_torch_load(directory / "rng" / "rank00000.pt")
    assert rng["numpy"][0] == "MT19937" and rng["numpy"][1].dtype == np.uint32 and len(rng["numpy"][1]) == 624
    assert safe_torch_load(directory / "trainer.pt")["progress"]["step"] == 2


@pytest.mark.parametrize("target,resume",
                         [("official.pt", "auto"), ("trainer.pt", "dir"), ("rng/rank00000.pt", "auto")])
def test_resume_refuses_a_checkpoint_file_that_runs_code(tmp_path, finished_run, target, resume):
    run = _copy_run(finished_run, tmp_path / "run_copy")
    directory = checkpoint_dir(run, 2)
    marker = tmp_path / "ran"
    _write_code_pickle(directory / target, marker, model={})
    write_manifest(directory, 2)  # the attacker recomputes the CRCs: the manifest verifies
    assert verify_checkpoint(directory) is None
    result = run_train(run, "--max-train-steps", 3, "--resume", directory if resume == "dir" else resume)
    _one_line_refusal(result, "refusing to load", target, "posix.system")
    assert "resumed from" not in result.stdout and "backend" not in result.stdout  # before any model
    assert not marker.exists()


def test_init_from_refuses_a_file_that_runs_code(tmp_path):
    marker = tmp_path / "ran"
    _write_code_pickle(tmp_path / "official.pt", marker, model={}, ema={}, vae={}, discriminator={})
    result = run_train(tmp_path / "out", "--max-train-steps", 1, "--init-from", tmp_path / "official.pt")
    _one_line_refusal(result, "refusing to load", "official.pt")
    assert not marker.exists()


def test_generate_extract_vae_cache_latents_and_evaluate_refuse_files_that_run_code(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    _write_code_pickle(evil, marker, ema={}, vae={}, args={})
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    images = tmp_path / "images" / "class0"
    images.mkdir(parents=True)
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "a.png")
    commands = {
        "generate": ["repa_e_fast.generate", "--ckpt", evil, "--sample-dir", tmp_path / "s", "--num-fid-samples", 2],
        "extract_vae": ["repa_e_fast.extract_vae", "--ckpt", evil, "--name", "x", "--save-dir", tmp_path / "v"],
        "cache_latents": ["repa_e_fast.cache_latents", "--data-dir", tmp_path / "images", "--output", tmp_path / "c",
                          "--vae", "f8d4", "--vae-ch", 32, "--vae-ckpt", evil, "--resolution", 32,
                          "--num-workers", 0, "--data-loader", "torch"],
        "evaluate": ["repa_e_fast.evaluate", "--ref", tmp_path / "samples.npz", "--samples", tmp_path / "samples.npz",
                     "--inception", evil],
    }
    for name, argv in commands.items():
        result = _module(*argv)
        _one_line_refusal(result, "refusing to load", "evil.pt")
        assert not marker.exists(), name


def test_deepspeed_resume_refuses_an_engine_file_that_runs_code(tmp_path):
    pytest.importorskip("deepspeed")
    deepspeed = ("--distributed", "deepspeed", "--zero-stage", 1)
    assert run_train(tmp_path, "--max-train-steps", 1, "--checkpointing-steps", 1, *deepspeed).returncode == 0
    directory = checkpoint_dir(tmp_path, 1)
    target = directory / "deepspeed" / "sit" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    # The real file loads through the allow-list (DeepSpeed pickles three plain types in it)...
    from repa_e_fast.engine.backend_deepspeed import _safe_deepspeed_load

    assert "optimizer_state_dict" in _safe_deepspeed_load(target)
    # ...a crafted one does not, although DeepSpeed itself would unpickle it unrestricted.
    marker = tmp_path / "ran"
    _write_code_pickle(target, marker)
    write_manifest(directory, 1)
    result = run_train(tmp_path, "--max-train-steps", 2, "--resume", "auto", *deepspeed)
    _one_line_refusal(result, "refusing to load", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert not marker.exists()


def _as_written_before_the_renames(checkpoint: Path, step: int) -> None:
    """A fresh checkpoint made as an older version wrote it: the VAE-loss module's DeepSpeed
    engine under deepspeed/disc/, the saved config with the keys backend, data_backend and
    attn_backend."""
    (checkpoint / "deepspeed" / "vae_loss").rename(checkpoint / "deepspeed" / "disc")
    trainer = safe_torch_load(checkpoint / "trainer.pt")
    old = {"distributed": "backend", "data_loader": "data_backend", "attention": "attn_backend"}
    trainer["config"] = {old.get(key, key): value for key, value in trainer["config"].items()}
    assert {"backend", "data_backend", "attn_backend"} <= set(trainer["config"])
    torch.save(trainer, checkpoint / "trainer.pt")
    write_manifest(checkpoint, step)


def test_a_checkpoint_written_before_the_renames_resumes_exactly(tmp_path):
    pytest.importorskip("deepspeed")
    from _train_helpers import assert_same_weights, load_official

    deepspeed = ("--distributed", "deepspeed", "--zero-stage", 1)
    straight, old = tmp_path / "straight", tmp_path / "old"
    assert run_train(straight, "--max-train-steps", 2, "--checkpointing-steps", 2, *deepspeed).returncode == 0
    assert run_train(old, "--max-train-steps", 1, "--checkpointing-steps", 1, *deepspeed).returncode == 0
    _as_written_before_the_renames(checkpoint_dir(old, 1), 1)
    resumed = run_train(old, "--max-train-steps", 2, "--checkpointing-steps", 2, "--resume", "auto", *deepspeed)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert "resumed from" in resumed.stdout
    assert (checkpoint_dir(old, 2) / "deepspeed" / "vae_loss").is_dir()  # written under the new name
    a, b = load_official(straight, 2), load_official(old, 2)
    assert_same_weights(a, b)
    for key in ("opt", "opt_vae", "opt_disc"):
        assert a[key]["state"].keys() == b[key]["state"].keys() and a[key]["state"]
        for index, state in a[key]["state"].items():
            assert torch.equal(state["exp_avg_sq"], b[key]["state"][index]["exp_avg_sq"])
    last = json.loads((old / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and "grad_norm_disc" in last  # the official log name stays


# ---------------------------------------------------------------------------------------
# Data loss: signals, launchers, damaged checkpoints, folders holding a run, two trainers
# ---------------------------------------------------------------------------------------
def _start(output_dir, *extra, launcher=None):
    return subprocess.Popen(train_command(output_dir, *extra, launcher=launcher), cwd=REPO, env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_steps(run_dir, count, process, timeout=240):
    metrics = Path(run_dir) / "run" / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{count} steps not reached; exit {process.poll()}")


def _wait_until_every_process_exited(process, output, timeout=30):
    """After EOF the last exits may not have been reaped by init yet: poll the process group."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes of the job are left:\n{output[-3000:]}")


def _preempted_marker(run_dir):
    return json.loads((Path(run_dir) / "run" / "PREEMPTED").read_text())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_process_group_with_loader_workers_checkpoints_and_exits_75(tmp_path, sig):
    """What Slurm, timeout, systemd and Ctrl-C do: signal every process of the group,
    DataLoader workers included."""
    process = _start(tmp_path, "--max-train-steps", 100000, "--checkpointing-steps", 100000, "--num-workers", 1)
    _wait_for_steps(tmp_path, 2, process)
    os.killpg(process.pid, sig)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 75, output[-3000:]
    assert f"preempted by signal {sig.name}" in output and "Traceback" not in output
    _wait_until_every_process_exited(process, output)  # the loader worker too
    good = CheckpointManager(tmp_path / "run" / "checkpoints").latest_good()
    assert good is not None and int(good.name) >= 2
    assert _preempted_marker(tmp_path) == {"step": int(good.name), "reason": f"signal {sig.name}"}
    resumed = run_train(tmp_path, "--max-train-steps", int(good.name) + 1, "--resume", "auto")
    assert resumed.returncode == 0 and f"at step {int(good.name)}" in resumed.stdout
    assert not (tmp_path / "run" / "PREEMPTED").exists()  # a finished run leaves no requeue marker


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_trainer_notices_the_deepspeed_runner_is_gone_and_checkpoints(tmp_path):
    """SIGTERM to the `deepspeed` runner alone: it dies without telling its launcher, which
    trains on, orphaned. The trainer notices (its launcher's parent changed), checkpoints,
    writes PREEMPTED and exits; no process of the job is left."""
    pytest.importorskip("deepspeed")
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    launcher = ["deepspeed", "--master_port", str(_free_port()), "repa_e_fast/train.py"]
    process = _start(tmp_path, "--max-train-steps", 100000, "--checkpointing-steps", 100000, "--zero-stage", 0,
                     launcher=launcher)
    _wait_for_steps(tmp_path, 2, process)
    process.send_signal(signal.SIGTERM)  # the runner only
    output, _ = process.communicate(timeout=180)  # EOF: every process holding the pipe has exited
    _wait_until_every_process_exited(process, output)
    assert "preempted by launcher" in output and "orphaned" in output, output[-3000:]
    marker = _preempted_marker(tmp_path)
    assert "orphaned" in marker["reason"], output[-3000:]
    assert verify_checkpoint(checkpoint_dir(tmp_path, marker["step"])) is None and marker["step"] >= 2


def test_resume_auto_refuses_when_no_checkpoint_verifies_and_deletes_nothing(tmp_path, finished_run):
    run = _copy_run(finished_run, tmp_path)
    target = checkpoint_dir(run, 2) / "official.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0xFF
    target.write_bytes(bytes(data))
    metrics = (run / "run" / "metrics.jsonl").read_text()
    result = run_train(run, "--max-train-steps", 4, "--checkpointing-steps", 2, "--resume", "auto")
    _one_line_refusal(result, "no checkpoint under", "0000002 (official.pt fails its CRC-32 check")
    assert target.read_bytes() == bytes(data) and (run / "run" / "metrics.jsonl").read_text() == metrics


def test_retention_sets_a_damaged_checkpoint_aside_instead_of_deleting_it(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(1, lambda d: (d / "payload.bin").write_bytes(b"\1" * 10))
    (tmp_path / "0000001" / "payload.bin").write_bytes(b"\2" * 10)  # damaged (CRC)
    with pytest.warns(UserWarning, match="fails verification"):
        manager.save(2, lambda d: (d / "payload.bin").write_bytes(b"\3" * 10))
    assert [p.name for p in manager.complete_checkpoints()] == ["0000002"]
    assert (tmp_path / "0000001.damaged" / "payload.bin").read_bytes() == b"\2" * 10
    manager.save(3, lambda d: (d / "payload.bin").write_bytes(b"\4" * 10))  # a good one is deleted
    assert not (tmp_path / "0000002").exists() and (tmp_path / "0000001.damaged").is_dir()
    # Saving a step again over a damaged copy of it keeps the damaged copy too.
    (tmp_path / "0000003" / "payload.bin").write_bytes(b"\5" * 10)
    with pytest.warns(UserWarning, match="fails verification"):
        manager.save(3, lambda d: (d / "payload.bin").write_bytes(b"\6" * 10))
    assert (tmp_path / "0000003.damaged" / "payload.bin").read_bytes() == b"\5" * 10


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path, finished_run):
    run = _copy_run(finished_run, tmp_path)
    metrics = (run / "run" / "metrics.jsonl").read_text()
    result = run_train(run, "--max-train-steps", 1)
    _one_line_refusal(result, "holds a run", "--resume auto", "--overwrite")
    assert (run / "run" / "metrics.jsonl").read_text() == metrics and verify_checkpoint(checkpoint_dir(run, 2)) is None
    replaced = run_train(run, "--max-train-steps", 1, "--checkpointing-steps", 1, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert [p.name for p in CheckpointManager(run / "run" / "checkpoints").complete_checkpoints()] == ["0000001"]


def test_a_live_lock_is_refused_and_a_stale_one_taken_over(tmp_path):
    lock_file = tmp_path / "run" / "LOCK"
    lock_file.parent.mkdir(parents=True)
    live = RunLock(tmp_path / "run")
    assert live.acquire() is None  # held by this (live) test process
    result = run_train(tmp_path, "--max-train-steps", 1)
    _one_line_refusal(result, "in use by another trainer", f"pid {os.getpid()}", socket.gethostname())
    live.release()
    assert not lock_file.exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "2026-01-01T00:00:00Z",
                                     "process_start": "1"}))
    result = run_train(tmp_path, "--max-train-steps", 1, "--checkpointing-steps", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"took over the stale lock {lock_file} (host {socket.gethostname()}, pid {dead.pid}" in result.stdout
    assert not lock_file.exists()  # released at exit


def test_lock_from_another_host_is_refused(tmp_path):
    (tmp_path / "LOCK").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    from repa_e_fast.engine.checkpoint import RunFolderError

    with pytest.raises(RunFolderError, match="another machine .*host elsewhere"):
        RunLock(tmp_path).acquire()


# ---------------------------------------------------------------------------------------
# Changed hyper-parameters on resume
# ---------------------------------------------------------------------------------------
def test_resume_with_another_batch_size_or_world_size_is_one_line_before_any_model(tmp_path, finished_run):
    run = _copy_run(finished_run, tmp_path)
    result = run_train(run, "--max-train-steps", 3, "--resume", "auto", "--batch-size", 8, "--seed", 3)
    _one_line_refusal(result, "batch_size 4 -> 8", "seed 0 -> 3")
    assert "backend" not in result.stdout  # stopped before the loader and models were built
    directory = checkpoint_dir(run, 2)
    trainer = safe_torch_load(directory / "trainer.pt")
    trainer["world_size"] = 2
    torch.save(trainer, directory / "trainer.pt")
    write_manifest(directory, 2)
    _one_line_refusal(run_train(run, "--max-train-steps", 3, "--resume", "auto"), "world_size 2 -> 1")


def test_resume_applies_a_changed_learning_rate_to_the_optimizer(tmp_path, finished_run):
    run = _copy_run(finished_run, tmp_path)
    result = run_train(run, "--max-train-steps", 3, "--checkpointing-steps", 3, "--resume", "auto",
                       "--learning-rate", 0.05, "--log-every", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume: learning_rate changed 0.001 -> 0.05" in result.stdout
    assert "resume: log_every changed 1 -> 3" in result.stdout
    official = safe_torch_load(checkpoint_dir(run, 3) / "official.pt")
    assert [g["lr"] for g in official["opt"]["param_groups"]] == [0.05]
    assert [g["lr"] for g in official["opt_vae"]["param_groups"]] == [1e-4]  # unchanged
    # The step from 2 to 3 really used lr 0.05: Adam's first update moves each weight by ~lr.
    name = "y_embedder.embedding_table.weight"
    before = safe_torch_load(checkpoint_dir(finished_run, 2) / "official.pt")["model"][name]
    after = official["model"][name]
    assert (after - before).abs().max().item() > 0.01


# ---------------------------------------------------------------------------------------
# One line, exit 2, before any work: the run folder
# ---------------------------------------------------------------------------------------
def _unshare_works():
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


def _train_under_mount(mount_script, output_dir, *extra, timeout=300):
    """Run the trainer in a private mount namespace (unprivileged: a user namespace) where
    ``mount_script`` has prepared a read-only or tiny file system."""
    argv = train_command(output_dir, *extra)
    return subprocess.run(["unshare", "-rm", "sh", "-c", mount_script + ' && exec "$@"', "sh", *argv], cwd=REPO,
                          env=train_env(), capture_output=True, text=True, timeout=timeout)


def _full_tmpfs(folder):
    """A 64 KiB file system mounted on ``folder`` and filled up: every write fails (ENOSPC)."""
    return f"mount -t tmpfs -o size=64k tmpfs {folder} && (dd if=/dev/zero of={folder}/fill bs=4k 2>/dev/null || true)"


needs_unshare = pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged mount namespaces (unshare -rm)")


@needs_unshare
@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_a_read_only_or_full_checkpoint_folder_is_one_line_before_any_work(tmp_path, kind):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    mount = (f"mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}" if kind == "read-only"
             else _full_tmpfs(folder))
    result = _train_under_mount(mount, tmp_path, "--max-train-steps", 1)
    error = _one_line_refusal(result, f"cannot write in {folder}")
    assert ("Read-only file system" if kind == "read-only" else "No space left on device") in error
    assert "backend" not in result.stdout


def test_output_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    _one_line_refusal(run_train(tmp_path / "out", "--max-train-steps", 1), "exists and is not a folder")


@needs_unshare
def test_a_full_disk_for_the_sample_grid_does_not_stop_training(tmp_path):
    """Decision: the grids are optional (a warning, training goes on); checkpoints are not."""
    samples = tmp_path / "run" / "samples"
    samples.mkdir(parents=True)
    result = _train_under_mount(_full_tmpfs(samples), tmp_path, "--max-train-steps", 2,
                                "--checkpointing-steps", 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: could not write the sample grid (No space left on device); training continues" in result.stdout
    assert verify_checkpoint(checkpoint_dir(tmp_path, 2)) is None


def test_docs_reliability_count_matches_its_table():
    """The count line under the reliability table of docs/reliability.md counts that table's rows."""
    import re

    section = (Path(REPO) / "docs" / "reliability.md").read_text().split("# Reliability\n", 1)[1]
    table = section[section.index("| fault |"):].split("\n\n", 1)[0].splitlines()
    rows = [line for line in table[2:] if line.startswith("| ")]
    count = re.search(r"\*\*(\d+) faults injected, (\d+) survived, (\d+) runs lost data\*\*", section)
    assert count is not None
    assert (int(count.group(1)), int(count.group(2)), int(count.group(3))) == (len(rows), len(rows), 0)
