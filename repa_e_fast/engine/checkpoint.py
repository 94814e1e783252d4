"""Atomic, verifiable training checkpoints.

Layout under ``<experiment>/checkpoints/``::

    0000500/                 one complete checkpoint (a directory)
        official.pt          the official single-file format (model, ema, vae, discriminator,
                             opt, opt_vae, opt_disc, args, steps), readable by the official tools
        trainer.pt           everything else an exact resume needs (data position, loss
                             scaler, LeCam buffers, counters, config)
        rng/rank00000.pt     RNG states of each rank (python, numpy, torch CPU and CUDA)
        deepspeed/           the DeepSpeed engines' own checkpoint (DeepSpeed runs only)
        MANIFEST.json        size and CRC-32 of every file above, written last
    latest                   name of the newest complete checkpoint
    0000500.pt               hard link to 0000500/official.pt (the official layout)

A checkpoint is written into ``.tmp-<step>`` and renamed to its final name only after every
file, the manifest and the directory are fsynced, then ``latest`` is replaced (write +
rename). A crash or kill at any moment leaves the previous checkpoint and pointer intact.
Loading verifies the manifest; a damaged checkpoint is reported and the previous good one
is used. Retention keeps the newest ``keep_last`` complete checkpoints and never deletes the
one just written, nor one that fails verification: that one is moved aside to
``<step>.damaged`` (its weights may still be recoverable by hand).

The run folder itself is guarded by ``RunLock`` (one trainer per folder) and
``check_writable`` (a read-only or full disk is found before any work).
"""

import json
import os
import random
import re
import shutil
import socket
import time
import warnings
import zlib
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..errors import RepaEFastError
from ..models.checkpoints import CheckpointError

MANIFEST = "MANIFEST.json"
CHECKPOINT_NAME = re.compile(r"^\d{7}$")


class CheckpointWriteError(RepaEFastError, RuntimeError):
    pass


class NoGoodCheckpoint(RepaEFastError, RuntimeError):
    pass


class RunFolderError(RepaEFastError, RuntimeError):
    """The run folder cannot be used: locked by another trainer, read-only, full."""


