"""Writing record files: ``RecordWriter`` streams records into a new file and publishes it atomically.

The format itself (header, dtypes, checksums) is in ``record_format``.
"""

from __future__ import annotations

import os
import secrets
import zlib
from typing import Optional, Sequence

import numpy as np

from .record_format import (DTYPES, HEADER_SIZE, MAX_DIMS, dtype_name, is_torch_tensor, labels_offset_for,
                            pack_header, record_crc32, record_crcs_path, torch_to_numpy, write_record_crcs)


class RecordWriter:
    """Streams records into a new record file, published atomically on ``close()``.

    Data goes to a hidden temporary file in the destination directory
    (``.<name>.tmp-<pid>-<random>``); ``close()`` writes the labels and the header,
    fsyncs the file, renames it onto ``path`` and fsyncs the directory. Until then
    nothing exists at ``path`` (or the previous file there is untouched). Leaving a
    ``with`` block through an exception, or dropping an unclosed writer, deletes the
    temporary file; a killed process may leave one behind (safe to delete).

    ``append(x, labels)`` takes one record (shape ``record_shape``) or a batch
    (``[n, *record_shape]``) as a NumPy array or CPU torch tensor of exactly the file's
    dtype (no silent casts; bfloat16 as a torch.bfloat16 tensor or raw uint16/int16
    bits), and ``labels``: an int or ``n`` ints (required iff ``with_labels``).
    """

    def __init__(self, path, dtype, record_shape: Sequence[int], with_labels: bool = True,
                 record_crcs: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        self._record_crcs: Optional[list] = [] if record_crcs else None
        self.dtype = dtype_name(dtype)
        self.record_shape = tuple(int(d) for d in record_shape)
        if len(self.record_shape) > MAX_DIMS or any(d <= 0 for d in self.record_shape):
            raise ValueError(
                f"record file '{self.path}': record_shape must have at most {MAX_DIMS} "
                f"positive dims, got {tuple(record_shape)}"
            )
        self.with_labels = bool(with_labels)
        self._storage = DTYPES[self.dtype][1]
        self.record_bytes = self._storage.itemsize * int(np.prod(self.record_shape, dtype=np.int64))
        directory, name = os.path.split(self.path)
        if not os.path.isdir(directory):
            raise ValueError(f"record file '{self.path}': directory does not exist")
        self._tmp_path = os.path.join(
            directory, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        )
        self._file = open(self._tmp_path, "xb")
        self._file.write(b"\0" * HEADER_SIZE)  # the real header is written by close()
        self._crc = 0
        self.count = 0
        self._labels: list = []
        self._done = False

    # context manager: publish on success, discard on error
    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        # An unclosed writer is an unfinished file: never publish it implicitly.
        if not getattr(self, "_done", True):
            try:
                self.abort()
            except Exception:  # interpreter shutdown: os/file objects may be gone
                pass

    def _records_array(self, records) -> np.ndarray:
        what = f"record file '{self.path}': records"
        arr = torch_to_numpy(records, what) if is_torch_tensor(records) else np.asarray(records)
        ok = arr.dtype == self._storage or (
            self.dtype == "bfloat16" and arr.dtype in (np.dtype(np.int16), np.dtype(np.uint16))
        )
        if not ok:
            raise TypeError(f"{what} have dtype {arr.dtype}, the file stores {self.dtype}")
        if arr.shape == self.record_shape:
            arr = arr[None]
        elif arr.shape[1:] != self.record_shape:
            raise ValueError(
                f"{what} have shape {arr.shape}, expected {self.record_shape} or "
                f"[n, {', '.join(map(str, self.record_shape))}]"
            )
        return np.ascontiguousarray(arr)

    def append(self, records, labels=None) -> None:
        if self._done:
            raise ValueError(f"record file '{self.path}': writer is closed")
        arr = self._records_array(records)
        n = arr.shape[0]
        if self.with_labels:
            if labels is None:
                raise ValueError(f"record file '{self.path}': labels are required (with_labels=True)")
            lab = torch_to_numpy(labels, "labels") if is_torch_tensor(labels) else np.asarray(labels)
            if lab.dtype.kind not in "iu":
                raise TypeError(f"record file '{self.path}': labels must be integers, got {lab.dtype}")
            lab = lab.astype(np.int64).reshape(-1)
            if lab.shape[0] != n:
                raise ValueError(
                    f"record file '{self.path}': {n} records but {lab.shape[0]} labels"
                )
            self._labels.append(lab)
        elif labels is not None:
            raise ValueError(f"record file '{self.path}': labels given but with_labels=False")
        raw = arr.reshape(-1).view(np.uint8)
        self._file.write(raw)
        self._crc = zlib.crc32(raw, self._crc)
        if self._record_crcs is not None:
            rows = raw.reshape(n, -1)
            self._record_crcs.extend(record_crc32(rows[i], lab[i] if self.with_labels else None) for i in range(n))
        self.count += n

    def close(self) -> str:
        """Finish the file and atomically move it to ``path``; returns ``path``."""
        if self._done:
            return self.path
        try:
            f = self._file
            if self.with_labels:
                end = HEADER_SIZE + self.count * self.record_bytes
                f.write(b"\0" * (labels_offset_for(self.count, self.record_bytes) - end))
                labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)
                raw = labels.astype("<i8").view(np.uint8)
                f.write(raw)
                self._crc = zlib.crc32(raw, self._crc)
            f.seek(0)
            f.write(pack_header(self.dtype, self.record_shape, self.count, self.with_labels, self._crc))
            f.flush()
            os.fsync(f.fileno())
            f.close()
            if self._record_crcs is not None:
                # Published before the record file, so a new record file never lacks its sidecar.
                write_record_crcs(self.path, np.array(self._record_crcs, np.uint32), self._crc)
            elif os.path.exists(record_crcs_path(self.path)):
                os.unlink(record_crcs_path(self.path))  # it describes the file being replaced
            os.replace(self._tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        # Make the rename itself durable.
        dir_fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.path

    def abort(self) -> None:
        """Discard everything written; ``path`` is left as it was."""
        if self._done:
            return
        self._done = True
        try:
            self._file.close()
        finally:
            try:
                os.unlink(self._tmp_path)
            except FileNotFoundError:
                pass
