"""Where the shared reference data lives (beside the checkout, as in CI)."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.environ.get("REPA_E_FAST_REFERENCE", os.path.join(REPO, "..", "shared", "reference"))
FIXTURES = os.path.join(REFERENCE, "fixtures")
MANIFESTS = os.path.join(REFERENCE, "manifests")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def failed_parity_checks(name: str):
    """Run one reference fixture through the parity tool with one intra-op thread (how the
    fixtures were produced) and return the lines of its failed checks and the check count;
    skips the test when the fixture is not beside the checkout."""
    import pytest
    import torch

    from repa_e_fast import parity

    path = fixture(name)
    if not os.path.exists(path):
        pytest.skip(f"reference fixture {path} not present (it lives in ../shared beside the checkout)")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = parity.run_fixture(path)
    finally:
        torch.set_num_threads(previous)
    return [r.line() for r in results if not r.passed], len(results)
