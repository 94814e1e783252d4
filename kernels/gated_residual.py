"""Gated residual kernels: ``out = x + gate * y`` with ``gate`` broadcast over tokens.

``x``/``y``: contiguous ``[B*T, D]`` rows; ``gate``: ``[B, D]``, unit column stride, any
row stride (a ``chunk`` view of the adaLN projection is read in place). The backward
gives ``dy = dout * gate`` and ``dgate = sum_T dout * y`` (per-program fp32 partial
rows over a tile of T, summed by the launcher); ``dx = dout`` needs no kernel.
"""

import torch
import triton
import triton.language as tl

from ._common import alloc, cdiv, gated_residual_row, next_pow2, row_warps, split_rows, token_row


@triton.jit
def _gated_residual_fwd_kernel(X, GATE, Yin, OUT, T, D, stride_g, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    out = gated_residual_row(X, GATE, Yin, row, b, D, cols, mask, stride_g)
    tl.store(OUT + row * D + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(DOUT, Yin, GATE, DYin, PGATE, T, D, stride_g, rows_per_prog,
                               BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    gate = tl.load(GATE + b * stride_g + cols, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    t0 = tile * rows_per_prog
    for i in range(0, rows_per_prog):
        row, mask = token_row(b, t0 + i, T, cols, cmask)
        do = tl.load(DOUT + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(Yin + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DYin + row * D + cols, (do * gate).to(DYin.dtype.element_ty), mask=mask)
        acc += do * v
    tl.store(PGATE + (b * n_tiles + tile) * D + cols, acc, mask=cmask)


def gated_residual_fwd(x, gate, y, out_dtype):
    B, T, D = x.shape
    out = alloc((B, T, D), out_dtype, x.device)
    block = next_pow2(D)
    _gated_residual_fwd_kernel[(B * T,)](x, gate, y, out, T, D, gate.stride(0), BLOCK_D=block,
                                         num_warps=row_warps(block))
    return out


def gated_residual_bwd(dout, y, gate, dy_dtype):
    """Returns (dy [B, T, D] dy_dtype, dgate [B, D] fp32)."""
    B, T, D = y.shape
    rows = split_rows(T, B, y.device)
    n_tiles = cdiv(T, rows)
    dy = alloc((B, T, D), dy_dtype, y.device)
    pg = alloc((B, n_tiles, D), torch.float32, y.device)
    block = next_pow2(D)
    _gated_residual_bwd_kernel[(B, n_tiles)](dout, y, gate, dy, pg, T, D, gate.stride(0), rows,
                                             BLOCK_D=block, num_warps=row_warps(block))
    return dy, pg.sum(1)
