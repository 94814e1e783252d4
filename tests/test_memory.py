"""`benchmarks/memory.py` counts one REPA-E step on fake tensors; at the throughput smoke
size the same count on real CPU tensors (the same hooks on real storages) must agree byte
for byte, for the reference and the fast path (fused ops through the Triton interpreter)."""

import importlib.util
import os
import sys

import pytest

from repa_e_fast.ops import _dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _memory():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("memory", os.path.join(ROOT, "benchmarks", "memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", ["reference", "fast"])
def test_fake_count_equals_real_count(variant, monkeypatch):
    if variant == "fast" and not _dispatch.triton_available():
        pytest.skip("triton not installed")
    monkeypatch.delenv("REPA_E_FAST_OPS", raising=False)
    memory = _memory()
    fake = memory.measure("tiny", 1, variant, smoke=True, fake=True)
    real = memory.measure("tiny", 1, variant, smoke=True, fake=False)
    assert fake["saved_bytes"] == real["saved_bytes"]
    assert fake["peak_bytes"] == real["peak_bytes"]
    assert fake["parameter_bytes"] == real["parameter_bytes"] and fake["optimizer_bytes"] == real["optimizer_bytes"]
    saved = fake["saved_bytes"]
    for component in ("VAE encoder", "VAE decoder", "LPIPS", "discriminator (VAE loss)", "discriminator (D loss)",
                      "SiT align pass", "SiT train pass"):
        assert saved[component] > 0, component
    # AdamW keeps two fp32 moments per trainable parameter (and a step count per tensor)
    trainable = sum(fake["gradient_bytes"].values())
    assert 2 * trainable <= fake["optimizer_bytes"] < 2 * trainable + 4096
    static = sum(fake["parameter_bytes"].values())
    assert fake["peak_bytes"] >= static + sum(saved[c] for c in memory.VAE_SUBSTEP)


def test_fast_path_saves_less_in_the_vae():
    memory = _memory()
    reference = memory.measure("tiny", 2, "reference", smoke=True)
    fast = memory.measure("tiny", 2, "fast", smoke=True)
    for component in ("VAE encoder", "VAE decoder"):
        # fused GroupNorm+SiLU saves its input and two fp32 statistics per group instead
        # of the GroupNorm output and the SiLU input
        assert fast["saved_bytes"][component] < reference["saved_bytes"][component]
    # the fast LPIPS runs real and fake as one 2B batch through the VGG16, so it also saves
    # the real half's activations (the trade for one pass instead of two)
    assert fast["saved_bytes"]["LPIPS"] > reference["saved_bytes"]["LPIPS"]


def test_bad_arguments_exit_2(capsys):
    memory = _memory()
    for args in (["--variants", "nope"], ["--model", "SiT-Q/9"], ["--batch", "0"]):
        assert memory.main(args) == 2
        assert capsys.readouterr().err.count("\n") == 1
