"""The run folder around the checkpoints: checked and locked before any work
(``prepare_run_folder``), and marked ``PREEMPTED`` when a signal ended the run."""

import json
import os
import shutil
from pathlib import Path

from ..config import ConfigError, TrainConfig
from .checkpoint import CheckpointManager, RunFolderError, RunLock, check_writable
from .runtime import Runtime, log

PREEMPTED_MARKER = "PREEMPTED"  # <run>/PREEMPTED: {"step": ..., "reason": ...}; a job script requeues on it


def prepare_run_folder(config: TrainConfig, manager: CheckpointManager, lock: RunLock, runtime: Runtime) -> None:
    """Rank 0, before any work: the folder is usable (not a file, writable, free space), owned
    by this trainer alone, and does not hold another run unless resuming or --overwrite."""
    experiment = config.experiment_dir
    for folder in (Path(config.output_dir), experiment):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"output folder {folder} exists and is not a folder")
    check_writable(manager.root)
    notice = lock.acquire()
    if notice:
        log(runtime, f"notice: {notice}")
    resuming = bool(config.resume or config.resume_step)
    metrics = experiment / "metrics.jsonl"
    holds_run = bool(manager.complete_checkpoints()) or (metrics.is_file() and metrics.stat().st_size > 0)
    if holds_run and not resuming:
        if not config.overwrite:
            raise ConfigError(f"{experiment} holds a run (checkpoints or metrics); continue it with --resume auto, "
                              f"or replace it with --overwrite")
        shutil.rmtree(manager.root)  # the old run's checkpoints must not be taken for this run's
        check_writable(manager.root)
        log(runtime, f"--overwrite: the run in {experiment} is replaced")
    if resuming and manager.complete_checkpoints():
        needed = max(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in manager.complete_checkpoints())
        free = shutil.disk_usage(manager.root).free
        if free < needed:
            raise RunFolderError(f"{manager.root} has {free / 2**20:.0f} MiB free; a checkpoint of this run needs "
                                 f"{needed / 2**20:.0f} MiB")
    (experiment / PREEMPTED_MARKER).unlink(missing_ok=True)


def write_preempted_marker(experiment: Path, step: int, reason: str) -> None:
    """``<run>/PREEMPTED``: a job script requeues the job when it exists (the launchers do not
    pass exit code 75 through). Written atomically; removed when a run starts."""
    marker = experiment / PREEMPTED_MARKER
    tmp = marker.with_name(PREEMPTED_MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": step, "reason": reason}) + "\n")
    os.replace(tmp, marker)
