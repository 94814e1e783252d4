"""Tests for the record store (repa_e_fast.data.record_format / record_writer / record_reader,
the sample order they share with the loaders, and the native repa_e_fast._C).

Everything here runs on a CPU in a few seconds: files of at most a few thousand tiny
records in tmp_path. The native half of the implementation comparisons is skipped (with the
reason) only when the extension is not built; CI builds it.
"""

import glob
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from repa_e_fast.data import order
from repa_e_fast.data.native_extension import native_available, native_unavailable_reason
from repa_e_fast.data.order import epoch_permutation
from repa_e_fast.data.record_format import DTYPES, read_header, record_crcs_path
from repa_e_fast.data.record_reader import RecordReader
from repa_e_fast.data.record_writer import RecordWriter

NATIVE = native_available()
needs_native = pytest.mark.skipif(
    not NATIVE, reason=f"native extension not built: {native_unavailable_reason()}"
)
IMPLEMENTATIONS = ["python", pytest.param("native", marks=needs_native)]


def make_file(path, n=203, shape=(8, 4, 4), dtype="float16", labels=True, seed=0, chunks=(50, 1)):
    """Write n random records in uneven appends; return (records, labels)."""
    rng = np.random.default_rng(seed)
    storage = DTYPES[dtype][1]
    if storage.kind == "f":
        x = rng.standard_normal((n, *shape)).astype(storage)
    else:
        info = np.iinfo(storage)
        x = rng.integers(info.min, info.max, size=(n, *shape), dtype=storage, endpoint=True)
    y = rng.integers(0, 1000, size=n).astype(np.int64) if labels else None
    with RecordWriter(path, dtype, shape, with_labels=labels) as w:
        i, k = 0, 0
        while i < n:
            step = chunks[k % len(chunks)]
            k += 1
            if step == 1:  # single record (no batch dim) and a scalar label
                w.append(x[i], int(y[i]) if labels else None)
            else:
                w.append(x[i : i + step], y[i : i + step] if labels else None)
            i += step
    return x, y


def all_batches(reader, copy=True):
    return [(r.copy(), None if l is None else l.copy()) if copy else (r, l) for r, l in reader]


# ----------------------------------------------------------------------------- format


def test_splitmix64_matches_reference_vectors():
    # Published splitmix64 outputs for state 1234567 (state advanced before mixing).
    outs = [order._mix64_int(1234567 + k * 0x9E3779B97F4A7C15) for k in (1, 2, 3)]
    assert outs == [6457827717110365317, 3203168211198807973, 9817491932198370423]
    z = np.array([1234567 + 0x9E3779B97F4A7C15], dtype=np.uint64)
    assert int(order._mix64_np(z)[0]) == 6457827717110365317


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_epoch_permutation_is_a_permutation_and_implementations_agree(implementation):
    for n, seed, epoch in [(1, 0, 0), (10, 0, 0), (1000, 7, 3), (4097, 2**64 - 1, 12345)]:
        p = epoch_permutation(n, seed, epoch, implementation=implementation)
        assert p.dtype == np.int64
        assert np.array_equal(np.sort(p), np.arange(n))
        assert np.array_equal(p, epoch_permutation(n, seed, epoch, implementation="python"))
    # Different epochs and seeds give different orders.
    a = epoch_permutation(1000, 7, 3, implementation=implementation)
    assert not np.array_equal(a, epoch_permutation(1000, 7, 4, implementation=implementation))
    assert not np.array_equal(a, epoch_permutation(1000, 8, 3, implementation=implementation))


