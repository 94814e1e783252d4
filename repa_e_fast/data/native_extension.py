"""The optional C++ extension ``repa_e_fast._C``: loaded once, with the reason when it is missing.

It holds the record store's gather thread pool (``RecordStore``) and the epoch permutation
in C++ (``permutation``). Everything that uses it has a NumPy implementation that gives the
same results; ``REPA_E_FAST_NO_NATIVE=1`` forces that one.
"""

from __future__ import annotations

import os
from typing import Optional


def _load_native():
    if os.environ.get("REPA_E_FAST_NO_NATIVE", "0") == "1":
        return None, "disabled by REPA_E_FAST_NO_NATIVE=1"
    try:
        from repa_e_fast import _C  # noqa: PLC0415 (optional extension)
    except ImportError as exc:
        return None, f"repa_e_fast._C could not be imported ({exc})"
    if not hasattr(_C, "RecordStore"):
        return None, "repa_e_fast._C has no RecordStore (stale build?)"
    return _C, None


NATIVE, _NATIVE_REASON = _load_native()


def native_available() -> bool:
    """True when the compiled extension can be used."""
    return NATIVE is not None


def native_unavailable_reason() -> Optional[str]:
    """Why the native implementation is not available (None when it is)."""
    return _NATIVE_REASON


def require_native(what: str):
    """The extension module; RuntimeError naming ``what`` when it is unavailable."""
    if NATIVE is None:
        raise RuntimeError(f"{what}: native implementation unavailable: {_NATIVE_REASON}")
    return NATIVE
