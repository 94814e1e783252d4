"""The embedded demo dataset: deterministic, cached, concurrency-safe, easy classes."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch
from PIL import Image

from repa_e_fast.data import build_image_loader, ensure_demo_dataset

SMALL = dict(num_classes=10, images_per_class=3, size=64)


def _all_bytes(root):
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_deterministic_layout_and_sizes(tmp_path):
    a = ensure_demo_dataset(tmp_path / "a", **SMALL)
    b = ensure_demo_dataset(tmp_path / "b", **SMALL)
    assert a.name == b.name == "demo-c10-n3-s64-v1"
    files_a = _all_bytes(a)
    assert files_a == _all_bytes(b)  # seeded: byte-identical JPEGs
    classes = sorted(p.name for p in a.iterdir())
    assert len(classes) == 10 and classes[0] == "000_circle"
    assert len(files_a) == 30
    for rel in files_a:
        with Image.open(a / rel) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert 64 <= min(image.size) and max(image.size) <= 256  # the crop really resizes


def test_cached_and_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("REPA_E_FAST_CACHE", str(tmp_path / "cache"))
    first = ensure_demo_dataset(**SMALL)
    assert first.parent == tmp_path / "cache"
    stamp = os.stat(first / "000_circle" / "img_0000.JPEG").st_mtime_ns
    assert ensure_demo_dataset(**SMALL) == first
    assert os.stat(first / "000_circle" / "img_0000.JPEG").st_mtime_ns == stamp
    with pytest.raises(ValueError):
        ensure_demo_dataset(tmp_path, num_classes=0)


def _make(root):
    return str(ensure_demo_dataset(root, **SMALL))


def test_concurrent_callers_are_safe(tmp_path):
    with multiprocessing.get_context("fork").Pool(2) as pool:
        paths = pool.map(_make, [str(tmp_path)] * 4)
    assert len(set(paths)) == 1
    assert sorted(os.listdir(tmp_path)) == ["demo-c10-n3-s64-v1"]  # no temp dirs left
    assert len(_all_bytes(paths[0])) == 30


def test_classes_are_easy_to_tell_apart_at_64px(tmp_path):
    root = ensure_demo_dataset(tmp_path)  # the default: 10 classes x 40 images
    loader = build_image_loader(root, 400, resolution=64, shuffle=False, num_workers=0)
    (images, labels), = list(loader)
    assert images.shape == (400, 3, 64, 64) and loader.num_classes == 10
    # Feature: mean colour of the pixels far from the image's median colour (the shape).
    pixels = images.float().flatten(2)  # [N, 3, 4096]
    median = pixels.median(dim=2, keepdim=True).values
    foreground = ((pixels - median).norm(dim=1) > 60).float()  # [N, 4096]
    assert (foreground.mean(1) > 0.03).all()  # every image shows its shape after the crop
    colour = (pixels * foreground[:, None]).sum(2) / foreground.sum(1)[:, None]
    area = foreground.mean(1, keepdim=True)
    features = torch.cat([colour / 255, area], 1)
    train = torch.arange(400) % 2 == 0
    centroids = torch.stack([features[train & (labels == c)].mean(0) for c in range(10)])
    predicted = torch.cdist(features[~train], centroids).argmin(1)
    accuracy = (predicted == labels[~train]).float().mean().item()
    assert accuracy >= 0.95, accuracy
    # Shapes differ too: same-colour-agnostic check that the shape area spreads by class.
    assert np.ptp([area[labels == c].mean().item() for c in range(10)]) > 0.05