def test_header_layout_byte_by_byte(tmp_path):
    path = tmp_path / "h.rec"
    x, y = make_file(path, n=5, shape=(3, 2), dtype="float32")
    raw = path.read_bytes()
    assert raw[:8] == b"REPAREC\0"
    version, header_size, code, ndim = struct.unpack_from("<IIII", raw, 8)
    assert (version, header_size, code, ndim) == (1, 4096, 9, 2)
    assert struct.unpack_from("<8Q", raw, 24) == (3, 2, 0, 0, 0, 0, 0, 0)
    count, rb, data_off, lab_off, fsize = struct.unpack_from("<5Q", raw, 88)
    assert (count, rb, data_off) == (5, 24, 4096)
    assert lab_off == 4096 + 128  # 4096 + 5*24 = 4216, rounded up to a multiple of 64
    assert fsize == len(raw) == lab_off + 5 * 8
    flags, payload_crc = struct.unpack_from("<II", raw, 128)
    assert flags == 1
    assert raw[136:144] == b"\0" * 8
    assert struct.unpack_from("<I", raw, 144)[0] == zlib.crc32(raw[:144])
    assert raw[148:4096] == b"\0" * (4096 - 148)
    records = raw[4096 : 4096 + 120]
    assert records == x.tobytes()
    assert raw[4216:lab_off] == b"\0" * (lab_off - 4216)
    assert raw[lab_off:] == y.astype("<i8").tobytes()
    assert payload_crc == zlib.crc32(raw[lab_off:], zlib.crc32(records))
    if NATIVE:
        from repa_e_fast import _C

        assert _C.crc32(raw[:144]) == zlib.crc32(raw[:144])


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "dtype,shape,labels",
    [
        ("float16", (8, 4, 4), True),
        ("float32", (3, 5), True),
        ("bfloat16", (2, 3), True),
        ("uint8", (3, 8, 8), False),
        ("int64", (4,), True),
        ("float64", (), False),
    ],
)
def test_round_trip(tmp_path, implementation, dtype, shape, labels):
    path = tmp_path / f"rt_{dtype}.rec"
    x, y = make_file(path, n=101, shape=shape, dtype=dtype, labels=labels)
    info = read_header(path)
    assert (info.dtype, info.record_shape, info.count, info.has_labels) == (dtype, shape, 101, labels)
    with RecordReader(path, batch_size=16, shuffle=False, drop_last=False, implementation=implementation) as r:
        assert r.implementation == implementation
        assert r.verify()
        got = all_batches(r)
        assert [len(b[0]) for b in got] == [16] * 6 + [5]
        rec = np.concatenate([b[0] for b in got])
        assert rec.dtype == DTYPES[dtype][1]
        assert np.array_equal(rec.view(np.uint8), x.view(np.uint8))  # bitwise (NaN-safe)
        if labels:
            assert np.array_equal(np.concatenate([b[1] for b in got]), y)
        else:
            assert all(b[1] is None for b in got)
        g_rec, g_lab = r.get([100, 0, 7, 7])
        assert np.array_equal(g_rec.view(np.uint8), x[[100, 0, 7, 7]].view(np.uint8))
        if labels:
            assert np.array_equal(g_lab, y[[100, 0, 7, 7]])


def test_bfloat16_torch_round_trip(tmp_path):
    path = tmp_path / "bf16.rec"
    t = torch.randn(40, 4, 3).to(torch.bfloat16)
    with RecordWriter(path, torch.bfloat16, (4, 3)) as w:
        w.append(t, torch.arange(40))
    with RecordReader(path, 8, shuffle=False, as_torch=True) as r:
        recs, labs = zip(*[(a.clone(), b.clone()) for a, b in r])
    assert recs[0].dtype == torch.bfloat16 and labs[0].dtype == torch.int64
    assert torch.equal(torch.cat(recs), t)
    assert torch.equal(torch.cat(labs), torch.arange(40))


# ----------------------------------------------------------------------------- implementations agree


