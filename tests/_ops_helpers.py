"""Definitions shared by the op tests (tests/test_ops_*.py)."""

import pytest
import torch

from repa_e_fast.ops import _dispatch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# Spacing of the subnormal numbers: tiny gradients cannot be more precise than this in dtype.
SUBNORMAL_STEP = {d: torch.finfo(d).tiny * torch.finfo(d).eps for d in TOL}
needs_triton = pytest.mark.skipif(not _dispatch.triton_available(), reason="triton not installed")
