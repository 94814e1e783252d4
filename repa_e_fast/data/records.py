"""Record store: fixed-size records (cached latents, preprocessed images) in one flat file.

Training a SiT on cached VAE latents reads tens of thousands of small samples per second;
a Python ``Dataset`` + ``DataLoader`` spends that time in per-sample Python calls and the
GIL. Here a batch is one call: the native extension ``repa_e_fast._C`` gathers the
records of a batch out of a memory-mapped file with a pool of C++ threads, GIL released,
into a reusable (optionally pinned) buffer, while the next batches are prefetched in the
background. Without the extension (``REPA_E_FAST_NO_NATIVE=1``, or it failed to build)
the same API runs on NumPy (``np.take`` from a ``np.memmap``): slower, identical batches.

File layout (format version 1, all integers little-endian)
----------------------------------------------------------
::

    offset  size  field
    0       8     magic b"REPAREC\\0"
    8       4     uint32 version = 1
    12      4     uint32 header_size = 4096 (= payload offset)
    16      4     uint32 dtype code: 1 uint8, 2 int8, 3 int16, 4 uint16, 5 int32,
                  6 int64, 7 float16, 8 bfloat16 (raw 2 bytes), 9 float32, 10 float64
    20      4     uint32 ndim of one record (0..8)
    24      64    uint64[8] record shape (unused dims 0)
    88      8     uint64 count (number of records)
    96      8     uint64 record_bytes = itemsize * prod(shape)
    104     8     uint64 data_offset = 4096
    112     8     uint64 labels_offset (0 when the file has no labels)
    120     8     uint64 file_size (the exact size of the file in bytes)
    128     4     uint32 flags (bit 0: int64 labels present)
    132     4     uint32 payload CRC-32 (zlib.crc32 of the records bytes, then of the
                  labels bytes; alignment padding excluded)
    136     8     reserved, zero
    144     4     uint32 header CRC-32 (zlib.crc32 of bytes [0, 144))
    148     3948  zero padding up to 4096
    4096    count*record_bytes   records, contiguous, each C-order
    L       count*8              int64 labels, L = round_up(4096 + count*record_bytes, 64)
                                 (padding bytes before L are zero)

Opening a file checks the header checksum and that every field agrees with the others
and with the real file size, so a truncated or extended file, a wrong magic or version
or a damaged header is a ``ValueError`` naming the file. ``RecordReader.verify()`` also
recomputes the payload CRC (one sequential pass over the file).

Per-record checksums (optional sidecar ``<file>.crc.npz``, ``RecordWriter(record_crcs=True)``)
------------------------------------------------------------------------------------------------
``records``: uint32 [count], ``zlib.crc32`` of each record's bytes followed by its 8 label
bytes (when the file has labels); ``payload_crc32``: the record file's payload CRC, which
ties the sidecar to the file it describes. ``RecordReader.check_records(indices, records,
labels)`` compares a batch against it: one CRC per record read, so a damaged record is found
(by file and index) the first time it is used, at the cost of hashing the bytes a batch reads.

Order of samples
----------------
Epoch permutation (both backends compute the same one; ``epoch_permutation``)::

    mix64(z)    = splitmix64 finaliser (z ^= z>>30; z *= 0xBF58476D1CE4E5B9;
                  z ^= z>>27; z *= 0x94D049BB133111EB; z ^= z>>31; all mod 2**64)
    s           = mix64(mix64(seed) ^ epoch)
    key[i]      = mix64(s + (i + 1) * 0x9E3779B97F4A7C15)
    permutation = argsort(key)   (keys are all distinct, so the order is unique)

``shuffle=False`` uses the identity. Sharding: with ``B`` the per-rank batch size and
``W`` the world size, global step ``k`` takes the contiguous slice
``perm[k*W*B : (k+1)*W*B]`` and rank ``r`` gets ``perm[k*W*B + r*B : k*W*B + (r+1)*B]``
(so the union over ranks of one step is the same set of samples whatever ``W`` is, at
the same global batch). The ``R = N mod (W*B)`` samples left after the last full step are
dropped with ``drop_last=True``; with ``drop_last=False`` they form one last, smaller
batch of ``k = ceil(R/W)`` samples per rank, rank ``r`` taking positions
``N - R + r*k ... + k - 1`` of the permutation, wrapping around to its start
(``(W*k - R) < W`` samples are repeated) so that every rank gets the same number of
batches, as DDP needs.
"""

