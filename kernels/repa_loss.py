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


def repa_fwd_partials(z, zt, weight, eps, part):
    """Writes ``cdiv(R, ROWS)`` fp32 partial sums of ``weight * cos`` into ``part``.

    z, zt: contiguous [R, d]. ``part`` must hold at least ``repa_num_partials(R, d)``.
    """
    R, d = z.shape
    rows, block_d, warps = _blocks(d)
    grid = (cdiv(R, rows),)
    _repa_fwd_kernel[grid](z, zt, part, R, d, float(weight), float(eps), ROWS=rows, BLOCK_D=block_d,
                           num_warps=warps)


def repa_num_partials(R, d):
    return cdiv(R, _blocks(d)[0])


def repa_bwd(z, zt, grad_out, weight, eps, need_dz, need_dzt):
    """grad_out: fp32 tensor with one element. Returns (dz or None, dzt or None)."""
    R, d = z.shape
    rows, block_d, warps = _blocks(d)
    dz = alloc((R, d), z.dtype, z.device) if need_dz else None
    dzt = alloc((R, d), zt.dtype, zt.device) if need_dzt else None
    _repa_bwd_kernel[(cdiv(R, rows),)](z, zt, grad_out, dz if need_dz else z, dzt if need_dzt else zt, R, d,
                                       float(weight), float(eps), NEED_DZ=need_dz, NEED_DZT=need_dzt,
                                       ROWS=rows, BLOCK_D=block_d, num_warps=warps)
    return dz, dzt


def new_partials(total, device):
    return alloc((total,), torch.float32, device)
