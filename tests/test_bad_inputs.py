"""Bad inputs an adversarial user tried (issue 16): each is one clear line and exit code 2
before any model is built, or a counted skip for bad data, never a silent wrong result."""

import importlib.util
import os

import numpy as np
import pytest
import torch

from repa_e_fast.config import ConfigError, make_config
from repa_e_fast.train import main as train_main


# -- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    ({"model_overrides": {"depht": 2}},
     "model_overrides: unknown SiT argument 'depht' (did you mean 'depth'?); valid: input_size, patch_size"),
    ({"model_overrides": "depth: 2"}, "model_overrides must be a mapping"),
    ({"model_overrides": {"depth": 2.5}}, "model_overrides.depth must be an integer, got 2.5"),
    ({"batch_size": 2.5}, "batch_size must be an integer, got 2.5 (float)"),
    ({"batch_size": 8.0}, "batch_size must be an integer, got 8.0 (float)"),
    ({"batch_size": True}, "batch_size must be an integer, got True (bool)"),
    ({"max_train_steps": "ten"}, "max_train_steps must be an integer"),
    ({"learning_rate": True}, "learning_rate must be a number"),
    ({"learning_rate": "nan"}, "learning_rate must be a finite number"),
    ({"exp_name": 3}, "exp_name must be a string"),
    ({"hflip": 1}, "hflip must be true or false"),
    ({"encoder_ckpts": "a.pt"}, "encoder_ckpts must be a list"),
    ({"adam_beta1": 1.5}, "adam_beta1 must be in [0, 1), got 1.5"),
    ({"adam_beta2": -0.1}, "adam_beta2 must be in [0, 1), got -0.1"),
    ({"adam_epsilon": -1}, "adam_epsilon must be > 0, got -1.0"),
    ({"adam_weight_decay": -0.5}, "adam_weight_decay must be >= 0"),
    ({"report_to": "foo"}, "report_to must be a comma list of jsonl, tensorboard, wandb, got 'foo'"),
    ({"report_to": "jsonl,tensorbord"}, "report_to must be a comma list"),
    ({"device": "cuda"}, "CUDA is not available"),
    ({"device": "tpu"}, "device must be 'cpu', 'cuda' or 'cuda:N'"),
    ({"attention": "flash_attn"}, "needs the 'flash_attn' package"),
])
def test_bad_config_values_are_one_clear_line(values, message):
    if "device" in values and values["device"] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if values.get("attention") == "flash_attn" and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    with pytest.raises(ConfigError) as error:
        make_config(values)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_valid_values_still_pass():
    config = make_config({"learning_rate": "1e-4", "batch_size": "8", "model_overrides": {"depth": 2},
                          "encoder_depth": 1, "report_to": "jsonl, tensorboard", "device": "cpu", "hflip": "true"})
    assert (config.learning_rate, config.batch_size, config.hflip) == (1e-4, 8, True)
    assert config.sit_kwargs()["depth"] == 2


@pytest.mark.parametrize("content", [
    bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8)),  # binary garbage
    b"\x00\x01\x02model: SiT-B/2\n",
    b"model: [SiT-B/2\nbatch_size: 4\n",  # broken YAML: the error spans lines in PyYAML
    b"model_overrides: depth 2\n",  # a string, not a mapping
    b"batch_size: 2.5\n",
    b"adam_beta1: 1.5\n",
])
def test_train_cli_exits_2_with_one_line_for_bad_yaml(tmp_path, capsys, content):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    assert train_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("old, new, value", [
    ("backend", "distributed", "deepspeed"),
    ("data_backend", "data_loader", "torch"),
    ("attn_backend", "attention", "math"),
])
def test_renamed_config_keys_and_flags_are_one_line_naming_the_new_name(tmp_path, capsys, old, new, value):
    with pytest.raises(ConfigError) as error:
        make_config({old: value})
    assert str(error.value) == f"config key '{old}' was renamed to '{new}'"
    config = tmp_path / "old.yaml"
    config.write_text(f"{old}: {value}\n")
    assert train_main(["--config", str(config)]) == 2
    assert capsys.readouterr().err == f"error: config key '{old}' was renamed to '{new}' (in {config})\n"
    old_flag, new_flag = "--" + old.replace("_", "-"), "--" + new.replace("_", "-")
    assert train_main([old_flag, value]) == 2
    assert capsys.readouterr().err == f"error: flag {old_flag} was renamed to {new_flag}\n"
    assert make_config({new: value}).to_dict()[new] == value


def test_cache_latents_refuses_the_old_data_loader_flag_in_one_line(capsys):
    from repa_e_fast.cache_latents import main as cache_latents_main

    assert cache_latents_main(["--data-dir", "x", "--output", "y", "--data-backend", "torch"]) == 2
    assert capsys.readouterr().err == "error: flag --data-backend was renamed to --data-loader\n"


# -- image folders ----------------------------------------------------------------------------
def _image_folder(root, layout):
    from test_data_common import jpeg_bytes, natural_image

    for seed, rel in enumerate(layout):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(natural_image(40, 36, seed)))