from __future__ import annotations

import os
import secrets
import struct
import sys
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np

__all__ = [
    "RecordWriter",
    "RecordReader",
    "RecordInfo",
    "read_header",
    "read_record_crcs",
    "record_crc32",
    "epoch_permutation",
    "native_available",
    "native_unavailable_reason",
    "FORMAT_VERSION",
]

MAGIC = b"REPAREC\0"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
MAX_DIMS = 8
LABELS_ALIGN = 64
_FLAG_LABELS = 1
# Fields [0, 144): magic, version, header_size, dtype, ndim, shape[8], count,
# record_bytes, data_offset, labels_offset, file_size, flags, payload_crc, 8 reserved.
_HEADER_STRUCT = struct.Struct("<8sIIII8QQQQQQII8x")
_HEADER_CRC_STRUCT = struct.Struct("<I")
assert _HEADER_STRUCT.size == 144

# name -> (code, NumPy storage dtype). bfloat16 is stored and handed to NumPy as raw
# uint16 bits (NumPy has no bfloat16); torch output views it back as torch.bfloat16.
_DTYPES = {
    "uint8": (1, np.dtype(np.uint8)),
    "int8": (2, np.dtype(np.int8)),
    "int16": (3, np.dtype(np.int16)),
    "uint16": (4, np.dtype(np.uint16)),
    "int32": (5, np.dtype(np.int32)),
    "int64": (6, np.dtype(np.int64)),
    "float16": (7, np.dtype(np.float16)),
    "bfloat16": (8, np.dtype(np.uint16)),
    "float32": (9, np.dtype(np.float32)),
    "float64": (10, np.dtype(np.float64)),
}
_CODE_TO_NAME = {code: name for name, (code, _) in _DTYPES.items()}

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


# --------------------------------------------------------------------------- native


def _load_native():
    if os.environ.get("REPA_E_FAST_NO_NATIVE", "0") == "1":
        return None, "disabled by REPA_E_FAST_NO_NATIVE=1"
    try:
        from repa_e_fast import _C  # noqa: PLC0415 (optional extension)
    except ImportError as exc:
        return None, f"repa_e_fast._C could not be imported ({exc})"
    if not hasattr(_C, "RecordStore"):
        return None, "repa_e_fast._C has no RecordStore (stale build?)"
    return _C, None


_NATIVE, _NATIVE_REASON = _load_native()


def native_available() -> bool:
    """True when the compiled extension can be used."""
    return _NATIVE is not None


def native_unavailable_reason() -> Optional[str]:
    """Why the native backend is not available (None when it is)."""
    return _NATIVE_REASON


# --------------------------------------------------------------------------- dtypes


def _dtype_name(dtype: Any) -> str:
    """Normalise a str / NumPy dtype / torch dtype to one of the _DTYPES names."""
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
    elif type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype":
        name = str(dtype).replace("torch.", "")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError as exc:
            raise TypeError(f"unsupported record dtype {dtype!r}") from exc
    name = {"half": "float16", "float": "float32", "double": "float64", "bf16": "bfloat16"}.get(
        name, name
    )
    if name not in _DTYPES:
        raise TypeError(f"unsupported record dtype {dtype!r}; supported: {sorted(_DTYPES)}")
    return name


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def _torch_to_numpy(t: Any, what: str) -> np.ndarray:
    """A NumPy view of a CPU torch tensor (bfloat16 as raw uint16 bits)."""
    import torch

    if t.device.type != "cpu":
        raise TypeError(f"{what} must be a CPU tensor, got device {t.device}")
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


