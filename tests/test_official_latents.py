"""Reading the official cache_latents.py output (<data>/<name>.h5 + images.h5) as it is:
images and latents paired by sorted position, labels from the latent file, seeded epochs,
rank sharding, exact resume; and an LDM run started with the official flags on it."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from repa_e_fast.data.official_latents import OfficialLatentLoader
from repa_e_fast.data.sources import DatasetError

h5py = pytest.importorskip("h5py")
COUNT = 12


def png_bytes(index):
    pixels = np.full((32, 32, 3), index * 20, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def write_official_cache(directory, name="e2e-vavae", count=COUNT):
    """The official layout (docs/workflows.md#repa_e_fastcache_latents-and-ldm-only-training):
    image i is <group>/img<8 digits>.png, its latent <group>/img-mean-std-<8 digits>.npy filled
    with i, label i % 5."""
    directory.mkdir(parents=True, exist_ok=True)
    labels = []
    with h5py.File(directory / "images.h5", "w") as images, h5py.File(directory / f"{name}.h5", "w") as latents:
        for i in range(count):
            key = f"{i // 1000:05d}/img{i:08d}.png"
            images.create_dataset(key, data=np.void(png_bytes(i)))
            latents.create_dataset(key.replace("img", "img-mean-std-").replace(".png", ".npy"),
                                   data=np.full((8, 4, 4), float(i), dtype=np.float32))
            labels.append([key.replace("img", "img-mean-std-").replace(".png", ".npy"), i % 5])
        image_labels = [[f"{i // 1000:05d}/img{i:08d}.png", i % 5] for i in range(count)]
        images.create_dataset("dataset.json", data=np.void(json.dumps({"labels": image_labels}).encode()))
        latents.create_dataset("dataset.json", data=np.void(json.dumps({"labels": labels}).encode()))
        image_names, latent_names = [], []
        images.visit(image_names.append)
        latents.visit(latent_names.append)
    (directory / "images_h5.json").write_text(json.dumps(image_names))
    (directory / f"{name}_h5.json").write_text(json.dumps(latent_names))
    return directory / f"{name}.h5"


def test_pairs_images_latents_and_labels_by_position_and_resumes(tmp_path):
    path = write_official_cache(tmp_path / "data")
    loader = OfficialLatentLoader(str(path), 2, seed=3)
    assert (loader.num_images, loader.num_classes, len(loader)) == (COUNT, 5, COUNT // 2)
    seen = []
    for moments, images, labels in loader:
        index = moments[:, 0, 0, 0].long()
        assert moments.shape == (2, 8, 4, 4) and images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
        assert torch.equal(images[:, 0, 0, 0].long(), index * 20) and torch.equal(labels, index % 5)
        seen += index.tolist()
    assert sorted(seen) == list(range(COUNT)) and seen != list(range(COUNT)) and loader.epoch == 1

    # Two ranks split each epoch; a resumed loader continues exactly.
    ranks = [OfficialLatentLoader(str(path), 2, rank=r, world_size=2, seed=3) for r in range(2)]
    per_rank = [[m[:, 0, 0, 0].long().tolist() for m, _, _ in rank] for rank in ranks]
    assert sorted(sum(per_rank[0] + per_rank[1], [])) == list(range(COUNT))
    first = OfficialLatentLoader(str(path), 2, seed=3)
    batches = iter(first)
    next(batches)
    state = first.state_dict()
    resumed = OfficialLatentLoader(str(path), 2, seed=3)
    resumed.load_state_dict(state)
    assert [m[:, 0, 0, 0].tolist() for m, _, _ in resumed] == [m[:, 0, 0, 0].tolist() for m, _, _ in batches]


def test_mismatched_counts_are_refused(tmp_path):
    path = write_official_cache(tmp_path / "data")
    gone = "00000/img-mean-std-00000011.npy"
    with h5py.File(path, "a") as latents:
        del latents[gone]
    names = [n for n in json.loads((tmp_path / "data" / "e2e-vavae_h5.json").read_text()) if n != gone]
    (tmp_path / "data" / "e2e-vavae_h5.json").write_text(json.dumps(names))
    with pytest.raises(DatasetError, match="holds 11 latents but .* 12 images"):
        OfficialLatentLoader(str(path), 2)


def test_ldm_run_on_an_official_cache_with_the_official_flags(tmp_path):
    from _train_helpers import load_official, run_train

    write_official_cache(tmp_path / "data", count=8)
    result = run_train(tmp_path, "--train-mode", "ldm", "--data-dir", tmp_path / "data", "--vae-latents-name",
                       "e2e-vavae", "--max-train-steps", 2, "--num-classes", 10)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 images, 5 classes" in result.stdout
    official = load_official(tmp_path, 2)
    assert official["args"].latents_path == str(tmp_path / "data" / "e2e-vavae.h5") and official["steps"] == 2