def test_directory_symlink_loop_lists_each_image_once(tmp_path):
    from repa_e_fast.data import build_image_loader
    from repa_e_fast.data.sources import scan_image_folder

    root = tmp_path / "raw"
    _image_folder(root, ["c0/a.jpg", "c0/b.jpg", "c1/c.jpg", "c1/sub/d.jpg"])
    os.symlink(root, root / "c0" / "loop")  # back to the root: a loop
    os.symlink(root / "c1" / "sub", root / "c0" / "alias")  # a second name for a real folder
    relpaths, labels, classes, _ = scan_image_folder(str(root))
    assert relpaths == ["c0/a.jpg", "c0/b.jpg", "c1/c.jpg", "c1/sub/d.jpg"]
    assert labels.tolist() == [0, 0, 1, 1] and classes == ["c0", "c1"]
    # A symlinked class folder outside the tree is still followed (once).
    _image_folder(tmp_path / "elsewhere", ["e.jpg"])
    os.symlink(tmp_path / "elsewhere", root / "c2")
    os.symlink(tmp_path / "elsewhere", root / "c1" / "again")
    loader = build_image_loader(root, 5, resolution=32, shuffle=False, num_workers=0)
    assert loader.num_images == 5 and loader.num_classes == 3


def test_fifo_named_like_an_image_is_skipped_and_counted(tmp_path):
    import threading

    from repa_e_fast.data import build_image_loader

    root = tmp_path / "raw"
    _image_folder(root, ["c0/a.jpg", "c0/c.jpg", "c1/d.jpg"])
    os.mkfifo(root / "c0" / "b.jpg")  # nothing ever writes to it
    loader = build_image_loader(root, 4, resolution=32, shuffle=False, num_workers=0, return_indices=True)
    batches = []
    reader = threading.Thread(target=lambda: batches.extend(loader), daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "the loader hangs on the FIFO"
    (_, labels, indices), = batches
    assert indices.tolist() == [0, 2, 2, 3] and labels.tolist() == [0, 0, 0, 1]
    assert loader.stats["bad_images"] == 1


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_very_wide_image_is_refused_from_its_header(tmp_path, kind):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    from PIL import Image

    from repa_e_fast.data import build_image_loader
    from repa_e_fast.data.crop import BadImage, decode_rgb

    root = tmp_path / "raw"
    _image_folder(root, ["c0/a.jpg", "c0/c.jpg"])
    Image.new("RGB", (6000, 2), (200, 10, 10)).save(root / "c0" / "b.png")  # 151 bytes, 3000:1
    with pytest.raises(BadImage, match="6000x2 is too elongated"):
        decode_rgb((root / "c0" / "b.png").read_bytes())
    loader = build_image_loader(root, 3, resolution=32, shuffle=False, num_workers=0, return_indices=True,
                                loader=kind)
    (_, _, indices), = list(loader)
    assert indices.tolist() == [0, 2, 2] and loader.stats["bad_images"] == 1
    # A merely wide photograph (4:1) is still used.
    assert decode_rgb(_png(Image.new("RGB", (160, 40))))[0].size == (160, 40)


def _png(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- checkpoints whose manifest fails ---------------------------------------------------------
RUN_ARGS = dict(model="SiT-S/2", vae="f8d4", enc_type="dinov2-vit-s", resolution=32, num_classes=10, cfg_prob=0.1,
                encoder_depth=2, projector_dim=64)


def _flip_a_weight_byte(path):
    """Flip one bit in the middle of the largest tensor of a torch.save file: the file still
    loads, one weight is wrong."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        offset = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x40]))


@pytest.fixture()
def damaged_checkpoint(tmp_path):
    """``<exp>/checkpoints/0000005/official.pt`` with its MANIFEST.json, then one weight
    bit flipped (the file still loads)."""
    import argparse

    from repa_e_fast.engine.checkpoint import verify_checkpoint, write_manifest
    from repa_e_fast.models import NLayerDiscriminator, build_sit, build_vae

    torch.manual_seed(0)
    sit = build_sit("SiT-S/2", input_size=4, in_channels=4, num_classes=10, z_dims=[384], encoder_depth=2,
                    projector_dim=64)
    directory = tmp_path / "exp" / "checkpoints" / "0000005"
    directory.mkdir(parents=True)
    torch.save({"ema": sit.state_dict(), "vae": build_vae("f8d4", ch=32).state_dict(),
                "discriminator": NLayerDiscriminator(ndf=8).state_dict(),
                "args": argparse.Namespace(**RUN_ARGS), "steps": 5}, directory / "official.pt")
    write_manifest(directory, 5)
    assert verify_checkpoint(directory) is None
    _flip_a_weight_byte(directory / "official.pt")
    torch.load(directory / "official.pt", weights_only=False)  # still a loadable file
    return directory / "official.pt"


def _one_error_line(capsys):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_generate_refuses_a_checkpoint_whose_manifest_fails(damaged_checkpoint, tmp_path, capsys):
    from repa_e_fast import generate

    argv = ["--ckpt", str(damaged_checkpoint), "--sample-dir", str(tmp_path / "samples"), "--num-fid-samples", "2",
            "--pproc-batch-size", "2", "--num-steps", "1"]
    assert generate.main(argv) == 2
    assert "official.pt fails its CRC-32 check" in _one_error_line(capsys)
    assert not (tmp_path / "samples").exists()


def test_extract_vae_refuses_a_checkpoint_whose_manifest_fails(damaged_checkpoint, tmp_path, capsys):
    from repa_e_fast import extract_vae

    assert extract_vae.main(["--ckpt", str(damaged_checkpoint), "--save-dir", str(tmp_path / "out"),
                             "--name", "e2e"]) == 2
    assert "official.pt fails its CRC-32 check" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_cache_latents_refuses_a_checkpoint_whose_manifest_fails(damaged_checkpoint, tmp_path, capsys):
    from repa_e_fast import cache_latents

    _image_folder(tmp_path / "raw", ["c0/a.jpg", "c1/b.jpg"])
    assert cache_latents.main(["--data-dir", str(tmp_path / "raw"), "--output", str(tmp_path / "cache"),
                               "--vae", "f8d4", "--vae-ch", "32", "--vae-ckpt", str(damaged_checkpoint),
                               "--resolution", "32", "--num-workers", "0"]) == 2
    assert "official.pt fails its CRC-32 check" in _one_error_line(capsys)
    assert not (tmp_path / "cache").exists()


# -- latent caches ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory):
    """A cache_latents output of 8 images (32 px, random f8d4 VAE): 8 records of [8, 4, 4]."""
    from repa_e_fast import cache_latents

    root = tmp_path_factory.mktemp("cache")
    _image_folder(root / "raw", [f"c{i % 2}/{i}.jpg" for i in range(8)])
    assert cache_latents.main(["--data-dir", str(root / "raw"), "--output", str(root / "cache"), "--vae", "f8d4",
                               "--vae-ch", "32", "--allow-random-vae", "--resolution", "32", "--batch-size", "4",
                               "--num-workers", "0", "--data-loader", "torch"]) == 0
    return root / "cache"


def _copy_of(cache, tmp_path):
    import shutil

    return shutil.copytree(cache, tmp_path / "cache")


def _flip_bit(path, offset):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x40]))


@pytest.mark.parametrize("file, where, record", [
    ("latents.rec", "record", 5),
    ("latents.rec", "label", 2),
])
def test_bit_flip_in_a_latent_cache_is_reported_by_file_and_record(latent_cache, tmp_path, file, where, record):
    from repa_e_fast.data.cached_latents import CachedLatentLoader
    from repa_e_fast.data.record_format import read_header
    from repa_e_fast.data.sources import DatasetError

    cache = _copy_of(latent_cache, tmp_path)
    loader = CachedLatentLoader(cache, 4, shuffle=True, seed=1)
    assert len(list(loader)) == 2  # intact: a clean epoch
    info = read_header(cache / file)
    offset = info.labels_offset + 8 * record if where == "label" else info.data_offset + record * info.record_bytes
    _flip_bit(cache / file, offset + 3)
    loader = CachedLatentLoader(cache, 4, shuffle=True, seed=1)  # opens: the header still agrees
    with pytest.raises(DatasetError) as error:
        for _ in loader:
            pass
    message = str(error.value)
    assert f"{file}': record {record} fails its CRC-32 check" in message
    assert "\n" not in message


def test_latent_cache_readers_stay_paired_across_epochs(latent_cache):
    from repa_e_fast.data.cached_latents import CachedLatentLoader

    loader = CachedLatentLoader(latent_cache, 4, shuffle=True, seed=3)
    for epoch in range(3):
        assert len(list(loader)) == 2, f"epoch {epoch}"
        assert loader.latents.state_dict() == loader.images.state_dict()
        assert loader.epoch == epoch + 1


def test_truncated_latent_cache_is_one_line_and_exit_2_at_open(latent_cache, tmp_path, capsys):
    from _train_helpers import TINY

    cache = _copy_of(latent_cache, tmp_path)
    size = os.path.getsize(cache / "latents.rec")
    os.truncate(cache / "latents.rec", size - 100)
    argv = [*TINY, "--num-classes", "2", "--train-mode", "ldm", "--latents-path", str(cache), "--max-train-steps",
            "1", "--output-dir", str(tmp_path / "out"), "--exp-name", "run"]
    assert train_main(argv) == 2
    err = _one_error_line(capsys)
    assert "latents.rec" in err and "truncated" in err


def test_prepare_skips_a_fifo_and_a_very_wide_image(tmp_path):
    import threading

    from PIL import Image

    from repa_e_fast.data.prepare import prepare

    root = tmp_path / "raw"
    _image_folder(root, ["c0/a.jpg", "c1/d.jpg"])
    os.mkfifo(root / "c0" / "b.jpg")
    Image.new("RGB", (6000, 2)).save(root / "c1" / "wide.png")
    summary = {}
    worker = threading.Thread(target=lambda: summary.update(
        prepare(root, tmp_path / "prep", resolution=32, workers=1, shard_size=4, progress=False)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "prepare hangs on the FIFO"
    assert summary["num_images"] == 2 and summary["bad_images"] == 2
