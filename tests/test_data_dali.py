"""The ADM centre crop: PIL reference geometry, and DALI's reproduction of it (fidelity)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from repa_e_fast.data import build_image_loader
from repa_e_fast.data.crop import adm_center_crop, adm_geometry

from test_data_common import natural_image

# Photograph-like test images (synthetic: no real photographs on the test machine),
# JPEG-encoded at typical ImageNet sizes. At R=256: no halving (500x375 ...), one
# halving (1024x768, odd 1023x767 ...), two (2048x1536), three (2100x2100), and one
# smaller than the crop (200x150).
FIDELITY_SIZES = [(500, 375), (375, 500), (500, 333), (640, 480), (800, 600), (1024, 768),
                  (1023, 767), (1001, 1333), (2048, 1536), (200, 150), (2100, 2100)]


def test_adm_geometry_matches_pil():
    rng = np.random.default_rng(0)
    for _ in range(40):
        w, h = (int(v) for v in rng.integers(20, 700, 2))
        res = int(rng.choice([16, 32, 64, 128]))
        geometry = adm_geometry(w, h, res)
        image = Image.new("RGB", (w, h))
        for size in geometry.halvings:
            image = image.resize((image.size[0] // 2, image.size[1] // 2), Image.BOX)
            assert image.size == size
        assert min(image.size) < 2 * res
        assert adm_center_crop(Image.new("RGB", (w, h)), res).size == (res, res)
        scale = res / min(image.size)
        assert geometry.scaled == (round(image.size[0] * scale), round(image.size[1] * scale))


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i, (w, h) in enumerate(FIDELITY_SIZES):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        natural_image(w, h, seed=100 + i).save(root / f"c{i % 2}" / f"{i:02d}_{w}x{h}.jpg", quality=90)
    return str(root)


def test_dali_adm_crop_fidelity(photo_folder):
    pytest.importorskip("nvidia.dali")
    n = len(FIDELITY_SIZES)
    kwargs = dict(resolution=256, shuffle=False, drop_last=False, return_indices=True, num_workers=1)
    (pil, _, order), = list(build_image_loader(photo_folder, n, loader="torch", **kwargs))
    dali_loader = build_image_loader(photo_folder, n, loader="dali", **kwargs)
    (dali, _, order_dali), = list(dali_loader)
    assert dali_loader._halving_stages == 3  # grown from 1 for the 2048+ px images
    assert order.tolist() == order_dali.tolist()
    names = sorted(f"c{i % 2}/{i:02d}_{w}x{h}" for i, (w, h) in enumerate(FIDELITY_SIZES))
    errors = {}
    for name, a, b in zip(names, pil.numpy(), dali.numpy()):
        errors[name] = float(np.abs(a.astype(int) - b.astype(int)).mean())
    print("mean |DALI - PIL| per image (grey levels):", {k: round(v, 4) for k, v in errors.items()})
    # Measured ~0.002-0.012 grey levels (a few pixels off by 1-2 from PIL's fixed-point
    # weights; odd sizes: one line per halving averages 2 pixels instead of 3).
    assert max(errors.values()) < 0.05
    assert np.mean(list(errors.values())) < 0.02


def test_dali_grows_its_halving_stages(tmp_path):
    """An image needing more BOX halvings than the graph has makes it rebuild, exactly."""
    pytest.importorskip("nvidia.dali")
    res = 16
    for c in ("c0", "c1"):
        (tmp_path / c).mkdir()
    # 0, 4, 1 and 4 halvings at R=16; even sizes at every halving, so DALI's halvings are
    # exact (odd sides: one line per halving is approximate, which a 16 px output magnifies)
    sizes = [(40, 30), (320, 320), (50, 64), (512, 288)]
    for i, (w, h) in enumerate(sizes):
        natural_image(w, h, seed=200 + i).save(tmp_path / f"c{i % 2}" / f"{i}.jpg", quality=90)
    kwargs = dict(resolution=res, shuffle=False, num_workers=1)
    pil = [b[0] for b in build_image_loader(tmp_path, 1, loader="torch", **kwargs)]
    loader = build_image_loader(tmp_path, 1, loader="dali", **kwargs)
    dali = [b[0] for b in loader]
    assert loader._halving_stages == 4 and loader.stats["cpu_fallback_batches"] == 0
    error = np.mean([np.abs(a.numpy().astype(int) - b.numpy().astype(int)).mean() for a, b in zip(pil, dali)])
    assert error < 0.1, error
