import os

import torch

# Without a GPU, run the Triton kernels in Triton's CPU interpreter so the op tests
# exercise the real kernels. Triton reads TRITON_INTERPRET once, when it is imported,
# so this must happen here, before any test module imports triton. setdefault keeps an
# explicit choice from the environment. Models and other code default to the PyTorch
# reference path and are unaffected; only code that dispatches to a kernel (repa_e_fast.ops
# on CPU tensors) sees the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture
def kernel_env(monkeypatch):
    """Force the Triton path and NaN-poison every kernel output (unwritten elements fail)."""
    monkeypatch.setenv("REPA_E_FAST_OPS", "triton")
    monkeypatch.setenv("REPA_E_FAST_POISON", "1")


@pytest.fixture(autouse=True)
def _release_dali_threads():
    """A DALI loader sits in a reference cycle and keeps its ~45 worker threads alive until
    the garbage collector runs. A later test that forks DataLoader workers with those threads
    alive can deadlock in the child (seen once in CI: a worker stuck on a futex until the
    600 s timeout). Collecting after each test frees them before the next fork."""
    yield
    import gc

    gc.collect()