# --------------------------------------------------------------------------- permutation


def _mix64_int(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix64_np(z: np.ndarray) -> np.ndarray:
    # uint64 array arithmetic wraps modulo 2**64, which is what splitmix64 wants.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def epoch_permutation(n: int, seed: int, epoch: int, backend: str = "numpy") -> np.ndarray:
    """The permutation of range(n) for (seed, epoch), as int64 (see module docstring)."""
    if n < 0 or not (0 <= seed <= _MASK64) or not (0 <= epoch <= _MASK64):
        raise ValueError(f"epoch_permutation: bad arguments n={n} seed={seed} epoch={epoch}")
    if backend == "native":
        if _NATIVE is None:
            raise RuntimeError(f"native backend unavailable: {_NATIVE_REASON}")
        return _NATIVE.permutation(int(n), int(seed), int(epoch))
    s = _mix64_int(_mix64_int(seed) ^ epoch)
    i = np.arange(1, n + 1, dtype=np.uint64)
    keys = _mix64_np(np.uint64(s) + i * np.uint64(_GOLDEN))
    return np.argsort(keys, kind="stable").astype(np.int64, copy=False)


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class RecordInfo:
    """What a record file's header says."""

    path: str
    dtype: str  # one of the _DTYPES names
    record_shape: tuple
    count: int
    record_bytes: int
    data_offset: int
    labels_offset: int  # 0 when there are no labels
    file_size: int
    has_labels: bool
    payload_crc32: int
    version: int

    @property
    def storage_dtype(self) -> np.dtype:
        """NumPy dtype of the records in memory (uint16 for bfloat16)."""
        return _DTYPES[self.dtype][1]


def _labels_offset(count: int, record_bytes: int) -> int:
    end = HEADER_SIZE + count * record_bytes
    return (end + LABELS_ALIGN - 1) // LABELS_ALIGN * LABELS_ALIGN


def _pack_header(dtype: str, shape: tuple, count: int, has_labels: bool, payload_crc: int) -> bytes:
    code, np_dtype = _DTYPES[dtype]
    record_bytes = int(np_dtype.itemsize * int(np.prod(shape, dtype=np.int64)))
    if has_labels:
        labels_offset = _labels_offset(count, record_bytes)
        file_size = labels_offset + 8 * count
    else:
        labels_offset = 0
        file_size = HEADER_SIZE + count * record_bytes
    dims = list(shape) + [0] * (MAX_DIMS - len(shape))
    body = _HEADER_STRUCT.pack(
        MAGIC, FORMAT_VERSION, HEADER_SIZE, code, len(shape), *dims, count, record_bytes,
        HEADER_SIZE, labels_offset, file_size, _FLAG_LABELS if has_labels else 0,
        payload_crc & 0xFFFFFFFF,
    )
    block = body + _HEADER_CRC_STRUCT.pack(zlib.crc32(body))
    return block + b"\0" * (HEADER_SIZE - len(block))


def read_header(path: str) -> RecordInfo:
    """Parse and check a record file's header against the file. ValueError if bad.

    Same checks, in the same order, as the native reader (csrc/record_format.cpp).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        actual = os.fstat(f.fileno()).st_size
        block = f.read(_HEADER_STRUCT.size + 4)

    def fail(what: str):
        raise ValueError(f"record file '{path}': {what}")

    if actual < HEADER_SIZE or len(block) < _HEADER_STRUCT.size + 4:
        fail(f"truncated: file is {actual} bytes, smaller than the {HEADER_SIZE}-byte header")
    fields = _HEADER_STRUCT.unpack(block[: _HEADER_STRUCT.size])
    magic, version, header_size, code, ndim = fields[:5]
    dims = fields[5:13]
    count, record_bytes, data_offset, labels_offset, file_size, flags, payload_crc = fields[13:]
    if magic != MAGIC:
        fail("bad magic (not a repa_e_fast record file)")
    if version != FORMAT_VERSION:
        fail(f"unsupported format version {version} (this build reads version {FORMAT_VERSION})")
    (stored_crc,) = _HEADER_CRC_STRUCT.unpack(block[_HEADER_STRUCT.size :])
    if zlib.crc32(block[: _HEADER_STRUCT.size]) != stored_crc:
        fail("header checksum mismatch (corrupted header)")
    if header_size != HEADER_SIZE or data_offset != HEADER_SIZE:
        fail("header size / data offset is not 4096")
    if code not in _CODE_TO_NAME:
        fail(f"unknown dtype code {code}")
    if ndim > MAX_DIMS:
        fail(f"record ndim {ndim} > 8")
    if flags & ~_FLAG_LABELS:
        fail("unknown flag bits")
    shape = tuple(int(d) for d in dims[:ndim])
    if any(d == 0 for d in shape):
        fail("record shape has a zero dimension")
    dtype = _CODE_TO_NAME[code]
    expected_bytes = _DTYPES[dtype][1].itemsize
    for d in shape:
        expected_bytes *= d
        if expected_bytes > 1 << 48:
            fail("record size is absurd")
    if expected_bytes != record_bytes:
        fail("record byte size disagrees with dtype and shape")
    has_labels = bool(flags & _FLAG_LABELS)
    if has_labels:
        if labels_offset != _labels_offset(count, record_bytes):
            fail("labels offset disagrees with the record count")
        expected_size = labels_offset + 8 * count
    else:
        if labels_offset != 0:
            fail("labels offset set but the labels flag is not")
        expected_size = HEADER_SIZE + count * record_bytes
    if expected_size != file_size:
        fail("header file size disagrees with the record count")
    if file_size != actual:
        kind = "truncated" if actual < file_size else "trailing bytes"
        fail(f"header says the file is {file_size} bytes but it is {actual} bytes ({kind})")
    return RecordInfo(
        path=path, dtype=dtype, record_shape=shape, count=count, record_bytes=record_bytes,
        data_offset=data_offset, labels_offset=labels_offset, file_size=file_size,
        has_labels=has_labels, payload_crc32=payload_crc, version=version,
    )


# --------------------------------------------------------------------------- per-record CRCs


def record_crcs_path(path) -> str:
    return os.fspath(path) + ".crc.npz"


def record_crc32(record: np.ndarray, label=None) -> int:
    """CRC-32 of one record's bytes, then of its int64 label (when there is one)."""
    crc = zlib.crc32(np.ascontiguousarray(record).view(np.uint8))
    return crc if label is None else zlib.crc32(np.int64(label).astype("<i8").tobytes(), crc)


def _write_record_crcs(path: str, crcs: np.ndarray, payload_crc: int) -> None:
    target = record_crcs_path(path)
    tmp = f"{target}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, records=crcs, payload_crc32=np.uint32(payload_crc & 0xFFFFFFFF))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def read_record_crcs(info: "RecordInfo") -> Optional[np.ndarray]:
    """The per-record CRCs of a record file (None when it has no sidecar); ValueError when
    the sidecar does not belong to this file."""
    sidecar = record_crcs_path(info.path)
    if not os.path.exists(sidecar):
        return None
    try:
        with np.load(sidecar) as data:
            crcs, payload_crc = data["records"], int(data["payload_crc32"])
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"record file '{info.path}': unreadable checksum file {sidecar} ({exc})") from None
    if crcs.shape != (info.count,) or payload_crc != info.payload_crc32:
        raise ValueError(f"record file '{info.path}': {sidecar} belongs to another version of the file "
                         f"({len(crcs)} records, payload CRC {payload_crc:#010x}; the file has {info.count}, "
                         f"{info.payload_crc32:#010x})")
    return crcs


