"""The record file format: fixed-size records (cached latents, preprocessed images) in one flat file.

What is on disk and how it is checked: the header, the dtypes, the payload CRC-32 and the
optional per-record CRC sidecar. ``record_writer.RecordWriter`` writes these files and
``record_reader.RecordReader`` reads them; the native extension parses the same header in
``csrc/record_format.cpp`` with the same checks and error messages.

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
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

MAGIC = b"REPAREC\0"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
MAX_DIMS = 8
LABELS_ALIGN = 64
FLAG_LABELS = 1
# Fields [0, 144): magic, version, header_size, dtype, ndim, shape[8], count,
# record_bytes, data_offset, labels_offset, file_size, flags, payload_crc, 8 reserved.
HEADER_STRUCT = struct.Struct("<8sIIII8QQQQQQII8x")
HEADER_CRC_STRUCT = struct.Struct("<I")
assert HEADER_STRUCT.size == 144

# name -> (code, NumPy storage dtype). bfloat16 is stored and handed to NumPy as raw
# uint16 bits (NumPy has no bfloat16); torch output views it back as torch.bfloat16.
DTYPES = {
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
CODE_TO_NAME = {code: name for name, (code, _) in DTYPES.items()}


# --------------------------------------------------------------------------- dtypes


def dtype_name(dtype: Any) -> str:
    """Normalise a str / NumPy dtype / torch dtype to one of the DTYPES names."""
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
    if name not in DTYPES:
        raise TypeError(f"unsupported record dtype {dtype!r}; supported: {sorted(DTYPES)}")
    return name


def is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def torch_to_numpy(t: Any, what: str) -> np.ndarray:
    """A NumPy view of a CPU torch tensor (bfloat16 as raw uint16 bits)."""
    import torch

    if t.device.type != "cpu":
        raise TypeError(f"{what} must be a CPU tensor, got device {t.device}")
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class RecordInfo:
    """What a record file's header says."""

    path: str
    dtype: str  # one of the DTYPES names
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
        return DTYPES[self.dtype][1]


def labels_offset_for(count: int, record_bytes: int) -> int:
    end = HEADER_SIZE + count * record_bytes
    return (end + LABELS_ALIGN - 1) // LABELS_ALIGN * LABELS_ALIGN


def pack_header(dtype: str, shape: tuple, count: int, has_labels: bool, payload_crc: int) -> bytes:
    code, np_dtype = DTYPES[dtype]
    record_bytes = int(np_dtype.itemsize * int(np.prod(shape, dtype=np.int64)))
    if has_labels:
        labels_offset = labels_offset_for(count, record_bytes)
        file_size = labels_offset + 8 * count
    else:
        labels_offset = 0
        file_size = HEADER_SIZE + count * record_bytes
    dims = list(shape) + [0] * (MAX_DIMS - len(shape))
    body = HEADER_STRUCT.pack(
        MAGIC, FORMAT_VERSION, HEADER_SIZE, code, len(shape), *dims, count, record_bytes,
        HEADER_SIZE, labels_offset, file_size, FLAG_LABELS if has_labels else 0,
        payload_crc & 0xFFFFFFFF,
    )
    block = body + HEADER_CRC_STRUCT.pack(zlib.crc32(body))
    return block + b"\0" * (HEADER_SIZE - len(block))


def read_header(path: str) -> RecordInfo:
    """Parse and check a record file's header against the file. ValueError if bad.

    Same checks, in the same order, as the native reader (csrc/record_format.cpp).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        actual = os.fstat(f.fileno()).st_size
        block = f.read(HEADER_STRUCT.size + 4)

    def fail(what: str):
        raise ValueError(f"record file '{path}': {what}")

    if actual < HEADER_SIZE or len(block) < HEADER_STRUCT.size + 4:
        fail(f"truncated: file is {actual} bytes, smaller than the {HEADER_SIZE}-byte header")
    fields = HEADER_STRUCT.unpack(block[: HEADER_STRUCT.size])
    magic, version, header_size, code, ndim = fields[:5]
    dims = fields[5:13]
    count, record_bytes, data_offset, labels_offset, file_size, flags, payload_crc = fields[13:]
    if magic != MAGIC:
        fail("bad magic (not a repa_e_fast record file)")
    if version != FORMAT_VERSION:
        fail(f"unsupported format version {version} (this build reads version {FORMAT_VERSION})")
    (stored_crc,) = HEADER_CRC_STRUCT.unpack(block[HEADER_STRUCT.size :])
    if zlib.crc32(block[: HEADER_STRUCT.size]) != stored_crc:
        fail("header checksum mismatch (corrupted header)")
    if header_size != HEADER_SIZE or data_offset != HEADER_SIZE:
        fail("header size / data offset is not 4096")
    if code not in CODE_TO_NAME:
        fail(f"unknown dtype code {code}")
    if ndim > MAX_DIMS:
        fail(f"record ndim {ndim} > 8")
    if flags & ~FLAG_LABELS:
        fail("unknown flag bits")
    shape = tuple(int(d) for d in dims[:ndim])
    if any(d == 0 for d in shape):
        fail("record shape has a zero dimension")
    dtype = CODE_TO_NAME[code]
    expected_bytes = DTYPES[dtype][1].itemsize
    for d in shape:
        expected_bytes *= d
        if expected_bytes > 1 << 48:
            fail("record size is absurd")
    if expected_bytes != record_bytes:
        fail("record byte size disagrees with dtype and shape")
    has_labels = bool(flags & FLAG_LABELS)
    if has_labels:
        if labels_offset != labels_offset_for(count, record_bytes):
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


def write_record_crcs(path: str, crcs: np.ndarray, payload_crc: int) -> None:
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