@needs_native
@pytest.mark.parametrize("world_size,drop_last", [(1, True), (2, False), (3, True), (3, False)])
def test_native_and_numpy_give_identical_batches(tmp_path, world_size, drop_last):
    path = tmp_path / "agree.rec"
    make_file(path, n=500, shape=(4, 2, 2), dtype="float32")
    for rank in range(world_size):
        kw = dict(batch_size=32, rank=rank, world_size=world_size, seed=11, drop_last=drop_last)
        with RecordReader(path, implementation="native", num_threads=3, **kw) as a, RecordReader(
            path, implementation="python", **kw
        ) as b:
            for epoch in range(3):
                ba, bb = all_batches(a), all_batches(b)
                assert len(ba) == len(bb) == len(a) > 0
                for (ra, la), (rb, lb) in zip(ba, bb):
                    assert np.array_equal(ra, rb) and np.array_equal(la, lb)
            assert a.epoch == b.epoch == 3


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_threads_and_prefetch_do_not_change_batches(tmp_path, implementation):
    path = tmp_path / "tp.rec"
    x, y = make_file(path, n=300, shape=(5,), dtype="int64")
    ref = None
    for threads, prefetch in [(1, 0), (2, 1), (3, 4)]:
        with RecordReader(path, 25, seed=5, num_threads=threads, prefetch=prefetch, implementation=implementation) as r:
            got = all_batches(r)
            for i, (rec, lab) in enumerate(got):
                idx = r.order.batch_indices(0, i)
                assert np.array_equal(rec, x[idx]) and np.array_equal(lab, y[idx])
        if ref is None:
            ref = got
        assert all(np.array_equal(a[0], b[0]) for a, b in zip(ref, got))


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_rank_shards_disjoint_and_complete(tmp_path, implementation, world_size, drop_last):
    n, bs = 257, 10
    path = tmp_path / "shards.rec"
    # Label = record index, so labels identify the samples each rank received.
    with RecordWriter(path, "uint8", (2,)) as w:
        w.append(np.zeros((n, 2), np.uint8), np.arange(n))
    per_rank, lens = [], set()
    for rank in range(world_size):
        with RecordReader(path, bs, rank=rank, world_size=world_size, seed=3,
                          drop_last=drop_last, implementation=implementation) as r:
            labs = [lab.copy() for _, lab in r]
            lens.add(len(labs))
            per_rank.append(np.concatenate(labs))
    assert len(lens) == 1  # every rank gets the same number of batches
    steps = n // (bs * world_size)
    tail = n - steps * bs * world_size
    perm = epoch_permutation(n, 3, 0)
    if drop_last:
        allv = np.concatenate(per_rank)
        assert len(allv) == len(set(allv.tolist())) == steps * bs * world_size  # disjoint
        assert set(allv.tolist()) == set(perm[: steps * bs * world_size].tolist())
        # Global step k is the contiguous slice of the permutation, ranks in order.
        for k in range(steps):
            got = np.concatenate([p[k * bs : (k + 1) * bs] for p in per_rank])
            assert np.array_equal(got, perm[k * bs * world_size : (k + 1) * bs * world_size])
    else:
        k = -(-tail // world_size)
        assert all(len(p) == steps * bs + k for p in per_rank)
        allv = np.concatenate(per_rank)
        assert set(allv.tolist()) == set(range(n))  # complete
        assert len(allv) - n == world_size * k - tail < world_size  # few repeats, from padding
        if world_size == 1:
            assert len(allv) == n


# ----------------------------------------------------------------------------- resume / determinism


@pytest.mark.parametrize("src,dst", [("python", "python"),
                                     pytest.param("native", "native", marks=needs_native),
                                     pytest.param("native", "python", marks=needs_native)])
def test_resume_mid_epoch_gives_the_same_remaining_batches(tmp_path, src, dst):
    path = tmp_path / "resume.rec"
    make_file(path, n=400, shape=(3, 3), dtype="float16")
    kw = dict(batch_size=16, rank=1, world_size=2, seed=9, drop_last=False)
    with RecordReader(path, implementation=src, **kw) as ref:
        ref.set_epoch(2)
        expected = all_batches(ref) + all_batches(ref)  # epoch 2, then epoch 3
    with RecordReader(path, implementation=src, prefetch=3, **kw) as a:
        a.set_epoch(2)
        it = iter(a)
        for _ in range(5):
            next(it)  # prefetched batches beyond these must not count as consumed
        state = a.state_dict()
    assert (state["epoch"], state["position"]) == (2, 5)
    with RecordReader(path, implementation=dst, **kw) as b:
        b.load_state_dict(state)
        b.set_epoch(2)  # same epoch: a no-op, keeps the resumed position
        rest = all_batches(b)
        assert b.epoch == 3 and b.position == 0
        rest += all_batches(b)
    assert len(rest) == len(expected) - 5
    for (ra, la), (rb, lb) in zip(rest, expected[5:]):
        assert np.array_equal(ra, rb) and np.array_equal(la, lb)


def test_read_batch_into_follows_the_cursor(tmp_path):
    path = tmp_path / "into.rec"
    x, y = make_file(path, n=70, shape=(4,), dtype="float32")
    for implementation in IMPLEMENTATIONS_AVAILABLE:
        with RecordReader(path, 32, seed=1, drop_last=False, implementation=implementation) as r:
            out = torch.full((32, 4), float("nan"))
            lab = np.full(32, -1, np.int64)
            sizes = []
            for b in range(3):
                n = r.read_batch_into(out, lab)
                idx = r.order.batch_indices(0, b)
                assert n == len(idx)
                assert np.array_equal(out.numpy()[:n], x[idx]) and np.array_equal(lab[:n], y[idx])
                sizes.append(n)
            assert sizes == [32, 32, 6]
            assert r.read_batch_into(out, lab) == 0 and (r.epoch, r.position) == (1, 0)
            r.read_batch_into(out)
            assert np.array_equal(out.numpy(), x[r.order.batch_indices(1, 0)])


def test_deterministic_across_processes(tmp_path):
    path = tmp_path / "det.rec"
    make_file(path, n=300, shape=(2,), dtype="float32")
    code = (
        "import sys, numpy as np, zlib\n"
        "from repa_e_fast.data.record_reader import RecordReader\n"
        "r = RecordReader(sys.argv[1], 20, seed=123, implementation='python')\n"
        "r.set_epoch(4)\n"
        "print(zlib.crc32(b''.join(a.tobytes() + b.tobytes() for a, b in r)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         check=True, env={**os.environ, "REPA_E_FAST_NO_NATIVE": "1"})
    for implementation in IMPLEMENTATIONS_AVAILABLE:
        with RecordReader(path, 20, seed=123, implementation=implementation) as r:
            r.set_epoch(4)
            here = zlib.crc32(b"".join(a.tobytes() + b.tobytes() for a, b in r))
        assert int(out.stdout) == here


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_kept_batches_are_never_overwritten(tmp_path, implementation):
    path = tmp_path / "keep.rec"
    x, y = make_file(path, n=256, shape=(6,), dtype="float32")
    with RecordReader(path, 8, seed=2, prefetch=2, implementation=implementation) as r:
        kept = list(r)  # no copies: each batch must stay valid
        for i, (rec, lab) in enumerate(kept):
            idx = r.order.batch_indices(0, i)
            assert np.array_equal(rec, x[idx]) and np.array_equal(lab, y[idx])
        del kept
        # When batches are dropped, buffers are recycled instead of reallocated.
        seen = {id(rec) for rec, _ in ((a, b) for a, b in r)}
        assert len(seen) <= r.prefetch + 4


def test_state_dict_mismatch_and_bad_arguments(tmp_path):
    path = tmp_path / "args.rec"
    make_file(path, n=50, shape=(2,), dtype="float32")
    r = RecordReader(path, 8, seed=1, implementation="python")
    state = r.state_dict()
    with pytest.raises(ValueError, match="seed"):
        RecordReader(path, 8, seed=2, implementation="python").load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        RecordReader(path, 4, seed=1, implementation="python").load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        r.load_state_dict({**state, "position": 99})
    with pytest.raises(ValueError, match="rank"):
        RecordReader(path, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no batch"):
        RecordReader(path, 30, world_size=2)
    with pytest.raises(ValueError, match="implementation"):
        RecordReader(path, 8, implementation="cuda")


# ----------------------------------------------------------------------------- bad input


def _open_all_ways(path):
    """Every way of opening a file must raise the same ValueError naming it."""
    errors = []
    with pytest.raises(ValueError) as e:
        read_header(path)
    errors.append(str(e.value))
    for implementation in IMPLEMENTATIONS_AVAILABLE:
        with pytest.raises(ValueError) as e:
            RecordReader(path, 1, implementation=implementation)
        errors.append(str(e.value))
    if NATIVE:
        from repa_e_fast import _C

        with pytest.raises(ValueError) as e:  # the native parser on its own
            _C.RecordStore(str(path), 2)
        errors.append(str(e.value))
    assert all(str(path) in msg for msg in errors), errors
    assert len(set(errors)) == 1, errors  # Python and C++ report the same problem
    return errors[0]


IMPLEMENTATIONS_AVAILABLE = ["python", "native"] if NATIVE else ["python"]


def _patch(path, offset, data, fix_crc=True):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    if fix_crc:
        raw[144:148] = struct.pack("<I", zlib.crc32(bytes(raw[:144])))
    path.write_bytes(bytes(raw))


def test_bad_files_raise_clear_errors(tmp_path):
    good = tmp_path / "good.rec"
    make_file(good, n=40, shape=(4, 4), dtype="float16")
    raw = good.read_bytes()

    def variant(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    assert "truncated" in _open_all_ways(variant("tiny.rec", raw[:100]))
    assert "truncated" in _open_all_ways(variant("empty.rec", b""))
    msg = _open_all_ways(variant("cut.rec", raw[:-10]))
    assert "truncated" in msg and str(len(raw)) in msg
    assert "truncated" in _open_all_ways(variant("cut_records.rec", raw[:5000]))
    assert "trailing" in _open_all_ways(variant("long.rec", raw + b"\0" * 8))
    assert "magic" in _open_all_ways(variant("magic.rec", b"NOTAREC\0" + raw[8:]))

    p = variant("version.rec", raw)
    _patch(p, 8, struct.pack("<I", 2))
    assert "version 2" in _open_all_ways(p)

    p = variant("crc.rec", raw)
    _patch(p, 90, b"\x07", fix_crc=False)  # flip a byte of `count`, stale header CRC
    assert "header checksum" in _open_all_ways(p)

    p = variant("count.rec", raw)
    _patch(p, 88, struct.pack("<Q", 41))  # consistent CRC but count disagrees with sizes
    assert "disagrees" in _open_all_ways(p)

    p = variant("dtype.rec", raw)
    _patch(p, 16, struct.pack("<I", 99))
    assert "dtype code 99" in _open_all_ways(p)

    p = variant("shape.rec", raw)
    _patch(p, 24, struct.pack("<Q", 5))  # shape [5,4] but record_bytes says [4,4]
    assert "record byte size" in _open_all_ways(p)

    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "missing.rec")

    # Payload damage is invisible to the header check but caught by verify().
    p = variant("payload.rec", raw)
    _patch(p, 4096 + 33, b"\xff", fix_crc=False)
    for implementation in IMPLEMENTATIONS_AVAILABLE:
        with RecordReader(p, 4, implementation=implementation) as r, pytest.raises(ValueError, match="payload checksum"):
            r.verify()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bad_indices_and_buffers(tmp_path, implementation):
    path = tmp_path / "buf.rec"
    make_file(path, n=40, shape=(4, 4), dtype="float16")
    with RecordReader(path, 8, implementation=implementation) as r:
        for bad in ([40], [-1], [0, 2**40]):
            with pytest.raises(IndexError, match="out of range"):
                r.get(bad)
        with pytest.raises(TypeError, match="integers"):
            r.get([1.5])
        lab = np.zeros(8, np.int64)
        cases = [
            (np.zeros((8, 4, 4), np.float32), TypeError, "dtype"),
            (np.zeros((7, 4, 4), np.float16), ValueError, "batch_size"),
            (np.zeros((8, 4, 5), np.float16), ValueError, "shape"),
            (np.zeros((8, 4, 8), np.float16)[:, :, ::2], TypeError, "contiguous"),
            (torch.zeros(8, 4, 4, dtype=torch.float16).transpose(1, 2), TypeError, "contiguous"),
            (torch.zeros(8, 4, 4, dtype=torch.float32), TypeError, "dtype"),
            ([[0.0]], TypeError, "NumPy array"),
        ]
        ro = np.zeros((8, 4, 4), np.float16)
        ro.flags.writeable = False
        cases.append((ro, TypeError, "read-only"))
        for out, exc, pattern in cases:
            with pytest.raises(exc, match=pattern):
                r.read_batch_into(out, lab)
        with pytest.raises(TypeError, match="labels_out"):
            r.read_batch_into(np.zeros((8, 4, 4), np.float16), np.zeros(8, np.int32))
        assert r.position == 0  # nothing was consumed by the failed calls
        assert r.read_batch_into(np.zeros((8, 4, 4), np.float16), lab) == 8


@needs_native
def test_native_store_validates_before_queueing(tmp_path):
    from repa_e_fast import _C

    path = tmp_path / "nat.rec"
    x, y = make_file(path, n=20, shape=(3,), dtype="float32")
    s = _C.RecordStore(str(path), 2)
    assert (s.count, s.shape, s.record_bytes, s.has_labels) == (20, (3,), 12, True)
    out = np.zeros((2, 3), np.float32)
    with pytest.raises(IndexError, match=r"index 20 out of range \[0, 20\)"):
        s.submit(np.array([0, 20]), out)
    with pytest.raises(ValueError, match="expected 2 records"):
        s.submit(np.array([0, 1]), np.zeros((3, 3), np.float32))
    with pytest.raises(TypeError, match="element size"):
        s.submit(np.array([0, 1]), np.zeros((2, 3), np.float64))
    with pytest.raises(TypeError, match="int64"):
        s.submit(np.array([0, 1]), out, np.zeros(2, np.float64))
    with pytest.raises(TypeError, match="C-contiguous"):
        s.submit(np.array([0, 1]), np.zeros((3, 2), np.float32).T)
    with pytest.raises(ValueError, match="ticket"):
        s.wait(12345)
    assert s.pending() == 0  # none of the bad calls queued anything
    lab = np.zeros(2, np.int64)
    t = s.submit(np.array([19, 3]), out, lab)
    s.wait(t)
    assert np.array_equal(out, x[[19, 3]]) and np.array_equal(lab, y[[19, 3]])
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.submit(np.array([0]), out[:1])


# ----------------------------------------------------------------------------- writer


def test_writer_rejects_bad_appends(tmp_path):
    path = tmp_path / "w.rec"
    with pytest.raises(ValueError, match="boom"):
        with RecordWriter(path, "float16", (2, 2)) as w:
            with pytest.raises(TypeError, match="float32"):
                w.append(np.zeros((1, 2, 2), np.float32), [0])
            with pytest.raises(ValueError, match="shape"):
                w.append(np.zeros((1, 2, 3), np.float16), [0])
            with pytest.raises(ValueError, match="labels are required"):
                w.append(np.zeros((1, 2, 2), np.float16))
            with pytest.raises(ValueError, match="3 labels"):
                w.append(np.zeros((2, 2, 2), np.float16), [1, 2, 3])
            with pytest.raises(TypeError, match="integers"):
                w.append(np.zeros((1, 2, 2), np.float16), [1.0])
            raise ValueError("boom")
    assert not path.exists()
    with pytest.raises(TypeError, match="unsupported"):
        RecordWriter(path, "complex64", (2,))


def _leftovers(tmp_path):
    return glob.glob(str(tmp_path / ".*.tmp-*"))


def test_writer_crash_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "latents.rec"
    x, y = make_file(path, n=30, shape=(2, 2), dtype="float32")
    before = path.read_bytes()

    # 1. Exception in the middle of writing.
    with pytest.raises(RuntimeError):
        with RecordWriter(path, "float32", (2, 2)) as w:
            w.append(np.ones((10, 2, 2), np.float32), np.arange(10))
            raise RuntimeError("simulated crash")
    assert path.read_bytes() == before and not _leftovers(tmp_path)

    # 2. Failure inside close() itself (the rename fails).
    w = RecordWriter(path, "float32", (2, 2))
    w.append(np.ones((10, 2, 2), np.float32), np.arange(10))
    real_replace = os.replace
    try:
        os.replace = lambda *a: (_ for _ in ()).throw(OSError("disk gone"))
        with pytest.raises(OSError, match="disk gone"):
            w.close()
    finally:
        os.replace = real_replace
    assert path.read_bytes() == before and not _leftovers(tmp_path)

    # 3. A writer dropped without close() publishes nothing.
    w = RecordWriter(tmp_path / "never.rec", "float32", (2, 2))
    w.append(np.ones((1, 2, 2), np.float32), [1])
    del w
    assert not (tmp_path / "never.rec").exists() and not _leftovers(tmp_path)

    # 4. The process dies mid-write (no cleanup at all): the final path is untouched.
    code = (
        "import os, sys, numpy as np\n"
        "from repa_e_fast.data.record_writer import RecordWriter\n"
        "w = RecordWriter(sys.argv[1], 'float32', (2, 2))\n"
        "w.append(np.ones((10, 2, 2), np.float32), np.arange(10))\n"
        "w._file.flush()\n"
        "os._exit(3)\n"
    )
    rc = subprocess.run([sys.executable, "-c", code, str(path)]).returncode
    assert rc == 3
    assert path.read_bytes() == before
    assert len(_leftovers(tmp_path)) == 1  # the orphaned temporary, never the final name
    with RecordReader(path, 5, shuffle=False, implementation="python") as r:
        assert r.verify()
        assert np.array_equal(np.concatenate([a for a, _ in all_batches(r)]), x)


@needs_native
def test_native_reader_refuses_use_after_fork(tmp_path):
    path = tmp_path / "fork.rec"
    make_file(path, n=64, shape=(2,), dtype="float32")
    r = RecordReader(path, 8, implementation="native", num_threads=2)
    next(iter(r))  # threads started, batches queued
    pid = os.fork()
    if pid == 0:  # child: the worker threads do not exist here
        code = 1
        try:
            next(iter(r))
        except RuntimeError as exc:
            code = 0 if "another process" in str(exc) else 2
        except BaseException:
            code = 3
        try:
            del r  # must neither hang nor abort
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert len(next(iter(r))[0]) == 8  # the parent is unaffected
    r.close()


def test_pin_memory(tmp_path):
    path = tmp_path / "pin.rec"
    x, _ = make_file(path, n=32, shape=(3,), dtype="bfloat16")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA"):
            RecordReader(path, 8, pin_memory=True)
        return
    with RecordReader(path, 8, shuffle=False, pin_memory=True, as_torch=True) as r:
        rec, lab = next(iter(r))
        assert rec.is_pinned() and lab.is_pinned() and rec.dtype == torch.bfloat16
        assert np.array_equal(rec.view(torch.int16).numpy().view(np.uint16), x[:8])


def test_record_crc_sidecar_checks_records_and_belongs_to_its_file(tmp_path):
    path = tmp_path / "x.rec"
    data = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    with RecordWriter(path, "float32", (4,), record_crcs=True) as w:
        w.append(data, np.arange(6))
    with RecordReader(path, 3, shuffle=False) as r:
        r.check_records([0, 1, 2], data[:3], np.arange(3))
        with pytest.raises(ValueError, match=r"x.rec': record 1 fails its CRC-32 check"):
            r.check_records([0, 1], data[:2] + np.array([[0], [1]], np.float32), np.arange(2))
        with pytest.raises(ValueError, match="record 2 fails"):
            r.check_records([2], data[2:3], [7])  # a wrong label
    sidecar = record_crcs_path(path)
    stale = open(sidecar, "rb").read()
    with RecordWriter(path, "float32", (4,), record_crcs=False) as w:  # rewritten without checksums
        w.append(data + 1, np.arange(6))
    assert not os.path.exists(sidecar)  # the old sidecar went with the old file
    open(sidecar, "wb").write(stale)  # a sidecar of another version of the file
    with pytest.raises(ValueError, match="belongs to another version of the file"):
        RecordReader(path, 3)