# --------------------------------------------------------------------------- writer


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
        self.dtype = _dtype_name(dtype)
        self.record_shape = tuple(int(d) for d in record_shape)
        if len(self.record_shape) > MAX_DIMS or any(d <= 0 for d in self.record_shape):
            raise ValueError(
                f"record file '{self.path}': record_shape must have at most {MAX_DIMS} "
                f"positive dims, got {tuple(record_shape)}"
            )
        self.with_labels = bool(with_labels)
        self._storage = _DTYPES[self.dtype][1]
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
        arr = _torch_to_numpy(records, what) if _is_torch_tensor(records) else np.asarray(records)
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
            lab = _torch_to_numpy(labels, "labels") if _is_torch_tensor(labels) else np.asarray(labels)
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
                f.write(b"\0" * (_labels_offset(self.count, self.record_bytes) - end))
                labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)
                raw = labels.astype("<i8").view(np.uint8)
                f.write(raw)
                self._crc = zlib.crc32(raw, self._crc)
            f.seek(0)
            f.write(_pack_header(self.dtype, self.record_shape, self.count, self.with_labels, self._crc))
            f.flush()
            os.fsync(f.fileno())
            f.close()
            if self._record_crcs is not None:
                # Published before the record file, so a new record file never lacks its sidecar.
                _write_record_crcs(self.path, np.array(self._record_crcs, np.uint32), self._crc)
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


