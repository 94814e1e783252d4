"""What the kernels share: allocation and block sizing for the launchers, and the
``@triton.jit`` row helpers of the ``[B*T, D]`` row kernels (adaln.py, gated_residual.py)."""

import functools
import math
import os

import torch
import triton
import triton.language as tl

POISON_ENV = "REPA_E_FAST_POISON"


def poison_enabled() -> bool:
    # Debug/test switch: fill every buffer a kernel is supposed to write with NaN, so an
    # element the kernel forgets to write shows up as NaN instead of stale memory.
    return os.environ.get(POISON_ENV, "0") == "1"


def alloc(shape, dtype, device) -> torch.Tensor:
    if poison_enabled():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def alloc_like(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """Like ``torch.empty_like`` (keeps the memory format), NaN-filled when poisoning."""
    dtype = dtype or x.dtype
    if poison_enabled():
        return torch.full_like(x, float("nan"), dtype=dtype)
    return torch.empty_like(x, dtype=dtype)


def row_warps(block: int) -> int:
    """Warps for a program that holds one row of ``block`` columns."""
    return 1 if block <= 256 else 2 if block <= 512 else 4 if block <= 1024 else 8


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def target_programs(device: torch.device) -> int:
    """How many programs a reduction should be split into to fill the machine."""
    if device.type == "cuda":
        return 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    # Interpreter: every program is a Python loop iteration, so fewer is faster.
    return 4


def split_rows(n_rows: int, n_groups: int, device: torch.device, max_tile: int = 64) -> int:
    """Rows per program for a reduction over ``n_rows`` done for ``n_groups`` groups.

    Picks a tile so that ``n_groups * cdiv(n_rows, tile)`` programs roughly fill the GPU.
    """
    want_tiles = max(1, math.ceil(target_programs(device) / max(n_groups, 1)))
    return max(1, min(max_tile, cdiv(n_rows, want_tiles)))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    # Cached: the property query is not free and sits on every launch path.
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def token_row(b, t, T, cols, cmask):
    """Row index and column mask of token ``t`` of sample ``b`` in a ``[B*T, D]`` row
    matrix; a ``t`` past ``T`` (the last tile of a sample) is fully masked."""
    # Broadcast t explicitly (the interpreter rejects tensor & scalar-bool masks).
    return b * T + t, cmask & ((cols * 0 + t) < T)


@triton.jit
def gated_residual_row(X, GATE, Yin, row, b, D, cols, mask, stride_g):
    """``x + gate * y`` of one row (gate: row ``b`` of a ``[B, D]`` matrix), in fp32."""
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(Yin + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + b * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    return x + g * v
