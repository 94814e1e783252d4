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
one just written.
"""

import json
import os
import random
import re
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.distributed as dist

MANIFEST = "MANIFEST.json"
CHECKPOINT_NAME = re.compile(r"^\d{7}$")


class CheckpointWriteError(RuntimeError):
    pass


class NoGoodCheckpoint(RuntimeError):
    pass


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
                shutil.rmtree(old, ignore_errors=True)
                link = self.root / f"{old.name}.pt"
                if link.is_file():
                    link.unlink()  # the link alone would keep the deleted checkpoint's data
                excess -= 1
        for stale in self.root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

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