# --------------------------------------------------------------------------- reader


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


class RecordReader:
    """Batches of records from a record file: shuffled, rank-sharded, resumable.

    ``for records, labels in reader:`` runs from the current cursor to the end of the
    current epoch, then moves the cursor to the start of the next epoch. ``records`` is
    ``[n, *record_shape]`` (bfloat16 as uint16 bits in NumPy), ``labels`` ``int64 [n]``
    or None for a file without labels; torch tensors when ``as_torch=True`` (bfloat16
    as torch.bfloat16, pinned memory with ``pin_memory=True``).

    Yielded arrays live in recycled buffers, but a buffer is only reused once nothing
    outside the reader refers to it any more (the reader checks reference counts), so a
    batch you keep is never overwritten.

    Backends: ``"native"`` (C++ threads, GIL released, ``prefetch`` batches gathered in
    the background), ``"numpy"`` (``np.take`` on a memmap, synchronous), ``"auto"``
    (native when the extension imports). ``reader.backend`` says which one runs.
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
        backend: str = "auto",
        as_torch: bool = False,
        pin_memory: bool = False,
    ):
        path = os.fspath(path)
        for name, value in (("batch_size", batch_size), ("world_size", world_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"record file '{path}': {name} must be an int >= 1, got {value!r}")
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise ValueError(f"record file '{path}': rank {rank!r} not in [0, {world_size})")
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed <= _MASK64:
            raise ValueError(f"record file '{path}': seed must be an int in [0, 2**64), got {seed!r}")
        if not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
            raise ValueError(f"record file '{path}': prefetch must be an int >= 0, got {prefetch!r}")
        if backend not in ("auto", "native", "numpy"):
            raise ValueError(f"record file '{path}': backend must be auto|native|numpy, got {backend!r}")
        if num_threads is None:
            num_threads = _default_threads()
        if not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
            raise ValueError(f"record file '{path}': num_threads must be an int >= 1, got {num_threads!r}")
        if backend == "native" and _NATIVE is None:
            raise RuntimeError(f"record file '{path}': native backend unavailable: {_NATIVE_REASON}")
        if pin_memory:
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"record file '{path}': pin_memory=True needs CUDA")

        # Everything about the file is checked here, before any thread is started.
        self.info = read_header(path)
        self.record_crcs = read_record_crcs(self.info)
        self.path = path
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.prefetch = int(prefetch)
        self.as_torch = bool(as_torch)
        self.pin_memory = bool(pin_memory)
        n = self.info.count
        step = self.batch_size * self.world_size
        self._full_steps = n // step
        self._tail = n - self._full_steps * step
        self._num_batches = self._full_steps + (1 if (self._tail and not self.drop_last) else 0)
        if self._num_batches == 0:
            raise ValueError(
                f"record file '{path}': {n} records give no batch of {self.batch_size} per rank "
                f"for {self.world_size} rank(s) (drop_last={self.drop_last})"
            )

        self.backend = "native" if (backend != "numpy" and _NATIVE is not None) else "numpy"
        self.num_threads = int(num_threads) if self.backend == "native" else 1
        self._store = None
        self._records_mm = None
        self._labels_mm = None
        if self.backend == "native":
            self._store = _NATIVE.RecordStore(path, self.num_threads)
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
        self._perm_epoch = None
        self._perm = None
        self._pending: list = []  # native: (batch_index, ticket, buffer pair, n), in order
        self._free: list = []  # recycled (records, labels) buffer pairs
        self._closed = False

    # ---------------------------------------------------------------- cursor

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self._num_batches

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Batches of the current epoch already returned."""
        return self._position

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
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
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
        if epoch < 0 or not 0 <= position <= self._num_batches:
            raise ValueError(
                f"record file '{self.path}': bad cursor epoch={epoch} position={position} "
                f"(epoch has {self._num_batches} batches)"
            )
        self._drain()
        self._epoch, self._position = epoch, position

    # ---------------------------------------------------------------- order

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self._epoch:
            n = self.info.count
            if not self.shuffle:
                self._perm = np.arange(n, dtype=np.int64)
            else:
                self._perm = epoch_permutation(n, self.seed, self._epoch, backend=self.backend)
            self._perm_epoch = self._epoch
        return self._perm

    def batch_indices(self, batch: int, epoch: Optional[int] = None) -> np.ndarray:
        """Record indices of this rank's batch ``batch`` of ``epoch`` (default: current)."""
        if not 0 <= batch < self._num_batches:
            raise IndexError(f"record file '{self.path}': batch {batch} not in [0, {self._num_batches})")
        if epoch is not None and epoch != self._epoch:
            n = self.info.count
            perm = (
                epoch_permutation(n, self.seed, epoch, backend=self.backend)
                if self.shuffle else np.arange(n, dtype=np.int64)
            )
        else:
            perm = self._permutation()
        B, W, r = self.batch_size, self.world_size, self.rank
        if batch < self._full_steps:
            start = batch * W * B + r * B
            return perm[start : start + B]
        k = -(-self._tail // W)  # ceil(R / W)
        pos = self._full_steps * W * B + r * k + np.arange(k, dtype=np.int64)
        return perm[pos % self.info.count]  # wraps to the start: < W repeated samples

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
        idx = self.batch_indices(batch)
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
            while next_batch < self._num_batches and len(self._pending) <= self.prefetch:
                self._submit(next_batch)
                next_batch += 1
            _, ticket, pair, n = self._pending.pop(0)
            self._store.wait(ticket)
        else:
            idx = self.batch_indices(batch)
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
        while self._position < self._num_batches:
            yield self._next_batch()
        self._drain()
        self._epoch += 1
        self._position = 0

    def _as_out_array(self, out, what: str, dtype: np.dtype, tail: tuple) -> np.ndarray:
        if _is_torch_tensor(out):
            if not out.is_contiguous():
                raise TypeError(f"record file '{self.path}': {what} must be contiguous")
            arr = _torch_to_numpy(out, f"record file '{self.path}': {what}")
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
        if self._position >= self._num_batches:
            self._epoch += 1
            self._position = 0
            return 0
        idx = self.batch_indices(self._position)
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
        records = _torch_to_numpy(records, "records") if _is_torch_tensor(records) else np.asarray(records)
        if labels is not None:
            labels = _torch_to_numpy(labels, "labels") if _is_torch_tensor(labels) else np.asarray(labels)
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
            f"rank={self.rank}/{self.world_size}, backend={self.backend}, epoch={self._epoch}, "
            f"position={self._position}/{self._num_batches})"
        )
