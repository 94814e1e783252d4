"""`python benchmarks/bench_data.py --smoke` measures every loader x source and writes its JSON."""

import json
import os
import subprocess
import sys

import pytest

from _paths import REPO


def test_bench_data_smoke(tmp_path):
    completed = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "bench_data.py"), "--smoke", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    (path,) = list(tmp_path.glob("data_smoke_cpu_*.json"))
    report = json.loads(path.read_text())
    meta = report["meta"]
    assert meta["command"].startswith("python benchmarks/bench_data.py") and meta["date"] and meta["versions"]
    sources = {r["source"] for r in report["rows"]}
    assert {"folder", "prepared_png", "prepared_jpeg"} <= sources
    assert all(r["images_per_s"] > 0 and r["bad_images"] == 0 for r in report["rows"])
    assert report["prepare"]["jpeg"]["mean_bytes_per_image"] < report["prepare"]["png"]["mean_bytes_per_image"]
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        pytest.skip("DALI not installed: only the torch loader was measured")
    assert {r["loader"] for r in report["rows"]} == {"torch", "dali-cpu"}
    assert report["crop_fidelity"]["dali-cpu"]["mean_abs_diff"] < 0.1
