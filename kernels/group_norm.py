"""GroupNorm (+ optional fused SiLU) kernels for ``[N, C, H, W]`` tensors.

Both memory formats are handled by the same kernels: a tile is ``[BLOCK_P pixels,
BLOCK_G groups, BLOCK_C channels-per-group]`` of one sample, i.e. a block of pixels
across *all* channels, addressed as ``(g*CG + c)*HW + p`` for NCHW-contiguous and
``p*C + g*CG + c`` for channels_last. So a program always reads a contiguous run of
memory in either format, and the per-group reductions are axis sums of the tile.

Large groups are split over many programs (a "chunk" is a run of pixel tiles of one
sample), which fills the GPU even when ``N * G`` is small:

forward:  stats   (N, chunks): per chunk and group, mean and M2 (sum of squared
                  deviations). Each element slot of the tile keeps a Welford mean/M2 over
                  the chunk's tiles (the loop streams x with no cross-thread reduction);
                  the slots and then the chunks are merged with Chan's parallel formula,
                  so a large mean offset does not cancel the variance (no naive sum of
                  squares).
          finalize (N,): merge the chunk partials -> mean, rstd [N, G] fp32.
          normalize (N, chunks): y = x * (w*rstd) + (b - mean*w*rstd), optional SiLU.
backward: reduce  (N, chunks): per group sum(dxhat), sum(dxhat*xhat); per channel
                  sum(dz*xhat), sum(dz) (for dweight, dbias) as fp32 partials.
          dx      (N, chunks): dx = rstd * (dxhat - mean(dxhat) - xhat*mean(dxhat*xhat)),
                  the two group means summed from the reduce partials in the kernel.
where z = xhat*w + b, y = silu(z) (or z), dz = dy * silu'(z), dxhat = dz * w.
"""

import torch
import triton
import triton.language as tl

from ._common import alloc, alloc_like, cdiv, next_pow2, target_programs

TILE_ELEMS = 4096


