"""The prepare tool: ADM crop into tar shards, resumable, deterministic, readable by tar."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from repa_e_fast.data import DatasetError, build_image_loader
from repa_e_fast.data.prepare import main, prepare

from _paths import REPO
from test_data_common import RES, folder_files, make_folder, reference_crop


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("prep") / "raw")


def _shard_bytes(path):
    return {name: open(os.path.join(path, name), "rb").read()
            for name in sorted(os.listdir(path)) if name.endswith((".tar", ".npy", ".tsv"))}


def test_resume_continues_where_it_stopped(raw, tmp_path):
    dst = tmp_path / "resumed"
    first = prepare(raw, dst, resolution=RES, workers=2, shard_size=5, max_shards=1, progress=False)
    assert not first["complete"] and first["shards_written"] == 1 and first["shards_total"] == 3
    with pytest.raises(DatasetError, match="unfinished"):
        build_image_loader(dst, 2, resolution=RES)
    (dst / ".shard-000001.tar.tmp-999").write_bytes(b"half a shard from a killed run")
    shard0 = os.stat(dst / "shard-000000.tar")

    second = prepare(raw, dst, resolution=RES, workers=2, shard_size=5, progress=False)
    assert second["complete"] and second["shards_already_done"] == 1 and second["shards_written"] == 2
    assert second["images_processed"] == 12 - 5
    again = os.stat(dst / "shard-000000.tar")
    assert (again.st_ino, again.st_mtime_ns) == (shard0.st_ino, shard0.st_mtime_ns)  # not redone
    assert not [n for n in os.listdir(dst) if ".tmp-" in n]

    one_shot = tmp_path / "one_shot"
    prepare(raw, one_shot, resolution=RES, workers=1, shard_size=5, progress=False)
    assert _shard_bytes(dst) == _shard_bytes(one_shot)  # byte-identical, any worker count

    third = prepare(raw, dst, resolution=RES, workers=2, shard_size=5, progress=False)
    assert third["shards_written"] == 0 and third["complete"]


def test_other_settings_are_refused(raw, tmp_path):
    prepare(raw, tmp_path / "p", resolution=RES, workers=1, progress=False)
    with pytest.raises(DatasetError, match="resolution"):
        prepare(raw, tmp_path / "p", resolution=2 * RES, workers=1, progress=False)


def test_shards_are_plain_tar_with_a_correct_index(raw, tmp_path):
    prepare(raw, tmp_path / "p", resolution=RES, workers=1, shard_size=5, progress=False)
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert (meta["num_images"], meta["num_classes"], meta["resolution"], meta["codec"]) == (12, 3, RES, "png")
    index = np.load(tmp_path / "p" / "index.npy")
    files = folder_files(raw)
    row = 0
    for shard_name in meta["shards"]:
        with tarfile.open(tmp_path / "p" / shard_name) as tar:
            members = tar.getmembers()
            pngs = [m for m in members if m.name.endswith(".png")]
            for member in pngs:
                shard, offset, size, label = index[row]
                assert meta["shards"][shard] == shard_name
                assert (offset, size) == (member.offset_data, member.size)
                source_index = int(member.name[:8])
                assert source_index == row  # nothing skipped in this folder
                cls = tar.extractfile(member.name.replace(".png", ".cls")).read()
                assert int(cls) == label == int(files[row].split("/")[0][1:])
                data = tar.extractfile(member).read()
                decoded = np.asarray(Image.open(io.BytesIO(data))).transpose(2, 0, 1)
                assert np.array_equal(decoded, reference_crop(os.path.join(raw, files[row])))
                row += 1
    assert row == 12


def test_jpeg_codec_is_smaller_and_close(raw, tmp_path):
    prepare(raw, tmp_path / "png", resolution=RES, workers=1, progress=False)
    prepare(raw, tmp_path / "jpeg", resolution=RES, workers=1, codec="jpeg", progress=False)
    png_size = np.load(tmp_path / "png" / "index.npy")[:, 2].sum()
    jpeg_size = np.load(tmp_path / "jpeg" / "index.npy")[:, 2].sum()
    assert jpeg_size < png_size
    kwargs = dict(resolution=RES, shuffle=False, num_workers=0)
    (a, la), = list(build_image_loader(tmp_path / "png", 12, **kwargs))
    (b, lb), = list(build_image_loader(tmp_path / "jpeg", 12, **kwargs))
    assert np.array_equal(la.numpy(), lb.numpy())
    assert np.abs(a.numpy().astype(int) - b.numpy().astype(int)).mean() < 3.0


def test_command_line(raw, tmp_path, capsys):
    assert main([raw, str(tmp_path / "cli"), "--resolution", str(RES), "--workers", "1",
                 "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["complete"] and summary["num_images"] == 12
    assert main([str(tmp_path / "missing"), str(tmp_path / "x"), "--no-progress"]) == 2
    # The module entry point runs as documented (python -m ...).
    result = subprocess.run(
        [sys.executable, "-m", "repa_e_fast.data.prepare", raw, str(tmp_path / "cli_m"),
         "--resolution", str(RES), "--workers", "2", "--format", "jpeg", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "cli_m" / "meta.json").read_text())["codec"] == "jpeg"
