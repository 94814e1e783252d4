"""adaLN modulation kernels: ``y = LayerNorm(x) * (1 + scale) + shift``.

Also the fused "gated residual + next adaLN" pair used between SiT sub-blocks:
``out = x + gate * y`` and ``y2 = LayerNorm(out) * (1 + scale2) + shift2``.

Layout: ``x`` is a contiguous ``[B*T, D]`` row matrix; the per-sample vectors
(shift, scale, gate) are ``[B, D]`` with unit column stride and any row stride, so the
views produced by ``chunk(6, dim=1)`` of the adaLN projection are read in place.
Statistics are fp32. LayerNorm has no affine parameters.

The backward kernels run one program per (sample, tile of T rows): each program walks
its rows, writes the row gradient, and keeps the per-column partial sums for the
[B, D] gradients (shift, scale, gate) in registers, writing one fp32 row per program.
The launcher sums those few partial rows, so no ``[B, T, D]`` product is materialised.
"""

import torch
import triton
import triton.language as tl

from ._common import alloc, cdiv, gated_residual_row, next_pow2, row_warps, split_rows, token_row


@triton.jit
def _layer_norm_modulate_row(h, row, b, cols, mask, SHIFT, SCALE, Y, MEAN, RSTD, D, stride_sh, stride_sc, eps):
    """Writes ``LayerNorm(h) * (1 + scale) + shift`` of the fp32 row ``h`` (masked lanes 0)
    to ``Y`` and its mean / rstd to ``MEAN`` / ``RSTD``."""
    mean = tl.sum(h, axis=0) / D
    hc = tl.where(mask, h - mean, 0.0)
    # Two-pass variance on the row held in registers: exact, no cancellation.
    var = tl.sum(hc * hc, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    sh = tl.load(SHIFT + b * stride_sh + cols, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(SCALE + b * stride_sc + cols, mask=mask, other=0.0).to(tl.float32)
    y = hc * rstd * (1.0 + sc) + sh
    tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_modulate_bwd_row(X, DY, MEAN, RSTD, b, t, T, D, cols, cmask, sc1):
    """The backward of :func:`_layer_norm_modulate_row` for token ``t`` of sample ``b``
    (``sc1 = 1 + scale``): (row, mask, dy, xhat, dx), all but row and mask fp32 vectors."""
    row, mask = token_row(b, t, T, cols, cmask)
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    # Rows past T are fully masked; read a valid row's stats instead of a masked scalar.
    srow = b * T + tl.minimum(t, T - 1)
    mean = tl.load(MEAN + srow)
    rstd = tl.load(RSTD + srow)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    g = dy * sc1
    c1 = tl.sum(g * xhat, axis=0) / D
    c2 = tl.sum(g, axis=0) / D
    return row, mask, dy, xhat, (g - xhat * c1 - c2) * rstd


@triton.jit
def _adaln_fwd_kernel(X, SHIFT, SCALE, Y, MEAN, RSTD, T, D, stride_sh, stride_sc, eps,
                      BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    _layer_norm_modulate_row(x, row, row // T, cols, mask, SHIFT, SCALE, Y, MEAN, RSTD, D, stride_sh, stride_sc,
                             eps)


@triton.jit
def _adaln_bwd_kernel(X, SCALE, DY, MEAN, RSTD, DX, PSHIFT, PSCALE, T, D, stride_sc, rows_per_prog,
                      BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    sc1 = 1.0 + tl.load(SCALE + b * stride_sc + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_sh = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_sc = tl.zeros([BLOCK_D], dtype=tl.float32)
    t0 = tile * rows_per_prog
    for i in range(0, rows_per_prog):
        row, mask, dy, xhat, dx = _layer_norm_modulate_bwd_row(X, DY, MEAN, RSTD, b, t0 + i, T, D, cols, cmask,
                                                               sc1)
        tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=mask)
        acc_sh += dy
        acc_sc += dy * xhat
    prow = b * n_tiles + tile
    tl.store(PSHIFT + prow * D + cols, acc_sh, mask=cmask)
    tl.store(PSCALE + prow * D + cols, acc_sc, mask=cmask)


def adaln_fwd(x, shift, scale, eps, out_dtype):
    """x: contiguous [B, T, D]; shift/scale: [B, D] with stride(1) == 1.

    Returns (y [B, T, D] out_dtype, mean [B*T] fp32, rstd [B*T] fp32).
    """
    B, T, D = x.shape
    y = alloc((B, T, D), out_dtype, x.device)
    mean = alloc((B * T,), torch.float32, x.device)
    rstd = alloc((B * T,), torch.float32, x.device)
    block = next_pow2(D)
    _adaln_fwd_kernel[(B * T,)](x, shift, scale, y, mean, rstd, T, D, shift.stride(0), scale.stride(0),
                                float(eps), BLOCK_D=block, num_warps=row_warps(block))
    return y, mean, rstd


def adaln_bwd(x, scale, dy, mean, rstd, dx_dtype):
    """Returns (dx [B, T, D] dx_dtype, dshift [B, D] fp32, dscale [B, D] fp32)."""
    B, T, D = x.shape
    rows = split_rows(T, B, x.device)
    n_tiles = cdiv(T, rows)
    dx = alloc((B, T, D), dx_dtype, x.device)
    psh = alloc((B, n_tiles, D), torch.float32, x.device)
    psc = alloc((B, n_tiles, D), torch.float32, x.device)
    block = next_pow2(D)
    _adaln_bwd_kernel[(B, n_tiles)](x, scale, dy, mean, rstd, dx, psh, psc, T, D, scale.stride(0), rows,
                                    BLOCK_D=block, num_warps=row_warps(block))
    return dx, psh.sum(1), psc.sum(1)


# ---------------------------------------------------------------------------------------
# Fused: out = x + gate * y ; y2 = LN(out) * (1 + scale2) + shift2
# ---------------------------------------------------------------------------------------


@triton.jit
def _gr_adaln_fwd_kernel(X, GATE, Yin, SHIFT, SCALE, OUT, Y2, MEAN, RSTD, T, D,
                         stride_g, stride_sh, stride_sc, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    out = gated_residual_row(X, GATE, Yin, row, b, D, cols, mask, stride_g).to(OUT.dtype.element_ty)
    tl.store(OUT + row * D + cols, out, mask=mask)
    # Normalise the stored (rounded) residual, exactly what the unfused pair would read.
    _layer_norm_modulate_row(out.to(tl.float32), row, b, cols, mask, SHIFT, SCALE, Y2, MEAN, RSTD, D, stride_sh,
                             stride_sc, eps)


@triton.jit
def _gr_adaln_bwd_kernel(OUT, Yin, GATE, SCALE, DOUT, DY2, MEAN, RSTD, DX, DYin,
                         PGATE, PSHIFT, PSCALE, T, D, stride_g, stride_sc, rows_per_prog,
                         HAS_DOUT: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    sc1 = 1.0 + tl.load(SCALE + b * stride_sc + cols, mask=cmask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * stride_g + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_g = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_sh = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_sc = tl.zeros([BLOCK_D], dtype=tl.float32)
    t0 = tile * rows_per_prog
    for i in range(0, rows_per_prog):
        row, mask, dy2, xhat, dh = _layer_norm_modulate_bwd_row(OUT, DY2, MEAN, RSTD, b, t0 + i, T, D, cols,
                                                                cmask, sc1)
        if HAS_DOUT:
            dh += tl.load(DOUT + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * D + cols, dh.to(DX.dtype.element_ty), mask=mask)
        tl.store(DYin + row * D + cols, (dh * gate).to(DYin.dtype.element_ty), mask=mask)
        v = tl.load(Yin + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        acc_g += dh * v
        acc_sh += dy2
        acc_sc += dy2 * xhat
    prow = b * n_tiles + tile
    tl.store(PGATE + prow * D + cols, acc_g, mask=cmask)
    tl.store(PSHIFT + prow * D + cols, acc_sh, mask=cmask)
    tl.store(PSCALE + prow * D + cols, acc_sc, mask=cmask)


def gated_residual_adaln_fwd(x, gate, y, shift, scale, eps, out_dtype, y2_dtype):
    """Returns (out, y2, mean, rstd); out and y2 are [B, T, D], mean/rstd [B*T] fp32."""
    B, T, D = x.shape
    out = alloc((B, T, D), out_dtype, x.device)
    y2 = alloc((B, T, D), y2_dtype, x.device)
    mean = alloc((B * T,), torch.float32, x.device)
    rstd = alloc((B * T,), torch.float32, x.device)
    block = next_pow2(D)
    _gr_adaln_fwd_kernel[(B * T,)](x, gate, y, shift, scale, out, y2, mean, rstd, T, D,
                                   gate.stride(0), shift.stride(0), scale.stride(0), float(eps),
                                   BLOCK_D=block, num_warps=row_warps(block))
    return out, y2, mean, rstd


def gated_residual_adaln_bwd(out, y, gate, scale, dout, dy2, mean, rstd, dx_dtype, dy_dtype):
    """dout may be None (the residual output is not used downstream).

    Returns (dx, dy, dgate fp32 [B, D], dshift fp32 [B, D], dscale fp32 [B, D]).
    """
    B, T, D = out.shape
    rows = split_rows(T, B, out.device)
    n_tiles = cdiv(T, rows)
    dx = alloc((B, T, D), dx_dtype, out.device)
    dyin = alloc((B, T, D), dy_dtype, out.device)
    parts = [alloc((B, n_tiles, D), torch.float32, out.device) for _ in range(3)]
    block = next_pow2(D)
    _gr_adaln_bwd_kernel[(B, n_tiles)](out, y, gate, scale, dout if dout is not None else dy2, dy2, mean, rstd,
                                       dx, dyin, parts[0], parts[1], parts[2], T, D, gate.stride(0),
                                       scale.stride(0), rows, HAS_DOUT=dout is not None, BLOCK_D=block,
                                       num_warps=row_warps(block))
    return dx, dyin, parts[0].sum(1), parts[1].sum(1), parts[2].sum(1)