@triton.jit
def _offsets(p, g, c, HW, C: tl.constexpr, CG: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return p * C + g * CG + c
    else:
        return (g * CG + c) * HW + p


@triton.jit
def _gn_stats_kernel(X, PMEAN, PM2, HW, tiles_per_chunk, C: tl.constexpr, G: tl.constexpr,
                     CG: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    base = X + n.to(tl.int64) * HW * C
    pp = tl.arange(0, BLOCK_P)[:, None, None]
    g0 = tl.program_id(2) * BLOCK_G
    g = g0 + tl.arange(0, BLOCK_G)[None, :, None]
    c = tl.arange(0, BLOCK_C)[None, None, :]
    cmask = (g < G) & (c < CG)
    # Welford per lane (one element slot of the tile) over the chunk's tiles: the loop only
    # streams x and updates registers, with no reduction across threads; the lanes are
    # merged once, after it. A slot valid in tile i was valid in tiles 0..i (pixels only
    # grow along the chunk), so its count there is i + 1.
    lane_n = tl.zeros([BLOCK_P, BLOCK_G, BLOCK_C], dtype=tl.float32)
    lane_mean = tl.zeros([BLOCK_P, BLOCK_G, BLOCK_C], dtype=tl.float32)
    lane_m2 = tl.zeros([BLOCK_P, BLOCK_G, BLOCK_C], dtype=tl.float32)
    chunk_p0 = chunk * tiles_per_chunk * BLOCK_P
    for i in range(0, tiles_per_chunk):
        p = chunk_p0 + i * BLOCK_P + pp
        m = cmask & (p < HW)
        x = tl.load(base + _offsets(p, g, c, HW, C, CG, CHANNELS_LAST), mask=m, other=0.0).to(tl.float32)
        lane_n += tl.where(m, 1.0, 0.0)
        delta = tl.where(m, x - lane_mean, 0.0)
        lane_mean += delta * (1.0 / (i + 1.0))
        lane_m2 += delta * (x - lane_mean)
    # Chan et al. merge of the lanes of each group.
    cnt = tl.sum(tl.sum(lane_n, axis=2), axis=0)
    mean = tl.sum(tl.sum(lane_n * lane_mean, axis=2), axis=0) / tl.maximum(cnt, 1.0)
    d = lane_mean - mean[None, :, None]
    m2 = tl.sum(tl.sum(lane_m2 + lane_n * d * d, axis=2), axis=0)
    gg = g0 + tl.arange(0, BLOCK_G)
    out = (n * n_chunks + chunk) * G + gg
    tl.store(PMEAN + out, mean, mask=gg < G)
    tl.store(PM2 + out, m2, mask=gg < G)


@triton.jit
def _gn_finalize_kernel(PMEAN, PM2, MEAN, RSTD, HW, n_chunks, chunk_pixels, eps, G: tl.constexpr,
                        CG: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    n = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)[:, None]
    g = tl.arange(0, BLOCK_G)[None, :]
    total = HW * CG * 1.0  # HW may arrive as a Python int (Triton specialises 1)
    acc = tl.zeros([BLOCK_K, BLOCK_G], dtype=tl.float32)
    for k0 in range(0, n_chunks, BLOCK_K):
        kk = k0 + k
        m = (kk < n_chunks) & (g < G)
        cnt = (tl.minimum(HW - kk * chunk_pixels, chunk_pixels) * CG).to(tl.float32)
        pm = tl.load(PMEAN + (n * n_chunks + kk) * G + g, mask=m, other=0.0)
        acc += tl.where(m, pm * cnt, 0.0)
    mean = tl.sum(acc, axis=0) / total
    acc = tl.zeros([BLOCK_K, BLOCK_G], dtype=tl.float32)
    for k0 in range(0, n_chunks, BLOCK_K):
        kk = k0 + k
        m = (kk < n_chunks) & (g < G)
        cnt = (tl.minimum(HW - kk * chunk_pixels, chunk_pixels) * CG).to(tl.float32)
        pm = tl.load(PMEAN + (n * n_chunks + kk) * G + g, mask=m, other=0.0)
        p2 = tl.load(PM2 + (n * n_chunks + kk) * G + g, mask=m, other=0.0)
        d = pm - mean[None, :]
        acc += tl.where(m, p2 + cnt * d * d, 0.0)
    var = tl.sum(acc, axis=0) / total
    gg = tl.arange(0, BLOCK_G)
    tl.store(MEAN + n * G + gg, mean, mask=gg < G)
    tl.store(RSTD + n * G + gg, 1.0 / tl.sqrt(var + eps), mask=gg < G)


@triton.jit
def _gn_norm_kernel(X, W, B, MEAN, RSTD, Y, HW, tiles_per_chunk, C: tl.constexpr, G: tl.constexpr,
                    CG: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, SILU: tl.constexpr, BLOCK_P: tl.constexpr,
                    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    chunk = tl.program_id(1)
    n, off_n, pp, g0, g, c, cmask, mean, rstd = _gn_tile_stats(MEAN, RSTD, HW, C, G, CG, BLOCK_P, BLOCK_G, BLOCK_C)
    # Fold normalisation and affine into one multiply-add per element.
    a = rstd
    if HAS_W:
        a = a * tl.load(W + g * CG + c, mask=cmask, other=0.0).to(tl.float32)
    shift = -mean * a
    if HAS_B:
        shift = shift + tl.load(B + g * CG + c, mask=cmask, other=0.0).to(tl.float32)
    chunk_p0 = chunk * tiles_per_chunk * BLOCK_P
    for i in range(0, tiles_per_chunk):
        p = chunk_p0 + i * BLOCK_P + pp
        m = cmask & (p < HW)
        off = off_n + _offsets(p, g, c, HW, C, CG, CHANNELS_LAST)
        x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
        z = x * a + shift
        if SILU:
            z = z / (1.0 + tl.exp(-z))
        tl.store(Y + off, z.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _gn_tile_stats(MEAN, RSTD, HW, C: tl.constexpr, G: tl.constexpr, CG: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """The program's tile coordinates (sample ``n`` at offset ``off_n``; pixel, group and
    channel ranges ``pp``, ``g``, ``c``; ``g0`` its first group; ``cmask`` the valid
    channels) and its groups' statistics, as the normalize and backward kernels use them."""
    n = tl.program_id(0)
    off_n = n.to(tl.int64) * HW * C
    pp = tl.arange(0, BLOCK_P)[:, None, None]
    g0 = tl.program_id(2) * BLOCK_G
    g = g0 + tl.arange(0, BLOCK_G)[None, :, None]
    c = tl.arange(0, BLOCK_C)[None, None, :]
    cmask = (g < G) & (c < CG)
    mean = tl.load(MEAN + n * G + g, mask=g < G, other=0.0)
    rstd = tl.load(RSTD + n * G + g, mask=g < G, other=0.0)
    return n, off_n, pp, g0, g, c, cmask, mean, rstd


@triton.jit
def _gn_affine(W, B, g, c, cmask, CG: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
               BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """The tile's affine weight and bias in fp32 (1 and 0 where there are none)."""
    w = tl.full([1, BLOCK_G, BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + g * CG + c, mask=cmask, other=0.0).to(tl.float32)
    b = tl.zeros([1, BLOCK_G, BLOCK_C], dtype=tl.float32)
    if HAS_B:
        b = tl.load(B + g * CG + c, mask=cmask, other=0.0).to(tl.float32)
    return w, b


@triton.jit
def _gn_bwd_tile(X, DY, off, m, mean, rstd, w, b, SILU: tl.constexpr):
    """xhat and dz (the gradient before the affine weight) of one tile of the backward."""
    x = tl.load(X + off, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + off, mask=m, other=0.0).to(tl.float32)
    xhat = (x - mean) * rstd
    if SILU:
        z = xhat * w + b
        s = 1.0 / (1.0 + tl.exp(-z))
        dy = dy * s * (1.0 + z * (1.0 - s))
    return xhat, dy


@triton.jit
def _gn_bwd_reduce_kernel(X, DY, W, B, MEAN, RSTD, PS1, PS2, PDW, PDB, HW, tiles_per_chunk,
                          C: tl.constexpr, G: tl.constexpr, CG: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          SILU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr,
                          BLOCK_C: tl.constexpr):
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    n, off_n, pp, g0, g, c, cmask, mean, rstd = _gn_tile_stats(MEAN, RSTD, HW, C, G, CG, BLOCK_P, BLOCK_G, BLOCK_C)
    w, b = _gn_affine(W, B, g, c, cmask, CG, HAS_W, HAS_B, BLOCK_G, BLOCK_C)
    # Per-lane sums in registers; reduced over the pixels once, after the loop.
    lane_s1 = tl.zeros([BLOCK_P, BLOCK_G, BLOCK_C], dtype=tl.float32)
    lane_s2 = tl.zeros([BLOCK_P, BLOCK_G, BLOCK_C], dtype=tl.float32)
    chunk_p0 = chunk * tiles_per_chunk * BLOCK_P
    for i in range(0, tiles_per_chunk):
        p = chunk_p0 + i * BLOCK_P + pp
        m = cmask & (p < HW)
        off = off_n + _offsets(p, g, c, HW, C, CG, CHANNELS_LAST)
        xhat, dz = _gn_bwd_tile(X, DY, off, m, mean, rstd, w, b, SILU)
        # dz is 0 on masked lanes (dy loaded as 0), so the products below are clean.
        lane_s1 += dz
        lane_s2 += dz * xhat
    s1 = tl.sum(lane_s1, axis=0)  # per channel sum(dz)        -> dbias
    s2 = tl.sum(lane_s2, axis=0)  # per channel sum(dz * xhat) -> dweight
    # Per-group sums of dxhat = dz*w follow from the per-channel sums (w is per channel).
    w2 = tl.sum(w, axis=0)
    gs1 = tl.sum(s1 * w2, axis=1)
    gs2 = tl.sum(s2 * w2, axis=1)
    gg = g0 + tl.arange(0, BLOCK_G)
    prow = n * n_chunks + chunk
    tl.store(PS1 + prow * G + gg, gs1, mask=gg < G)
    tl.store(PS2 + prow * G + gg, gs2, mask=gg < G)
    g2 = g0 + tl.arange(0, BLOCK_G)[:, None]
    c2 = tl.arange(0, BLOCK_C)[None, :]
    m2 = (g2 < G) & (c2 < CG)
    tl.store(PDB + prow * C + g2 * CG + c2, s1, mask=m2)
    tl.store(PDW + prow * C + g2 * CG + c2, s2, mask=m2)


@triton.jit
def _gn_bwd_dx_kernel(X, DY, W, B, MEAN, RSTD, PS1, PS2, DX, HW, tiles_per_chunk, n_chunks, C: tl.constexpr,
                      G: tl.constexpr, CG: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    chunk = tl.program_id(1)
    n, off_n, pp, g0, g, c, cmask, mean, rstd = _gn_tile_stats(MEAN, RSTD, HW, C, G, CG, BLOCK_P, BLOCK_G, BLOCK_C)
    w, b = _gn_affine(W, B, g, c, cmask, CG, HAS_W, HAS_B, BLOCK_G, BLOCK_C)
    # c1, c2: the group means of dxhat and dxhat * xhat, from the reduce kernel's chunk
    # partials (each program sums them in the same order: deterministic, no extra launch).
    k = tl.arange(0, BLOCK_K)[:, None]
    gk = g0 + tl.arange(0, BLOCK_G)[None, :]
    acc1 = tl.zeros([BLOCK_K, BLOCK_G], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_K, BLOCK_G], dtype=tl.float32)
    for k0 in range(0, n_chunks, BLOCK_K):
        kk = k0 + k
        mk = (kk < n_chunks) & (gk < G)
        acc1 += tl.load(PS1 + (n * n_chunks + kk) * G + gk, mask=mk, other=0.0)
        acc2 += tl.load(PS2 + (n * n_chunks + kk) * G + gk, mask=mk, other=0.0)
    count = HW * CG * 1.0
    c1 = (tl.sum(acc1, axis=0) / count)[None, :, None]
    c2 = (tl.sum(acc2, axis=0) / count)[None, :, None]
    chunk_p0 = chunk * tiles_per_chunk * BLOCK_P
    for i in range(0, tiles_per_chunk):
        p = chunk_p0 + i * BLOCK_P + pp
        m = cmask & (p < HW)
        off = off_n + _offsets(p, g, c, HW, C, CG, CHANNELS_LAST)
        xhat, dz = _gn_bwd_tile(X, DY, off, m, mean, rstd, w, b, SILU)
        dx = rstd * (dz * w - c1 - xhat * c2)
        tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=m)


class _Plan:
    """Block sizes and how a sample is split over programs.

    A program covers BLOCK_G groups x a chunk of pixels. NCHW: one group per program, so a
    tile is CG channel rows of BLOCK_P contiguous pixels (long contiguous runs).
    channels_last: all groups per program, so a tile row is all C contiguous channels of
    one pixel. Chunks are sized so that the grid has a few programs per SM.
    """

    def __init__(self, x, num_groups, channels_last):
        N, C, H, W = x.shape
        self.N, self.C, self.G, self.CG, self.HW = N, C, num_groups, C // num_groups, H * W
        self.block_c = next_pow2(self.CG)
        self.block_g = next_pow2(self.G) if channels_last else 1
        self.n_gblocks = cdiv(self.G, self.block_g)
        self.block_p = max(1, min(next_pow2(self.HW), TILE_ELEMS // (self.block_g * self.block_c)))
        n_tiles = cdiv(self.HW, self.block_p)
        chunks_wanted = max(1, cdiv(target_programs(x.device), N * self.n_gblocks))
        self.tiles_per_chunk = cdiv(n_tiles, min(n_tiles, chunks_wanted))
        self.n_chunks = cdiv(n_tiles, self.tiles_per_chunk)
        self.chunk_pixels = self.tiles_per_chunk * self.block_p
        self.grid = (N, self.n_chunks, self.n_gblocks)
        self.channels_last = channels_last
        self.warps = 4 if self.block_p * self.block_g * self.block_c <= 2048 else 8

    def meta(self):
        return dict(C=self.C, G=self.G, CG=self.CG, CHANNELS_LAST=self.channels_last, BLOCK_P=self.block_p,
                    BLOCK_G=self.block_g, BLOCK_C=self.block_c, num_warps=self.warps)


def group_norm_stats(x, num_groups, eps, channels_last, plan=None):
    """mean, rstd: fp32 [N, G] of a contiguous (in its format) [N, C, H, W] tensor."""
    plan = plan or _Plan(x, num_groups, channels_last)
    dev = x.device
    pmean = alloc((plan.N, plan.n_chunks, plan.G), torch.float32, dev)
    pm2 = alloc((plan.N, plan.n_chunks, plan.G), torch.float32, dev)
    _gn_stats_kernel[plan.grid](x, pmean, pm2, plan.HW, plan.tiles_per_chunk, **plan.meta())
    mean = alloc((plan.N, plan.G), torch.float32, dev)
    rstd = alloc((plan.N, plan.G), torch.float32, dev)
    block_k = min(64, next_pow2(plan.n_chunks))
    _gn_finalize_kernel[(plan.N,)](pmean, pm2, mean, rstd, plan.HW, plan.n_chunks, plan.chunk_pixels,
                                   float(eps), G=plan.G, CG=plan.CG, BLOCK_K=block_k,
                                   BLOCK_G=next_pow2(plan.G), num_warps=4)
    return mean, rstd


def group_norm_fwd(x, num_groups, weight, bias, eps, silu, channels_last):
    """Returns (y, mean [N, G] fp32, rstd [N, G] fp32); y has x's dtype and memory format."""
    plan = _Plan(x, num_groups, channels_last)
    mean, rstd = group_norm_stats(x, num_groups, eps, channels_last, plan)
    y = alloc_like(x)
    _gn_norm_kernel[plan.grid](x, weight if weight is not None else x, bias if bias is not None else x, mean,
                               rstd, y, plan.HW, plan.tiles_per_chunk, HAS_W=weight is not None,
                               HAS_B=bias is not None, SILU=silu, **plan.meta())
    return y, mean, rstd


def group_norm_bwd(x, dy, num_groups, weight, bias, mean, rstd, silu, channels_last, need_dx=True):
    """dy must have x's memory format. Returns (dx or None, dweight fp32 [C], dbias fp32 [C])."""
    plan = _Plan(x, num_groups, channels_last)
    dev = x.device
    rows = plan.N * plan.n_chunks
    ps1 = alloc((plan.N, plan.n_chunks, plan.G), torch.float32, dev)
    ps2 = alloc((plan.N, plan.n_chunks, plan.G), torch.float32, dev)
    pdw = alloc((rows, plan.C), torch.float32, dev)
    pdb = alloc((rows, plan.C), torch.float32, dev)
    w_arg = weight if weight is not None else x
    b_arg = bias if bias is not None else x
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu)
    _gn_bwd_reduce_kernel[plan.grid](x, dy, w_arg, b_arg, mean, rstd, ps1, ps2, pdw, pdb, plan.HW,
                                     plan.tiles_per_chunk, **flags, **plan.meta())
    dx = None
    if need_dx:
        dx = alloc_like(x)
        _gn_bwd_dx_kernel[plan.grid](x, dy, w_arg, b_arg, mean, rstd, ps1, ps2, dx, plan.HW,
                                     plan.tiles_per_chunk, plan.n_chunks, **flags, **plan.meta(),
                                     BLOCK_K=min(64, next_pow2(plan.n_chunks)))
    return dx, pdw.sum(0), pdb.sum(0)
