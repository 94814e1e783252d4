"""Definitions shared by the op tests (tests/test_ops_*.py)."""

import zlib

import pytest
import torch

from repa_e_fast.ops import _dispatch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
# Spacing of the subnormal numbers: tiny gradients cannot be more precise than this in dtype.
SUBNORMAL_STEP = {d: torch.finfo(d).tiny * torch.finfo(d).eps for d in TOL}
needs_triton = pytest.mark.skipif(not _dispatch.triton_available(), reason="triton not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, T, D): SiT-XL width with few tokens, odd widths. In the interpreter the backward
# splits each sample's T rows into tiles of up to 64 rows (split_rows, 4 programs wanted):
# T = 1 one tile; T = 3 and 7 a partial last tile; T = 129 tiles capped at 64 rows, the
# last one a single row; T = 128 four full tiles. Every row is an interpreted program in
# the forward, so T stays as small as these cases allow.
ROW_SHAPES = [(2, 1, 1152), (2, 3, 1152), (2, 129, 72), (1, 128, 77), (3, 7, 5)]


def close(actual, ref, dtype, what):
    """|a - r| <= tol * (|r| + max|r|): relative to the tensor's scale."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    tol = TOL[dtype]
    scale = ref.abs().max().item()
    torch.testing.assert_close(actual.double(), ref, rtol=tol, atol=tol * scale + SUBNORMAL_STEP[dtype], msg=lambda m: f"{what}: {m}")


def rand(gen, *shape, dtype, scale=1.0, offset=0.0):
    """Random tensor rounded to ``dtype`` on DEVICE, plus its exact float64 copy."""
    t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)
    return t.to(DEVICE), t.double().to(DEVICE)


def leaf(t):
    return t.clone().requires_grad_(True)


def case_seed(*key) -> int:
    """A seed from a test case's parameters, the same in every run (crc32 of their repr:
    hash() of a str changes from one interpreter to the next)."""
    return zlib.crc32(repr(key).encode())


def case_generator(salt, shape, dtype):
    """A generator seeded from the test case, so every parametrised case draws its own data."""
    return torch.Generator().manual_seed(case_seed(salt, shape, str(dtype)))