def _crc32(path: Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_under(directory: Path) -> List[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path, step: int) -> None:
    files = {}
    for path in _files_under(directory):
        _fsync_file(path)
        files[str(path.relative_to(directory))] = {"size": path.stat().st_size, "crc32": _crc32(path)}
    manifest = directory / MANIFEST
    with open(manifest, "w") as handle:
        json.dump({"step": step, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    for sub in sorted({p.parent for p in _files_under(directory)} | {directory}, key=lambda p: -len(p.parts)):
        _fsync_dir(sub)


def verify_checkpoint(directory: Path) -> Optional[str]:
    """None when ``directory`` is a complete, undamaged checkpoint, else what is wrong."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no MANIFEST.json (incomplete checkpoint)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as error:
        return f"unreadable MANIFEST.json ({error})"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, expected {expected['size']} (truncated or replaced)"
        if _crc32(path) != expected["crc32"]:
            return f"{name} fails its CRC-32 check (corrupted)"
    return None


def verify_enclosing_checkpoint(path) -> None:
    """A file inside one of our checkpoint directories (beside its MANIFEST.json) is used only
    when that checkpoint verifies (sizes and CRC-32s); ``CheckpointError`` names what failed."""
    directory = Path(path).parent
    if (directory / MANIFEST).is_file():
        problem = verify_checkpoint(directory)
        if problem is not None:
            raise CheckpointError(f"checkpoint {directory} fails its manifest check: {problem}")


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, root: Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    def path(self, step: int) -> Path:
        return self.root / f"{step:07d}"

    def complete_checkpoints(self) -> List[Path]:
        """Checkpoint directories that have a manifest, oldest first (not re-verified)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and CHECKPOINT_NAME.match(p.name)
                 and (p / MANIFEST).is_file()]
        return sorted(found, key=lambda p: int(p.name))

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Collective: every rank calls ``write(tmp_dir)`` (each writes its own files), then
        rank 0 seals the checkpoint. Raises ``CheckpointWriteError`` (the previous
        checkpoint untouched) when writing fails, e.g. on a full disk."""
        tmp = self.root / f".tmp-{step:07d}"
        final = self.path(step)
        failure = None
        if _is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        try:
            write(tmp)
        except (OSError, RuntimeError) as error:  # torch.save reports a failed write as RuntimeError
            failure = error
        failure = _any_rank_failed(failure)
        if failure is None and _is_main():
            try:
                write_manifest(tmp, step)
                problem = verify_checkpoint(final) if final.exists() else None
                if problem:
                    self._set_aside(final, problem)  # a damaged checkpoint of this step: kept, never deleted
                if final.exists():  # the same step saved again (e.g. after a resume)
                    stale = self.root / f".old-{step:07d}"
                    shutil.rmtree(stale, ignore_errors=True)
                    os.rename(final, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                os.rename(tmp, final)
                _fsync_dir(self.root)
                self._write_latest(final.name)
                self._link_official_file(final)
                self._apply_retention(keep=final)
            except OSError as error:
                failure = error
        failure = _any_rank_failed(failure)
        if failure is not None:
            if _is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            previous = self.complete_checkpoints()
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointWriteError(f"could not write the checkpoint for step {step} under {self.root}: "
                                       f"{failure}; {kept}")
        return final

    def _write_latest(self, name: str) -> None:
        pointer = self.root / "latest"
        tmp = self.root / "latest.tmp"
        with open(tmp, "w") as handle:
            handle.write(name + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, pointer)
        _fsync_dir(self.root)

    def _link_official_file(self, final: Path) -> None:
        """``<step:07d>.pt`` beside the checkpoint directories: a hard link to its
        ``official.pt`` (no extra space), so the official ``generate.py --exp-path`` and
        ``--resume-step`` find the official layout. Skipped with a warning where the
        filesystem has no hard links."""
        official = final / "official.pt"
        if not official.is_file():
            return
        link, tmp = self.root / f"{final.name}.pt", self.root / f".{final.name}.pt.tmp"
        try:
            if tmp.exists():
                tmp.unlink()
            os.link(official, tmp)
            os.replace(tmp, link)
        except OSError as error:
            warnings.warn(f"could not hard-link {official} as {link} (the official layout): {error}", stacklevel=2)

    def _apply_retention(self, keep: Path) -> None:
        complete = self.complete_checkpoints()
        excess = len(complete) - self.keep_last
        for old in complete:
            if excess <= 0:
                break
            if old != keep:
                problem = verify_checkpoint(old)
                if problem is None:
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    self._set_aside(old, problem)
                link = self.root / f"{old.name}.pt"
                if link.is_file():
                    link.unlink()  # the official-layout link to official.pt goes with its checkpoint
                excess -= 1
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def _set_aside(self, checkpoint: Path, problem: str) -> None:
        """Rename a checkpoint that fails verification to ``<step>.damaged``: out of the way of
        resume and retention, but not deleted (only its manifest or one file may be bad)."""
        target = checkpoint.with_name(checkpoint.name + ".damaged")
        suffix = 1
        while target.exists():
            suffix += 1
            target = checkpoint.with_name(f"{checkpoint.name}.damaged{suffix}")
        os.rename(checkpoint, target)
        warnings.warn(f"checkpoint {checkpoint} fails verification ({problem}); kept as {target}, not deleted",
                      stacklevel=3)

    def latest_good(self) -> Optional[Path]:
        """The newest checkpoint that verifies, trying ``latest`` first, then older ones;
        damaged ones are reported (warnings) and skipped. None when there is none."""
        candidates = list(reversed(self.complete_checkpoints()))
        pointer = self.root / "latest"
        if pointer.is_file():
            named = self.root / pointer.read_text().strip()
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        for candidate in candidates:
            problem = verify_checkpoint(candidate)
            if problem is None:
                return candidate
            warnings.warn(f"checkpoint {candidate} is damaged ({problem}); trying the previous one", stacklevel=2)
        return None


def unverified_checkpoints_report(manager: "CheckpointManager") -> str:
    """Every complete checkpoint with what fails in it: ``0000004 (official.pt fails ...)``."""
    return "; ".join(f"{p.name} ({verify_checkpoint(p) or 'verifies'})" for p in manager.complete_checkpoints())


def check_writable(directory: Path, probe_bytes: int = 1 << 20) -> None:
    """Create ``directory`` and write, fsync and delete a ``probe_bytes`` file in it: a
    read-only or full file system is a ``RunFolderError`` at start, not after a whole
    checkpoint interval of training."""
    directory = Path(directory)
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(bytes(probe_bytes))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise RunFolderError(f"cannot write in {directory}: {error.strerror or error} "
                             f"(checkpoints need a writable folder with free space)") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def proc_stat_field(pid: int, name: str) -> Optional[str]:
    """``ppid`` or ``starttime`` (clock ticks since boot) of ``pid`` from Linux's
    /proc/<pid>/stat; None elsewhere or when there is no such process. Pid and start time
    together name one process, even after the pid is reused."""
    index = {"ppid": 1, "starttime": 19}[name]  # fields after the ")" that ends the command name
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[index]
    except (OSError, IndexError):
        return None


class RunLock:
    """One trainer per run folder. ``<run>/LOCK`` holds the host, pid and start time of the
    trainer that owns the folder; it is created atomically (a complete temporary file
    hard-linked to the name, which fails when the name exists) and removed at exit. A lock
    left by a process that is gone (same host, pid not running, or running but started at
    another time) is taken over with a notice; a live one, or one from another host, stops
    the new trainer."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / "LOCK"
        self.held = False

    def _mine(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "process_start": proc_stat_field(os.getpid(), "starttime")}

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _running(holder: dict) -> bool:
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        recorded, now = holder.get("process_start"), proc_stat_field(int(holder["pid"]), "starttime")
        return recorded is None or now is None or recorded == now

    def _create(self, tmp: Path, mine: dict) -> bool:
        """Create the lock file atomically; False when it exists."""
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive create, then write
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(mine) + "\n")
            return True

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a notice when a stale lock was taken over. Raises
        ``RunFolderError`` when another trainer holds it."""
        mine = self._mine()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"LOCK.{mine['host']}.{mine['pid']}")
        tmp.write_text(json.dumps(mine) + "\n")
        notice = None
        try:
            for _ in range(3):
                if self._create(tmp, mine):
                    self.held = True
                    return notice
                holder = self._read()
                if holder is None:
                    time.sleep(0.2)  # being replaced right now; look again
                    continue
                who = f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"
                if holder.get("host") != mine["host"]:
                    raise RunFolderError(f"{self.path.parent} is locked by a trainer on another machine ({who}); "
                                         f"two trainers in one folder overwrite each other's checkpoints. If that "
                                         f"run is gone, delete {self.path}")
                if self._running(holder):
                    raise RunFolderError(f"{self.path.parent} is in use by another trainer ({who}); two trainers "
                                         f"in one folder overwrite each other's checkpoints: stop it, or use "
                                         f"another --exp-name or --output-dir")
                notice = f"took over the stale lock {self.path} ({who}: no longer running)"
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
            raise RunFolderError(f"could not take the lock {self.path}; delete it if no trainer uses the folder")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            holder = self._read()
            if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink(missing_ok=True)
            self.held = False


def _any_rank_failed(failure: Optional[BaseException]) -> Optional[BaseException]:
    if not dist.is_initialized():
        return failure
    flag = torch.tensor([1.0 if failure is not None else 0.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag)
    if flag.item() > 0 and failure is None:
        return OSError("another rank failed to write its part")
    return failure


# -- RNG state ----------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to ``path`` via a temporary name in the same directory."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)


def official_checkpoint_file(exp_path, train_steps: int) -> str:
    """The single-file checkpoint of step ``train_steps`` in an experiment directory: the
    official layout ``checkpoints/<step:07d>.pt``, or ours ``checkpoints/<step:07d>/official.pt``."""
    name = f"{int(train_steps):07d}"
    official = os.path.join(exp_path, "checkpoints", name + ".pt")
    ours = os.path.join(exp_path, "checkpoints", name, "official.pt")
    return ours if not os.path.isfile(official) and os.path.isfile(ours) else official
