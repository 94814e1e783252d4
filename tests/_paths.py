"""Where the shared reference data lives (beside the checkout, as in CI)."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.environ.get("REPA_E_FAST_REFERENCE", os.path.join(REPO, "..", "shared", "reference"))
FIXTURES = os.path.join(REFERENCE, "fixtures")
MANIFESTS = os.path.join(REFERENCE, "manifests")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)
