"""benchmarks/throughput.py's anchor (issue 15): one fixed FLOP count per image for every
variant, the official step's result matched by setup and batch (speedup_vs_official), and
the host synchronisations per step (--count-syncs)."""

import json
import os
import subprocess
import sys

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel

from _paths import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import throughput  # noqa: E402


def official_line(setup="smoke", batch=2, device="cpu", images_per_s=4.0, **extra):
    return {"bench": "official_repae_step", "device": device, "images_per_s": images_per_s,
            "ms_per_step_median": 1e3 * batch / images_per_s, "peak_mem_allocated_gib": None,
            "config": {"setup": setup, "batch_size": batch, "precision": "fp16", "compile": False}, **extra}


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def smoke_args():
    import argparse

    return argparse.Namespace(smoke=True, steps="repae", models="tiny", batch=2)


def test_official_result_is_matched_by_setup_batch_and_device(tmp_path):
    args = smoke_args()
    path = write_jsonl(tmp_path / "official.jsonl", [
        official_line(batch=4), official_line(images_per_s=3.0),
        {"bench": "official_repae_step", "device": "cpu", "setup": "smoke", "batch_size": 2,
         "error": "CUDA out of memory"},
        official_line(images_per_s=5.0, device="NVIDIA H100 80GB HBM3")])
    assert throughput.load_official_result(path, args, "cpu")["images_per_s"] == 3.0  # the matching line
    args.batch = 8
    with pytest.raises(ValueError, match="batch 8 on cpu.*setup smoke batch 4 on cpu.*CUDA out of memory"):
        throughput.load_official_result(path, args, "cpu")
    args.batch, args.steps = 2, "ldm"
    with pytest.raises(ValueError, match="no official step result"):
        throughput.load_official_result(path, args, "cpu")
    with pytest.raises(ValueError, match="no such file"):
        throughput.load_official_result(str(tmp_path / "missing.jsonl"), args, "cpu")


def test_official_speedup_and_mfu_use_the_fixed_count():
    official = throughput.official_row(official_line(setup="A", batch=32, device="gpu", images_per_s=50.0),
                                       "f.jsonl", 790.0)
    assert official["variant"] == "official" and official["model"] == "SiT-XL/2"
    assert official["mfu"] == pytest.approx(50.0 * 3.77e12 / 790e12)
    rows = [{"section": "steps", "step": "repae", "model": "SiT-XL/2", "variant": "fast", "batch": 32,
             "images_per_s": 60.0},
            {"section": "steps", "step": "repae", "model": "SiT-XL/2", "variant": "fast", "batch": 16,
             "images_per_s": 55.0},
            {"section": "steps", "step": "ldm", "model": "SiT-XL/2", "variant": "fast", "batch": 32,
             "images_per_s": 150.0}, official]
    throughput.add_official_speedups(rows, official)
    assert rows[0]["speedup_vs_official"] == pytest.approx(1.2)
    assert all("speedup_vs_official" not in row for row in rows[1:])


def test_flop_count_on_the_meta_device_equals_the_real_count():
    for kind in ("repae", "ldm"):
        builder = throughput.build_repae if kind == "repae" else throughput.build_ldm
        run = builder("tiny", 2, throughput.torch.device("cpu"), "reference", True)
        # The meta device runs attention as the math path's matmuls; the CPU's fused SDPA
        # kernel is counted by another formula (0.7% apart on the tiny LDM step).
        with sdpa_kernel([SDPBackend.MATH]):
            real = throughput.count_flops(run, 0)
        assert real > 0 and throughput.count_reference_flops(kind, "tiny", True, 2) == real
    assert throughput.reference_flops_per_image("repae", "SiT-XL/2", False) == 3.77e12


def test_smoke_run_counts_syncs_and_adds_the_official_row(tmp_path):
    path = write_jsonl(tmp_path / "official.jsonl", [official_line(images_per_s=0.05)])
    command = [sys.executable, os.path.join(REPO, "benchmarks", "throughput.py"), "--smoke", "--sections", "steps",
               "--steps", "repae", "--variants", "reference,fast", "--count-syncs", "--official-result", path,
               "--out-dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "host syncs per step: repae/reference 1" in done.stdout
    assert "host syncs per step: repae/fast 1" in done.stdout
    (result,) = tmp_path.glob("throughput_smoke_*.json")
    rows = {r["variant"]: r for r in json.loads(result.read_text())["rows"]}
    assert rows["official"]["images_per_s"] == 0.05
    for variant in ("reference", "fast"):
        assert rows[variant]["speedup_vs_official"] == pytest.approx(rows[variant]["images_per_s"] / 0.05)
        assert rows[variant]["tflop_per_step"] == rows["official"]["tflop_per_step"]  # one count for all
    # --smoke forces batch 2: the mismatch comes from the file
    path_b = write_jsonl(tmp_path / "other.jsonl", [official_line(batch=4)])
    bad = subprocess.run(command[:command.index("--official-result") + 1] + [path_b], capture_output=True, text=True,
                         timeout=300, env=env)
    assert bad.returncode == 2 and "no official step result for setup smoke, batch 2" in bad.stderr
    assert "host syncs" not in bad.stdout  # refused before anything ran
