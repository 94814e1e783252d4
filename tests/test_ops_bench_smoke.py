"""`benchmarks/bench_ops.py --smoke` keeps working (CPU, Triton interpreter) and its
correctness check at the benchmark shapes passes."""

import json
import os
import subprocess
import sys

import pytest

from repa_e_fast.ops import _dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not _dispatch.triton_available(), reason="triton not installed")
def test_bench_ops_smoke(tmp_path):
    env = dict(os.environ)
    env.pop("REPA_E_FAST_OPS", None)
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_ops.py"), "--smoke", "--gn-act", "silu",
           "--out-dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = tmp_path.glob("ops_smoke_*.json")
    res = json.loads(path.read_text())
    ops = {c["op"] for c in res["cases"]}
    assert ops == {"adaln_modulate", "gated_residual", "gated_residual_adaln", "repa_cosine_loss", "group_norm"}
    for case in res["cases"]:
        assert case["ours_ms_fwd"] > 0 and case["ours_ms_fwd_bwd"] > 0 and case["eager_ms_fwd_bwd"] > 0, case
        for name, err in case.get("max_abs_err_fp32_vs_fp64", {}).items():
            assert err is not None and err < 1e-4, (case["op"], case["case"], name, err)
