"""Reading record files: ``RecordReader`` hands out shuffled, rank-sharded, resumable batches.

Training a SiT on cached VAE latents reads tens of thousands of small samples per second;
a Python ``Dataset`` + ``DataLoader`` spends that time in per-sample Python calls and the
GIL. Here a batch is one call: the native extension ``repa_e_fast._C`` gathers the
records of a batch out of a memory-mapped file with a pool of C++ threads, GIL released,
into a reusable (optionally pinned) buffer, while the next batches are prefetched in the
background. Without the extension (``REPA_E_FAST_NO_NATIVE=1``, or it failed to build)
the same API runs on NumPy (``np.take`` from a ``np.memmap``): slower, identical batches.

Which records form which batch is ``order.SampleOrder``, shared with the image loaders.
The file format and its checks are in ``record_format``.
"""

from __future__ import annotations

import os
import sys
import zlib
from typing import Iterator, Optional

import numpy as np

from .native_extension import native_available, require_native
from .order import IMPLEMENTATIONS, OrderCursor, SampleOrder
from .record_format import (FORMAT_VERSION, HEADER_SIZE, is_torch_tensor, read_header, read_record_crcs,
                            record_crc32, record_crcs_path, torch_to_numpy)


def _default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _buffers_free(pair) -> int:
    """How referenced the buffers of a pool entry are (max over the two arrays)."""
    # Each getrefcount() sees the pool tuple's reference plus its own argument.
    rec_refs = sys.getrefcount(pair[0])
    lab_refs = sys.getrefcount(pair[1]) if pair[1] is not None else 0
    return max(rec_refs, lab_refs)


# The count for a buffer nobody else holds. Measured at import time, because the exact
# number differs between Python versions.
_FREE_REFS = _buffers_free((np.empty(1), np.empty(1)))


