"""Loaders x sources: output contract, pixels, order, sharding, resumption, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from repa_e_fast.data import DatasetError, build_image_loader
from repa_e_fast.data.order import SampleOrder, epoch_permutation
from repa_e_fast.data.native_extension import native_available, native_unavailable_reason
from repa_e_fast.data.prepare import prepare
from repa_e_fast.data.record_reader import RecordReader
from repa_e_fast.data.record_writer import RecordWriter

from test_data_common import RES, collect, folder_files, make_folder, make_official_h5, reference_crop


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    folder = make_folder(base / "raw")
    out = {"folder": folder}
    prepare(folder, base / "prepared_png", resolution=RES, workers=1, progress=False)
    out["prepared"] = str(base / "prepared_png")
    prepare(folder, base / "prepared_jpeg", resolution=RES, workers=1, codec="jpeg", progress=False)
    out["prepared_jpeg"] = str(base / "prepared_jpeg")
    try:
        import h5py  # noqa: F401
    except ImportError:
        pass
    else:
        out["h5"] = make_official_h5(folder, base / "official")
    return out


@pytest.fixture(scope="module")
def references(datasets):
    folder = datasets["folder"]
    return np.stack([reference_crop(os.path.join(folder, rel)) for rel in folder_files(folder)])


def _source(datasets, name):
    if name == "h5":
        pytest.importorskip("h5py")
    return datasets[name]


def _loader_kind(name):
    if name == "dali":
        pytest.importorskip("nvidia.dali")
    return name


SOURCES = ["folder", "h5", "prepared", "prepared_jpeg"]


@pytest.mark.parametrize("kind", ["torch", "dali"])
@pytest.mark.parametrize("source", SOURCES)
def test_every_source_and_loader(datasets, references, source, kind):
    path = _source(datasets, source)
    loader = build_image_loader(path, 4, resolution=RES, loader=_loader_kind(kind),
                                num_workers=0 if kind == "torch" else 1, seed=3,
                                return_indices=True)
    assert loader.kind == kind
    assert (loader.num_images, loader.num_classes, len(loader)) == (12, 3, 3)
    batches = collect(loader)
    assert len(batches) == 3 and loader.epoch == 1
    perm = epoch_permutation(12, 3, 0)
    expected_labels = np.array([int(f.split("/")[0][1:]) for f in folder_files(datasets["folder"])])
    for b, (images, labels, indices) in enumerate(batches):
        assert images.dtype == torch.uint8 and images.shape == (4, 3, RES, RES)
        assert images.is_contiguous()
        assert labels.dtype == torch.int64 and indices.dtype == torch.int64
        assert indices.tolist() == perm[4 * b : 4 * b + 4].tolist()
        assert labels.tolist() == expected_labels[indices.numpy()].tolist()
        want = references[indices.numpy()]
        diff = np.abs(images.numpy().astype(int) - want.astype(int))
        if source == "prepared_jpeg":
            assert diff.mean() < 3.0  # JPEG q95 4:4:4 of a 32 px crop
        elif kind == "torch" or source != "folder":
            # PIL everywhere, or lossless PNGs of the PIL crop decoded by DALI: exact.
            assert diff.max() == 0
        else:
            # DALI's GPU-style ADM crop vs PIL (see test_data_dali for the full measure)
            assert diff.mean() < 0.1
    assert loader.stats["bad_images"] == 0


def test_one_rank_of_2b_equals_two_ranks_of_b(datasets):
    path = datasets["prepared"]
    big = collect(build_image_loader(path, 4, resolution=RES, num_workers=0, seed=7,
                                     return_indices=True), epochs=2)
    ranks = [collect(build_image_loader(path, 2, resolution=RES, rank=r, world_size=2, seed=7,
                                        num_workers=0, return_indices=True), epochs=2)
             for r in range(2)]
    assert len(big) == len(ranks[0]) == len(ranks[1]) == 6  # 3 per epoch, 2 epochs
    for whole, part0, part1 in zip(big, ranks[0], ranks[1]):
        for k in range(3):
            assert torch.equal(whole[k], torch.cat([part0[k], part1[k]]))
        assert not set(part0[2].tolist()) & set(part1[2].tolist())  # disjoint halves
    # Each epoch covers every image exactly once (12 = 3 x 4, nothing dropped)
    first_epoch = torch.cat([b[2] for b in big[:3]])
    assert sorted(first_epoch.tolist()) == list(range(12))
    assert big[0][2].tolist() != big[3][2].tolist()  # a new permutation per epoch


@pytest.mark.parametrize("implementation", ["python", "native"])
@pytest.mark.parametrize("world_size,batch_size,drop_last", [(1, 5, False), (2, 2, True), (2, 5, False)])
def test_record_reader_and_image_loader_share_one_order(datasets, tmp_path, implementation, world_size,
                                                        batch_size, drop_last):
    # Cached latents (a RecordReader) and images (the loaders) of the same dataset, seed and
    # sharding must visit the images in the same order, also after a resume mid-epoch.
    if implementation == "native" and not native_available():
        pytest.skip(f"native extension not built: {native_unavailable_reason()}")
    path = tmp_path / "indices.rec"
    with RecordWriter(path, "uint8", (1,)) as writer:
        writer.append(np.zeros((12, 1), np.uint8), np.arange(12))  # label = dataset index
    settings = dict(world_size=world_size, seed=5, drop_last=drop_last)
    for rank in range(world_size):
        loader = build_image_loader(datasets["prepared"], batch_size, resolution=RES, rank=rank,
                                    num_workers=0, return_indices=True, **settings)
        with RecordReader(path, batch_size, rank=rank, implementation=implementation, **settings) as reader:
            assert len(reader) == len(loader) == SampleOrder(12, batch_size, rank, shuffle=True, **settings).num_batches
            images = [b[2].tolist() for b in collect(loader, epochs=2)]
            records = [labels.tolist() for _ in range(2) for _, labels in reader]
            assert images == records and len(images) == 2 * len(loader)
            reader.set_epoch(1)
            next(iter(reader))
            cursor = reader.state_dict()  # the same (epoch, position) means the same next batch
            loader.load_state_dict(loader.state_dict() | {"epoch": cursor["epoch"], "position": cursor["position"]})
            assert [b[2].tolist() for b in collect(loader)] == records[len(loader) + 1:]

def test_order_tail_and_drop_last():
    # 10 images, batch 2, 2 ranks: global batch 4 -> 2 full steps, tail of 2.
    dropped = SampleOrder(10, 2, 0, 2, seed=1, shuffle=True, drop_last=True)
    assert dropped.num_batches == 2
    kept = [SampleOrder(10, 2, r, 2, seed=1, shuffle=False, drop_last=False) for r in range(2)]
    assert kept[0].num_batches == 3
    assert kept[0].batch_indices(0, 2).tolist() == [8]
    assert kept[1].batch_indices(0, 2).tolist() == [9]
    # Tail of 3 over 2 ranks: ceil(3/2)=2 each, wrapping to the start (one repeat).
    odd = [SampleOrder(11, 2, r, 2, seed=1, shuffle=False, drop_last=False) for r in range(2)]
    assert odd[0].batch_indices(0, 2).tolist() == [8, 9]
    assert odd[1].batch_indices(0, 2).tolist() == [10, 0]
    # The permutation depends on (seed, epoch), never on the rank.
    a = SampleOrder(50, 5, 0, 2, seed=4, shuffle=True, drop_last=True)
    b = SampleOrder(50, 5, 1, 2, seed=4, shuffle=True, drop_last=True)
    assert np.array_equal(a.permutation(3), b.permutation(3))
    assert not np.array_equal(a.permutation(3), a.permutation(4))


def test_file_order_indices_for_latent_caching(datasets):
    loader = build_image_loader(datasets["folder"], 5, resolution=RES, shuffle=False,
                                drop_last=False, num_workers=0, return_indices=True)
    batches = collect(loader)
    assert [len(b[2]) for b in batches] == [5, 5, 2]  # the last batch is short
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(12))


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_resume_in_a_new_loader(datasets, kind):
    path = datasets["folder"]
    kwargs = dict(resolution=RES, seed=11, loader=_loader_kind(kind), num_workers=1, hflip=True,
                  return_indices=True)
    reference = collect(build_image_loader(path, 3, **kwargs), epochs=2)  # 4 batches/epoch
    for stop_after in (2, 5):  # mid-epoch, and mid-epoch after an epoch boundary
        loader = build_image_loader(path, 3, **kwargs)
        taken = 0
        while taken < stop_after:
            for _ in loader:
                taken += 1
                if taken == stop_after:
                    break
        state = loader.state_dict()
        assert (state["epoch"], state["position"]) == divmod(stop_after, 4)
        assert all(isinstance(v, (int, str, bool)) for v in state.values())
        resumed = build_image_loader(path, 3, **kwargs)
        resumed.load_state_dict(state)
        following = [[t.cpu() for t in batch] for batch in resumed]
        expected = reference[stop_after : 4 * (stop_after // 4 + 1)]
        assert len(following) == len(expected) > 0
        for got, want in zip(following, expected):
            for g, w in zip(got, want):
                assert torch.equal(g, w)


def test_break_and_continue_keeps_the_sequence(datasets):
    path = datasets["folder"]
    loader = build_image_loader(path, 3, resolution=RES, num_workers=1, seed=5, return_indices=True)
    seen = []
    for batch in loader:
        seen.append(batch[2].tolist())
        break
    seen += [batch[2].tolist() for batch in loader]
    reference = build_image_loader(path, 3, resolution=RES, num_workers=0, seed=5, return_indices=True)
    assert seen == [batch[2].tolist() for batch in reference]


def test_state_mismatch_is_refused(datasets):
    loader = build_image_loader(datasets["prepared"], 3, resolution=RES, num_workers=0, seed=1)
    state = loader.state_dict()
    other = build_image_loader(datasets["prepared"], 3, resolution=RES, num_workers=0, seed=2)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_hflip_is_deterministic_and_matches_the_order(datasets, references):
    path = datasets["prepared"]
    loader = build_image_loader(path, 4, resolution=RES, num_workers=0, seed=2, hflip=True,
                                return_indices=True)
    order = loader.order
    flips = order.flips(0)
    flipped_any = False
    for b, (images, _, indices) in enumerate(loader):
        for slot, (image, index) in enumerate(zip(images.numpy(), indices.numpy())):
            flipped = bool(flips[4 * b + slot])
            want = references[index][:, :, ::-1] if flipped else references[index]
            assert np.array_equal(image, want)
            flipped_any |= flipped
    assert flipped_any and not flips.all()


def test_workers_give_the_same_batches(datasets):
    path = datasets["folder"]
    a = collect(build_image_loader(path, 4, resolution=RES, num_workers=0, seed=9))
    b = collect(build_image_loader(path, 4, resolution=RES, num_workers=2, seed=9))
    assert all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))


def test_auto_loader_is_torch_on_cpu(datasets):
    loader = build_image_loader(datasets["folder"], 4, resolution=RES, loader="auto", num_workers=0)
    assert loader.kind == "torch"


def test_missing_empty_and_wrong_datasets(tmp_path, datasets):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match=str(missing)):
        build_image_loader(missing, 4)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty"):
        build_image_loader(empty, 4)
    no_images = tmp_path / "no_images" / "c0"
    no_images.mkdir(parents=True)
    (no_images / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        build_image_loader(no_images.parent, 4)
    with pytest.raises(DatasetError, match="resolution=64"):
        build_image_loader(datasets["prepared"], 4, resolution=64)
    if "h5" in datasets:
        with pytest.raises(DatasetError, match="resolution=64"):
            build_image_loader(datasets["h5"], 4, resolution=64)
    with pytest.raises(DatasetError, match="not one full batch"):
        build_image_loader(datasets["folder"], 13, resolution=RES)
    assert issubclass(DatasetError, ValueError)


def test_root_or_root_train_and_dataset_json(tmp_path):
    make_folder(tmp_path / "imagenet" / "train", sizes=[(40, 40)] * 4, num_classes=2)
    loader = build_image_loader(tmp_path / "imagenet", 2, resolution=RES, num_workers=0)
    assert (loader.num_images, loader.num_classes) == (4, 2)
    # dataset.json labels win over folder names (official preprocessing behaviour)
    root = tmp_path / "imagenet" / "train"
    (root / "dataset.json").write_text(
        '{"labels": [["c0/img000.JPEG", 5], ["c1/img001.JPEG", 2], ["c0/img002.JPEG", 5]]}')
    loader = build_image_loader(root, 1, resolution=RES, num_workers=0, shuffle=False,
                                return_indices=True)
    assert loader.num_images == 3 and loader.num_classes == 6  # img003 has no label: ignored
    assert [int(labels[0]) for _, labels, _ in loader] == [5, 5, 2]  # sorted file order
