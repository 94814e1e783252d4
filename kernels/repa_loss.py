"""REPA cosine-loss kernels.

For one encoder: rows ``z`` (target features) and ``zt`` (projector outputs), both
contiguous ``[R, d]`` with ``R = B*T``. Per row, with ``F.normalize`` semantics
(``c = max(||v||, eps)``):

    cos = <z, zt> / (c_z * c_zt),      loss contribution = w * cos,  w = -1/(E*B*T)

The forward reads each row once (dot and both squared norms in one sweep over ``d``,
fp32) and writes one fp32 partial per program; the launcher sums the partials, so the
result is deterministic. The backward recomputes the three row sums and writes

    d/dzt = g*w/(c_z c_zt) * (z  - [||zt|| >= eps] * dot/c_zt^2 * zt)
    d/dz  = g*w/(c_z c_zt) * (zt - [||z||  >= eps] * dot/c_z^2  * z)

which is exactly the gradient autograd gives through ``F.normalize`` (clamp_min passes
the gradient where ``norm >= eps``; below it the norm is a constant ``eps``).
"""

import torch
import triton
import triton.language as tl

from ._common import alloc, cdiv, next_pow2


@triton.jit
def _row_sums(Z, ZT, rows, rmask, d, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    dot = tl.zeros([ROWS], dtype=tl.float32)
    nz = tl.zeros([ROWS], dtype=tl.float32)
    nt = tl.zeros([ROWS], dtype=tl.float32)
    for k in range(0, d, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols[None, :] < d)
        off = rows[:, None] * d + cols[None, :]
        z = tl.load(Z + off, mask=m, other=0.0).to(tl.float32)
        t = tl.load(ZT + off, mask=m, other=0.0).to(tl.float32)
        dot += tl.sum(z * t, axis=1)
        nz += tl.sum(z * z, axis=1)
        nt += tl.sum(t * t, axis=1)
    return dot, tl.sqrt(nz), tl.sqrt(nt)


@triton.jit
def _repa_fwd_kernel(Z, ZT, PART, R, d, weight, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < R
    dot, nz, nt = _row_sums(Z, ZT, rows, rmask, d, ROWS, BLOCK_D)
    cos = dot / (tl.maximum(nz, eps) * tl.maximum(nt, eps))
    tl.store(PART + pid, tl.sum(tl.where(rmask, cos, 0.0), axis=0) * weight)


@triton.jit
def _repa_bwd_kernel(Z, ZT, GOUT, DZ, DZT, R, d, weight, eps, NEED_DZ: tl.constexpr,
                     NEED_DZT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < R
    dot, nz, nt = _row_sums(Z, ZT, rows, rmask, d, ROWS, BLOCK_D)
    cz = tl.maximum(nz, eps)
    ct = tl.maximum(nt, eps)
    gw = tl.load(GOUT).to(tl.float32) * weight
    a = gw / (cz * ct)
    # Coefficient of the "own vector" term; zero where the norm was clamped to eps.
    bz = tl.where(nz >= eps, a * dot / (cz * cz), 0.0)
    bt = tl.where(nt >= eps, a * dot / (ct * ct), 0.0)
    for k in range(0, d, BLOCK_D):
        cols = k + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols[None, :] < d)
        off = rows[:, None] * d + cols[None, :]
        z = tl.load(Z + off, mask=m, other=0.0).to(tl.float32)
        t = tl.load(ZT + off, mask=m, other=0.0).to(tl.float32)
        if NEED_DZ:
            tl.store(DZ + off, (a[:, None] * t - bz[:, None] * z).to(DZ.dtype.element_ty), mask=m)
        if NEED_DZT:
            tl.store(DZT + off, (a[:, None] * z - bt[:, None] * t).to(DZT.dtype.element_ty), mask=m)


def _blocks(d):
    block_d = min(next_pow2(d), 1024)
    rows = max(1, min(16, 4096 // block_d))
    return rows, block_d, (4 if rows * block_d <= 2048 else 8)


def repa_loss_fwd(zs, zts, weights, eps):
    """``sum_e weights[e] * sum_rows cos(zs[e], zts[e])`` as a 0-dim fp32 tensor.

    zs[e], zts[e]: contiguous ``[B, T, d_e]``. Per encoder, the forward kernel writes one
    fp32 partial per program; the partials of all encoders are then summed in one
    fixed-order sum (deterministic, no atomics).
    """
    blocks = [_blocks(z.shape[2]) for z in zs]
    counts = [cdiv(z.shape[0] * z.shape[1], rows) for z, (rows, _, _) in zip(zs, blocks)]
    part = alloc((sum(counts),), torch.float32, zs[0].device)
    offset = 0
    for z, zt, weight, count, (rows, block_d, warps) in zip(zs, zts, weights, counts, blocks):
        B, T, d = z.shape
        _repa_fwd_kernel[(count,)](z.reshape(-1, d), zt.reshape(-1, d), part[offset:offset + count], B * T, d,
                                   float(weight), float(eps), ROWS=rows, BLOCK_D=block_d, num_warps=warps)
        offset += count
    return part.sum()


def repa_loss_bwd(z, zt, grad_out, weight, eps, need_dz, need_dzt):
    """One encoder's gradients: z, zt contiguous ``[B, T, d]``; grad_out a one-element fp32
    tensor. Returns (dz or None, dzt or None), shaped like z and zt."""
    d = z.shape[2]
    z2, zt2 = z.reshape(-1, d), zt.reshape(-1, d)
    R = z2.shape[0]
    rows, block_d, warps = _blocks(d)
    dz = alloc(z.shape, z.dtype, z.device) if need_dz else None
    dzt = alloc(zt.shape, zt.dtype, zt.device) if need_dzt else None
    _repa_bwd_kernel[(cdiv(R, rows),)](z2, zt2, grad_out, dz if need_dz else z, dzt if need_dzt else zt, R, d,
                                       float(weight), float(eps), NEED_DZ=need_dz, NEED_DZT=need_dzt,
                                       ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return dz, dzt
