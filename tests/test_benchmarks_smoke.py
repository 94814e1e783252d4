"""`python benchmarks/throughput.py --smoke` runs every section on a CPU and writes its JSON."""

import json
import os
import subprocess
import sys

from _paths import REPO


def test_throughput_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("REPA_E_FAST_OPS", None)
    completed = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "throughput.py"), "--smoke",
                                "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (path,) = list(tmp_path.glob("throughput_smoke_*.json"))
    report = json.loads(path.read_text())
    assert report["meta"]["command"].startswith("python benchmarks/throughput.py")
    steps = [r for r in report["rows"] if r["section"] == "steps"]
    assert {(r["step"], r["variant"]) for r in steps} == {("repae", "reference"), ("repae", "fast"),
                                                         ("ldm", "reference"), ("ldm", "fast")}
    assert all(r["images_per_s"] > 0 and r["tflop_per_step"] > 0 for r in steps)
    kernels = next(r for r in report["rows"] if r["section"] == "kernels")
    assert len(kernels["results"]["cases"]) > 0
    assert any(r["section"] == "attention" and r["median_ms"] > 0 for r in report["rows"])