class RecordReader(OrderCursor):
    """Batches of records from a record file: shuffled, rank-sharded, resumable.

    ``for records, labels in reader:`` runs from the current cursor to the end of the
    current epoch, then moves the cursor to the start of the next epoch. ``records`` is
    ``[n, *record_shape]`` (bfloat16 as uint16 bits in NumPy), ``labels`` ``int64 [n]``
    or None for a file without labels; torch tensors when ``as_torch=True`` (bfloat16
    as torch.bfloat16, pinned memory with ``pin_memory=True``).

    Yielded arrays live in recycled buffers, but a buffer is only reused once nothing
    outside the reader refers to it any more (the reader checks reference counts), so a
    batch you keep is never overwritten.

    The batches follow ``order.SampleOrder`` (``reader.order``), the sample order of the
    image loaders, so a run resumes the same way on either.

    ``implementation``: ``"native"`` (C++ threads, GIL released, ``prefetch`` batches
    gathered in the background), ``"python"`` (NumPy ``np.take`` on a memmap, synchronous),
    ``"auto"`` (native when the extension imports). Both give identical batches;
    ``reader.implementation`` says which one runs.
    """

    def __init__(
        self,
        path,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_threads: Optional[int] = None,
        prefetch: int = 2,
        implementation: str = "auto",
        as_torch: bool = False,
        pin_memory: bool = False,
    ):
        path = os.fspath(path)
        for name, value in (("batch_size", batch_size), ("world_size", world_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"record file '{path}': {name} must be an int >= 1, got {value!r}")
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise ValueError(f"record file '{path}': rank {rank!r} not in [0, {world_size})")
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
            raise ValueError(f"record file '{path}': seed must be an int in [0, 2**64), got {seed!r}")
        if not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
            raise ValueError(f"record file '{path}': prefetch must be an int >= 0, got {prefetch!r}")
        if implementation not in ("auto", *IMPLEMENTATIONS):
            raise ValueError(f"record file '{path}': implementation must be auto|native|python, "
                             f"got {implementation!r}")
        if num_threads is None:
            num_threads = _default_threads()
        if not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
            raise ValueError(f"record file '{path}': num_threads must be an int >= 1, got {num_threads!r}")
        if implementation == "native":
            require_native(f"record file '{path}'")
        if pin_memory:
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"record file '{path}': pin_memory=True needs CUDA")

        # Everything about the file is checked here, before any thread is started.
        self.info = read_header(path)
        self.record_crcs = read_record_crcs(self.info)
        self.path = path
        self.prefetch = int(prefetch)
        self.as_torch = bool(as_torch)
        self.pin_memory = bool(pin_memory)
        n = self.info.count
        self.implementation = "native" if (implementation != "python" and native_available()) else "python"
        self.order = SampleOrder(n, int(batch_size), int(rank), int(world_size), int(seed), bool(shuffle),
                                 bool(drop_last), implementation=self.implementation)
        if self.order.num_batches == 0:
            raise ValueError(
                f"record file '{path}': {n} records give no batch of {batch_size} per rank "
                f"for {world_size} rank(s) (drop_last={bool(drop_last)})"
            )

        self.num_threads = int(num_threads) if self.implementation == "native" else 1
        self._store = None
        self._records_mm = None
        self._labels_mm = None
        if self.implementation == "native":
            self._store = require_native(f"record file '{path}'").RecordStore(path, self.num_threads)
        else:
            self._records_mm = np.memmap(
                path, dtype=self.info.storage_dtype, mode="r", offset=HEADER_SIZE,
                shape=(n, *self.info.record_shape),
            )
            if self.info.has_labels:
                self._labels_mm = np.memmap(
                    path, dtype="<i8", mode="r", offset=self.info.labels_offset, shape=(n,)
                )

        self._epoch = 0
        self._position = 0  # batches of this epoch already handed out
        self._pending: list = []  # native: (batch_index, ticket, buffer pair, n), in order
        self._free: list = []  # recycled (records, labels) buffer pairs
        self._closed = False

    # ---------------------------------------------------------------- cursor

    @property
    def num_records(self) -> int:
        return self.info.count

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch.

        Calling it with the current epoch keeps the position, so a training loop that
        calls ``set_epoch(e)`` at the top of every epoch still resumes mid-epoch after
        ``load_state_dict``.
        """
        if not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"record file '{self.path}': epoch must be an int >= 0, got {epoch!r}")
        if int(epoch) != self._epoch:
            self._drain()
            self._epoch = int(epoch)
            self._position = 0

    def state_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "epoch": self._epoch,
            "position": self._position,
            **self.order.settings(),
            "num_records": self.info.count,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the reader that produced ``state`` stopped.

        The settings that define the order (seed, shuffle, drop_last, batch_size,
        world_size, num_records) must match; ``rank`` may differ (each rank loads its
        own state, and all ranks are always at the same position).
        """
        for key in ("seed", "shuffle", "drop_last", "batch_size", "world_size", "num_records"):
            mine = self.state_dict()[key]
            if key not in state:
                raise ValueError(f"record file '{self.path}': state_dict lacks '{key}'")
            if state[key] != mine:
                raise ValueError(
                    f"record file '{self.path}': cannot resume, state has {key}={state[key]!r} "
                    f"but this reader has {key}={mine!r}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.order.num_batches:
            raise ValueError(
                f"record file '{self.path}': bad cursor epoch={epoch} position={position} "
                f"(epoch has {self.order.num_batches} batches)"
            )
        self._drain()
        self._epoch, self._position = epoch, position

    # ---------------------------------------------------------------- buffers

    def _acquire(self):
        # Reuse a pooled buffer pair only if nothing outside the pool refers to it (a
        # batch the caller kept, a view of it, a torch tensor made from it).
        for i, pair in enumerate(self._free):
            if _buffers_free(pair) <= _FREE_REFS:
                return self._free.pop(i)
        return self._allocate()

    def _allocate(self):
        shape = (self.batch_size, *self.info.record_shape)
        storage = self.info.storage_dtype
        if self.pin_memory:
            import torch

            tdtype = {np.dtype(np.uint16): torch.int16}.get(storage, None)
            if tdtype is None:
                tdtype = torch.from_numpy(np.empty(0, storage)).dtype
            rec = torch.empty(shape, dtype=tdtype, pin_memory=True).numpy().view(storage)
            lab = (
                torch.empty(self.batch_size, dtype=torch.int64, pin_memory=True).numpy()
                if self.info.has_labels else None
            )
        else:
            rec = np.empty(shape, dtype=storage)
            lab = np.empty(self.batch_size, dtype=np.int64) if self.info.has_labels else None
        return rec, lab

    def _release(self, pair) -> None:
        self._free.append(pair)
        # Keep a bounded pool; forget buffers the caller still holds first (they are
        # freed when the caller drops them), then the oldest.
        limit = self.prefetch + 4
        if len(self._free) > limit:
            free = [p for p in self._free if _buffers_free(p) <= _FREE_REFS]
            busy = [p for p in self._free if _buffers_free(p) > _FREE_REFS]
            self._free = (busy + free)[-limit:]

    def _wrap(self, rec: np.ndarray, lab: Optional[np.ndarray]):
        if not self.as_torch:
            return rec, lab
        import torch

        t = torch.from_numpy(rec)
        if self.info.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t, (torch.from_numpy(lab) if lab is not None else None)

    # ---------------------------------------------------------------- reading

    def _check_open(self):
        if self._closed:
            raise ValueError(f"record file '{self.path}': reader is closed")

    def _gather(self, idx: np.ndarray, rec: np.ndarray, lab: Optional[np.ndarray]) -> None:
        """Synchronous gather of records ``idx`` into ``rec`` (and labels into ``lab``)."""
        if self._store is not None:
            self._store.gather(idx, rec, lab)
            return
        np.take(self._records_mm, idx, axis=0, out=rec)
        if lab is not None:
            np.take(self._labels_mm, idx, out=lab)

    def _submit(self, batch: int) -> None:
        idx = self.order.batch_indices(self._epoch, batch)
        pair = self._acquire()
        n = len(idx)
        rec = pair[0][:n]
        lab = pair[1][:n] if pair[1] is not None else None
        ticket = self._store.submit(idx, rec, lab)
        self._pending.append((batch, ticket, pair, n))

    def _drain(self) -> None:
        """Wait for and discard prefetched batches (their buffers go back to the pool)."""
        while self._pending:
            _, ticket, pair, _ = self._pending.pop(0)
            self._store.wait(ticket)
            self._release(pair)

    def _next_batch(self):
        batch = self._position
        if self._store is not None:
            # Keep `prefetch` batches queued beyond the one we are about to return.
            if self._pending and self._pending[0][0] != batch:
                self._drain()
            next_batch = self._pending[-1][0] + 1 if self._pending else batch
            while next_batch < self.order.num_batches and len(self._pending) <= self.prefetch:
                self._submit(next_batch)
                next_batch += 1
            _, ticket, pair, n = self._pending.pop(0)
            self._store.wait(ticket)
        else:
            idx = self.order.batch_indices(self._epoch, batch)
            pair = self._acquire()
            n = len(idx)
            self._gather(idx, pair[0][:n], pair[1][:n] if pair[1] is not None else None)
        self._position += 1
        self._release(pair)
        rec = pair[0] if n == self.batch_size else pair[0][:n]
        lab = pair[1] if (pair[1] is None or n == self.batch_size) else pair[1][:n]
        return self._wrap(rec, lab)

    def __iter__(self) -> Iterator:
        self._check_open()
        return self._epoch_iterator()

    def _epoch_iterator(self):
        while self._position < self.order.num_batches:
            yield self._next_batch()
        self._drain()
        self._epoch += 1
        self._position = 0

    def _as_out_array(self, out, what: str, dtype: np.dtype, tail: tuple) -> np.ndarray:
        if is_torch_tensor(out):
            if not out.is_contiguous():
                raise TypeError(f"record file '{self.path}': {what} must be contiguous")
            arr = torch_to_numpy(out, f"record file '{self.path}': {what}")
        elif isinstance(out, np.ndarray):
            arr = out
        else:
            raise TypeError(
                f"record file '{self.path}': {what} must be a NumPy array or CPU torch tensor, "
                f"got {type(out).__name__}"
            )
        ok = arr.dtype == dtype or (
            self.info.dtype == "bfloat16" and what == "out"
            and arr.dtype in (np.dtype(np.int16), np.dtype(np.uint16))
        )
        if not ok:
            raise TypeError(
                f"record file '{self.path}': {what} has dtype {arr.dtype}, expected "
                f"{self.info.dtype if what == 'out' else 'int64'}"
            )
        if not arr.flags.c_contiguous:
            raise TypeError(f"record file '{self.path}': {what} must be C-contiguous")
        if not arr.flags.writeable:
            raise TypeError(f"record file '{self.path}': {what} is read-only")
        if arr.ndim != 1 + len(tail) or tuple(arr.shape[1:]) != tail:
            raise ValueError(
                f"record file '{self.path}': {what} has shape {tuple(arr.shape)}, expected "
                f"[{self.batch_size}, {', '.join(map(str, tail))}]".replace(", ]", "]")
            )
        if arr.shape[0] != self.batch_size:
            raise ValueError(
                f"record file '{self.path}': {what} holds {arr.shape[0]} records, expected "
                f"batch_size={self.batch_size}"
            )
        return arr.view(dtype) if arr.dtype != dtype else arr

    def read_batch_into(self, out, labels_out=None) -> int:
        """Gather the next batch into ``out`` (``[batch_size, *record_shape]``, NumPy
        array or CPU torch tensor, pinned or not) and ``labels_out`` (int64
        ``[batch_size]``) and advance the cursor. Returns the number of records written
        (the first ones; the last batch may be short with drop_last=False); 0 means the
        epoch is over, and the cursor has moved to the start of the next epoch.
        """
        self._check_open()
        rec = self._as_out_array(out, "out", self.info.storage_dtype, self.info.record_shape)
        lab = None
        if labels_out is not None:
            if not self.info.has_labels:
                raise ValueError(f"record file '{self.path}': file has no labels")
            lab = self._as_out_array(labels_out, "labels_out", np.dtype(np.int64), ())
        self._drain()
        if self._position >= self.order.num_batches:
            self._epoch += 1
            self._position = 0
            return 0
        idx = self.order.batch_indices(self._epoch, self._position)
        n = len(idx)
        self._gather(idx, rec[:n], lab[:n] if lab is not None else None)
        self._position += 1
        return n

    def get(self, indices):
        """Records (and labels) at explicit record indices, in a new array."""
        self._check_open()
        idx = np.asarray(indices)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"record file '{self.path}': indices must be integers, got {idx.dtype}")
        idx = np.ascontiguousarray(idx.reshape(-1), dtype=np.int64)
        bad = (idx < 0) | (idx >= self.info.count)
        if bad.any():
            raise IndexError(
                f"record file '{self.path}': index {int(idx[bad][0])} out of range "
                f"[0, {self.info.count})"
            )
        rec = np.empty((len(idx), *self.info.record_shape), self.info.storage_dtype)
        lab = np.empty(len(idx), np.int64) if self.info.has_labels else None
        self._gather(idx, rec, lab)
        return self._wrap(rec, lab)

    def check_records(self, indices, records, labels=None) -> None:
        """Compare the records ``indices`` as read (``records`` [n, ...], ``labels`` [n]) with
        the per-record CRCs; ValueError naming the file and the first damaged record. Needs
        the ``.crc.npz`` sidecar (``self.record_crcs``)."""
        if self.record_crcs is None:
            raise ValueError(f"record file '{self.path}': no per-record checksums ({record_crcs_path(self.path)})")
        records = torch_to_numpy(records, "records") if is_torch_tensor(records) else np.asarray(records)
        if labels is not None:
            labels = torch_to_numpy(labels, "labels") if is_torch_tensor(labels) else np.asarray(labels)
        for row, index in enumerate(np.asarray(indices).tolist()):
            crc = record_crc32(records[row], None if labels is None else labels[row])
            if crc != int(self.record_crcs[index]):
                raise ValueError(f"record file '{self.path}': record {index} fails its CRC-32 check "
                                 f"(stored {int(self.record_crcs[index]):#010x}, computed {crc:#010x}): "
                                 "the file is damaged; write it again with python -m repa_e_fast.cache_latents")

    def verify(self, chunk_bytes: int = 64 << 20) -> bool:
        """Recompute the payload CRC-32; ValueError if it differs from the header's."""
        info = self.info
        crc = 0
        spans = [(info.data_offset, info.count * info.record_bytes)]
        if info.has_labels:
            spans.append((info.labels_offset, 8 * info.count))
        buf = bytearray(chunk_bytes)
        view = memoryview(buf)
        with open(self.path, "rb") as f:
            for start, length in spans:
                f.seek(start)
                while length > 0:
                    got = f.readinto(view[: min(chunk_bytes, length)])
                    if not got:
                        raise ValueError(f"record file '{self.path}': file shrank while verifying")
                    crc = zlib.crc32(view[:got], crc)
                    length -= got
        if crc != info.payload_crc32:
            raise ValueError(
                f"record file '{self.path}': payload checksum mismatch "
                f"(stored {info.payload_crc32:#010x}, computed {crc:#010x}): data is corrupted"
            )
        return True

    def close(self) -> None:
        if self._closed:
            return
        if self._store is not None:
            self._drain()
            self._store.close()
        self._closed = True
        self._free.clear()
        self._records_mm = None
        self._labels_mm = None

    def __enter__(self) -> "RecordReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"RecordReader({self.path!r}, {self.info.count} x {self.info.dtype}"
            f"{list(self.info.record_shape)}, batch_size={self.batch_size}, "
            f"rank={self.order.rank}/{self.order.world_size}, implementation={self.implementation}, "
            f"epoch={self._epoch}, position={self._position}/{self.order.num_batches})"
        )
