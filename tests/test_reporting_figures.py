"""The readable figures of engine/reporting.py: round ticks, smoothing, one panel per loss
family, the labelled and upscaled sample sheet."""

import numpy as np
import pytest
import torch
from PIL import Image

from repa_e_fast.engine import reporting


def test_nice_ticks_are_round_and_cover_the_range():
    assert reporting.nice_ticks(0.0206, 0.0341, 4) == pytest.approx([0.025, 0.03])  # step 0.005
    assert reporting.nice_ticks(-0.741, -0.2, 4) == pytest.approx([-0.6, -0.4, -0.2])  # step 0.2
    assert reporting.nice_ticks(1, 200, 6) == [50, 100, 150, 200]
    assert reporting.nice_ticks(5.0, 5.0) != []  # a constant series still gets ticks
    assert [reporting.tick_label(v, 0.0025) for v in (0.0225, 0.025)] == ["0.0225", "0.0250"]
    assert [reporting.tick_label(v, 0.2) for v in (-0.6, 0.0)] == ["-0.6", "0"]
    assert reporting.tick_label(150, 50) == "150" and reporting.tick_label(2.5, 2.5) == "2.5"


def test_smoothing_is_debiased():
    assert reporting.smooth([3.0, 3.0, 3.0]) == pytest.approx([3.0, 3.0, 3.0])  # no start-up bias
    noisy = [1.0 + (-1) ** i for i in range(100)]  # 0, 2, 0, 2, ...
    assert max(reporting.smooth(noisy)[50:]) - min(reporting.smooth(noisy)[50:]) < 0.25


def test_loss_curves_one_panel_per_family(tmp_path):
    keys = ("sit_loss", "denoising_loss", "proj_loss", "vae_loss", "vae_align_loss", "d_loss", "grad_norm")
    assert list(reporting.loss_families(keys)) == ["SiT (denoising)", "REPA alignment (negative cosine)", "VAE",
                                                   "discriminator", "grad_norm"]
    generator = np.random.default_rng(0)
    records = [{"step": s, "sit_loss": 2 - s / 100 + generator.normal(0, 0.1), "vae_loss": 0.02 + s * 1e-5}
               for s in range(1, 101)]
    path = reporting.plot_loss_curves(records, keys, tmp_path / "curve.png")
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (520, 900, 3)
    # Two panels (the families with data): two frames of black rows across the plot width.
    frame_rows = [y for y in range(image.shape[0]) if (image[y, 100:800] == 0).all(-1).mean() > 0.9]
    assert len(frame_rows) == 4
    blue = (31, 119, 180)
    assert ((image == blue).all(axis=-1)).sum() > 100  # the smoothed sit_loss in full colour
    faint = tuple(int(c + (255 - c) * 0.7) for c in blue)
    assert ((image == faint).all(axis=-1)).sum() > 20  # its raw series, faint
    empty = reporting.plot_loss_curves([{"step": 1, "sit_loss": float("nan")}], keys, tmp_path / "empty.png")
    assert Image.open(empty).size == (900, 520)


def test_sample_sheet_upscaled_labelled_with_reconstructions(tmp_path):
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    images[1, 0] = 255  # a red sample
    real, recon = images[:2], images[:2].flip(0)
    path = reporting.save_sample_sheet(images, tmp_path / "sheet.png", labels=[0, 1, 2, 3], columns=2,
                                       title="EMA samples", reconstructions=(real, recon),
                                       class_names={1: "red"})
    sheet = np.asarray(Image.open(path).convert("RGB"))
    # 32 px upscaled 4x to 128 px cells; the sheet is wide enough for its headings.
    assert sheet.shape[1] >= 2 * 128 + 3 * 6
    red = (sheet == (255, 0, 0)).all(axis=-1)
    assert red.sum() == 3 * 128 * 128  # the red sample, real image and reconstruction, upscaled
    with pytest.raises(TypeError, match="uint8"):
        reporting.save_sample_sheet(images.float(), tmp_path / "x.png")
    with pytest.raises(ValueError, match="reconstructions"):
        reporting.save_sample_sheet(images, tmp_path / "x.png", reconstructions=(real, recon[:1]))
