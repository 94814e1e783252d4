"""Small, seeded datasets shared by the data-layer tests (no tests in this module)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

from repa_e_fast.data.crop import adm_center_crop
from repa_e_fast.data.demo import render_photo_like as natural_image  # noqa: F401 (re-export)

RES = 32  # tests crop to 32 px: small images, fast pipelines


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def png_bytes(image: Image.Image, compress_level: int = 0) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


# (width, height) per image; several need a BOX halving at RES=32 (short side >= 64),
# some are odd, one is smaller than the crop.
FOLDER_SIZES = [(48, 40), (70, 64), (33, 50), (90, 67), (64, 64), (41, 77), (120, 80), (50, 36),
                (65, 99), (40, 40), (131, 70), (37, 33)]


def make_folder(root, num_classes: int = 3, sizes=FOLDER_SIZES) -> str:
    """``root/c{k}/img{i}.JPEG``: len(sizes) images spread over ``num_classes`` classes."""
    root = str(root)
    for i, (w, h) in enumerate(sizes):
        class_dir = os.path.join(root, f"c{i % num_classes}")
        os.makedirs(class_dir, exist_ok=True)
        with open(os.path.join(class_dir, f"img{i:03d}.JPEG"), "wb") as f:
            f.write(jpeg_bytes(natural_image(w, h, seed=i)))
    return root


def folder_files(root) -> list:
    """Relative paths in the loaders' file order (sorted)."""
    files = []
    for directory, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith((".jpeg", ".jpg", ".png")):
                files.append(os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/"))
    return sorted(f for f in files if "/" in f)


def reference_crop(path: str, res: int = RES) -> np.ndarray:
    """uint8 [3, R, R]: the official preprocessing of one file (open, RGB, ADM crop)."""
    with Image.open(path) as image:
        crop = adm_center_crop(image.convert("RGB"), res)
    return np.asarray(crop).transpose(2, 0, 1).copy()


def make_official_h5(folder: str, out_dir, res: int = RES) -> str:
    """The official preprocessing's layout (docs/data.md#sources) of ``folder``, at ``res``.

    ``images.h5``: one scalar byte-string dataset per image, key
    ``<5 digits>/img<8 digits>.png`` (PNG, compression level 0), plus ``dataset.json``;
    ``images_h5.json``: every object name in the file. Returns the output directory.
    """
    import h5py

    files = folder_files(folder)
    classes = sorted({f.split("/")[0] for f in files})
    out_dir = str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    names, labels = [], []
    with h5py.File(os.path.join(out_dir, "images.h5"), "w") as h5:
        for g, rel in enumerate(files):
            crop = reference_crop(os.path.join(folder, rel), res).transpose(1, 2, 0)
            key = f"{g:08d}"[:5] + f"/img{g:08d}.png"
            if key.split("/")[0] not in names:
                names.append(key.split("/")[0])
            h5.create_dataset(key, data=np.bytes_(png_bytes(Image.fromarray(crop))))
            names.append(key)
            labels.append([key, classes.index(rel.split("/")[0])])
        h5.create_dataset("dataset.json", data=np.bytes_(json.dumps({"labels": labels}).encode()))
        names.append("dataset.json")
    with open(os.path.join(out_dir, "images_h5.json"), "w") as f:
        json.dump(names, f)
    return out_dir


def collect(loader, epochs: int = 1):
    """All batches of ``epochs`` epochs as lists of CPU tensors."""
    out = []
    for _ in range(epochs):
        for batch in loader:
            out.append([t.cpu().clone() for t in batch])
    return out
