"""Bad data: every case is converted or skipped, counted, logged once, and training goes on."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from repa_e_fast.data import build_image_loader
from repa_e_fast.data.prepare import prepare

from test_data_common import RES, jpeg_bytes, natural_image, png_bytes, reference_crop

# Sorted file order of the folder built below (index: file).
FILES = [
    "c0/garbage.jpg",      # 0  not an image at all          -> skipped
    "c0/good1.jpg",        # 1
    "c0/good2.jpg",        # 2
    "c0/truncated.jpg",    # 3  JPEG cut in half              -> skipped
    "c1/cmyk.jpg",         # 4  CMYK JPEG                     -> converted
    "c1/good3.jpg",        # 5
    "c1/gray.jpg",         # 6  grayscale JPEG                -> converted
    "c1/palette.png",      # 7  palette PNG                   -> converted
    "c1/rgba.png",         # 8  RGBA PNG                      -> alpha dropped
    "c2/broken_link.jpg",  # 9  unreadable (dangling symlink) -> skipped
    "c2/corrupt.png",      # 10 PNG with zeroed data: valid header, fails to decode -> skipped
    "c2/good4.jpg",        # 11
    "c2/tiny.jpg",         # 12 12x9, smaller than the crop   -> upscaled
]
BAD = {0, 3, 9, 10}
# With shuffle=False each bad slot takes the next good image in file order.
USED = [1, 1, 2, 4, 4, 5, 6, 7, 8, 11, 11, 11, 12]


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "raw"
    for d in ("c0", "c1", "c2", "empty_class"):
        (root / d).mkdir(parents=True)

    def image(seed, w=60, h=48):
        return natural_image(w, h, seed)

    (root / "c0/garbage.jpg").write_bytes(b"this is not an image" * 20)
    (root / "c0/good1.jpg").write_bytes(jpeg_bytes(image(1)))
    (root / "c0/good2.jpg").write_bytes(jpeg_bytes(image(2, 80, 70)))
    whole = jpeg_bytes(image(3))
    (root / "c0/truncated.jpg").write_bytes(whole[: len(whole) // 2])
    image(4).convert("CMYK").save(root / "c1/cmyk.jpg", quality=90)
    image(5).convert("L").save(root / "c1/gray.jpg", quality=90)
    (root / "c1/good3.jpg").write_bytes(jpeg_bytes(image(6)))
    assert sorted(FILES) == FILES
    image(7).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "c1/palette.png")
    rgba = image(8).convert("RGBA")
    alpha = np.zeros((48, 60), np.uint8)
    alpha[:, 30:] = 255  # half transparent: compositing would change the pixels there
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(root / "c1/rgba.png")
    os.symlink(root / "c2/does_not_exist.jpg", root / "c2/broken_link.jpg")
    corrupt = bytearray(png_bytes(image(10), compress_level=6))
    middle = len(corrupt) // 2
    corrupt[middle : middle + 64] = bytes(64)  # header and IEND intact, data broken
    (root / "c2/corrupt.png").write_bytes(bytes(corrupt))
    (root / "c2/good4.jpg").write_bytes(jpeg_bytes(image(11)))
    (root / "c2/tiny.jpg").write_bytes(jpeg_bytes(image(12, 12, 9)))
    (root / "loose.jpg").write_bytes(jpeg_bytes(image(13)))  # no class folder: ignored
    return str(root)


def _loader_kind(name):
    if name == "dali":
        pytest.importorskip("nvidia.dali")
    return name


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_bad_images_are_converted_or_skipped(bad_folder, kind, caplog):
    caplog.set_level(logging.INFO, logger="repa_e_fast.data")
    loader = build_image_loader(bad_folder, 13, resolution=RES, shuffle=False,
                                loader=_loader_kind(kind), num_workers=1, return_indices=True)
    assert loader.num_images == 13 and loader.num_classes == 3  # empty folder: no class
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "empty_class" in messages and "loose.jpg" in messages

    for epoch in range(2):  # the second epoch meets the same files again
        (images, labels, indices), = list(loader)
        assert images.shape == (13, 3, RES, RES) and images.dtype == torch.uint8
        assert indices.tolist() == USED
        assert labels.tolist() == [int(FILES[i][1]) for i in USED]
        for slot, index in enumerate(USED):
            want = reference_crop(os.path.join(bad_folder, FILES[index]))
            diff = np.abs(images[slot].numpy().astype(int) - want.astype(int))
            # torch: PIL exactly; DALI: its own crop of the same (converted) pixels
            assert diff.max() == 0 if kind == "torch" else diff.mean() < 0.1, FILES[index]

    stats = loader.stats
    assert stats["bad_images"] == len(BAD)
    assert stats["converted_images"] == 4  # CMYK, grayscale, palette, RGBA
    assert stats["small_images"] == 1
    assert stats["skipped_reads"] == 2 * 5  # slot 9 meets two bad files in a row
    assert stats["empty_class_dirs"] == 1
    if kind == "dali":
        # The corrupt PNG passes the header screening and fails inside DALI: that batch
        # is decoded on the CPU instead (each epoch).
        assert stats["cpu_fallback_batches"] == 2
    # Logged once per file, although every file was met in both epochs.
    for name in ("truncated.jpg", "garbage.jpg", "broken_link.jpg", "corrupt.png", "cmyk.jpg"):
        assert sum(name in r.getMessage() for r in caplog.records) == 1, name


def test_alpha_is_dropped_not_composited(bad_folder):
    loader = build_image_loader(bad_folder, 13, resolution=RES, shuffle=False, num_workers=0)
    (images, _), = list(loader)
    with Image.open(os.path.join(bad_folder, "c1/rgba.png")) as rgba:
        rgb_channels = np.asarray(rgba)[..., :3]
    from repa_e_fast.data.crop import adm_center_crop

    dropped = np.asarray(adm_center_crop(Image.fromarray(rgb_channels), RES)).transpose(2, 0, 1)
    assert np.array_equal(images[8].numpy(), dropped)


def test_prepare_skips_and_reports_bad_files(bad_folder, tmp_path):
    summary = prepare(bad_folder, tmp_path / "prep", resolution=RES, workers=2, shard_size=5,
                      progress=False)
    assert summary["complete"] and summary["num_images"] == 13 - len(BAD)
    assert summary["bad_images"] == len(BAD) and summary["converted_images"] == 4
    report = (tmp_path / "prep" / "bad_images.tsv").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in report) == sorted(FILES[i] for i in BAD)
    loader = build_image_loader(tmp_path / "prep", 3, resolution=RES, shuffle=False,
                                drop_last=False, num_workers=0, return_indices=True)
    images = torch.cat([b[0] for b in loader])
    good = [i for i in range(13) if i not in BAD]
    for row, index in enumerate(good):
        assert np.array_equal(images[row].numpy(), reference_crop(os.path.join(bad_folder, FILES[index])))
    assert loader.stats["bad_images"] == 0


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: file permissions do not apply")
def test_unreadable_file_permissions(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for i in range(2):
            (tmp_path / d / f"{i}.jpg").write_bytes(jpeg_bytes(natural_image(40, 40, i)))
    os.chmod(tmp_path / "a" / "0.jpg", 0)
    loader = build_image_loader(tmp_path, 4, resolution=RES, shuffle=False, num_workers=0,
                                return_indices=True)
    (_, _, indices), = list(loader)
    assert indices.tolist() == [1, 1, 2, 3] and loader.stats["bad_images"] == 1
