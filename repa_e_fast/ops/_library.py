"""The Triton kernel launchers as ``torch.library`` custom ops, for ``torch.compile``.

Dynamo cannot trace a Triton launcher (it imports modules, computes grids in Python and
reads tensor strides for the launch), so inside a compiled region every fused op used to
be a graph break. Registered as custom ops (``torch.ops.repa_e_fast.*``) with fake
implementations that give the output shapes, dtypes and layouts, the kernels become opaque
nodes of one graph: the surrounding ops are still fused by inductor, and the whole region
can be captured in a CUDA graph. The autograd.Functions in this package call these ops
only while compiling; eager calls go to the launchers directly, which is the cheaper path
(a custom-op dispatch costs a few microseconds per call).

Registering imports no Triton: each op imports its kernel module when it first runs.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._dispatch import kernels

_F32 = torch.float32


def launcher(module: str, name: str):
    """The kernel launcher ``kernels.<module>.<name>``, or its custom op while torch.compile
    traces (the two take the same arguments and return the same tensors)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.repa_e_fast, name)
    return getattr(kernels(module), name)


def _rows_partial_sum_shape(x: Tensor) -> Tuple[int, int]:
    return x.shape[0], x.shape[2]


# --------------------------------------------------------------------------- adaLN
@torch.library.custom_op("repa_e_fast::adaln_fwd", mutates_args=())
def adaln_fwd(x: Tensor, shift: Tensor, scale: Tensor, eps: float, out_dtype: torch.dtype
              ) -> Tuple[Tensor, Tensor, Tensor]:
    return kernels("adaln").adaln_fwd(x, shift, scale, eps, out_dtype)


@adaln_fwd.register_fake
def _(x, shift, scale, eps, out_dtype):
    B, T, D = x.shape
    return x.new_empty((B, T, D), dtype=out_dtype), x.new_empty((B * T,), dtype=_F32), \
        x.new_empty((B * T,), dtype=_F32)


@torch.library.custom_op("repa_e_fast::adaln_bwd", mutates_args=())
def adaln_bwd(x: Tensor, scale: Tensor, dy: Tensor, mean: Tensor, rstd: Tensor, dx_dtype: torch.dtype
              ) -> Tuple[Tensor, Tensor, Tensor]:
    return kernels("adaln").adaln_bwd(x, scale, dy, mean, rstd, dx_dtype)


@adaln_bwd.register_fake
def _(x, scale, dy, mean, rstd, dx_dtype):
    return x.new_empty(x.shape, dtype=dx_dtype), x.new_empty(_rows_partial_sum_shape(x), dtype=_F32), \
        x.new_empty(_rows_partial_sum_shape(x), dtype=_F32)


# --------------------------------------------------------------------------- gated residual
@torch.library.custom_op("repa_e_fast::gated_residual_fwd", mutates_args=())
def gated_residual_fwd(x: Tensor, gate: Tensor, y: Tensor, out_dtype: torch.dtype) -> Tensor:
    return kernels("gated_residual").gated_residual_fwd(x, gate, y, out_dtype)


@gated_residual_fwd.register_fake
def _(x, gate, y, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("repa_e_fast::gated_residual_bwd", mutates_args=())
def gated_residual_bwd(dout: Tensor, y: Tensor, gate: Tensor, dy_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    return kernels("gated_residual").gated_residual_bwd(dout, y, gate, dy_dtype)


@gated_residual_bwd.register_fake
def _(dout, y, gate, dy_dtype):
    return y.new_empty(y.shape, dtype=dy_dtype), y.new_empty(_rows_partial_sum_shape(y), dtype=_F32)


# --------------------------------------------------------------------------- gated residual + adaLN
@torch.library.custom_op("repa_e_fast::gated_residual_adaln_fwd", mutates_args=())
def gated_residual_adaln_fwd(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float,
                             out_dtype: torch.dtype, y2_dtype: torch.dtype
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels("adaln").gated_residual_adaln_fwd(x, gate, y, shift, scale, eps, out_dtype, y2_dtype)


@gated_residual_adaln_fwd.register_fake
def _(x, gate, y, shift, scale, eps, out_dtype, y2_dtype):
    B, T, D = x.shape
    return (x.new_empty((B, T, D), dtype=out_dtype), x.new_empty((B, T, D), dtype=y2_dtype),
            x.new_empty((B * T,), dtype=_F32), x.new_empty((B * T,), dtype=_F32))


@torch.library.custom_op("repa_e_fast::gated_residual_adaln_bwd", mutates_args=())
def gated_residual_adaln_bwd(out: Tensor, y: Tensor, gate: Tensor, scale: Tensor, dout: Optional[Tensor],
                             dy2: Tensor, mean: Tensor, rstd: Tensor, dx_dtype: torch.dtype, dy_dtype: torch.dtype
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return kernels("adaln").gated_residual_adaln_bwd(out, y, gate, scale, dout, dy2, mean, rstd, dx_dtype,
                                                     dy_dtype)


@gated_residual_adaln_bwd.register_fake
def _(out, y, gate, scale, dout, dy2, mean, rstd, dx_dtype, dy_dtype):
    vector = _rows_partial_sum_shape(out)
    return (out.new_empty(out.shape, dtype=dx_dtype), out.new_empty(out.shape, dtype=dy_dtype),
            out.new_empty(vector, dtype=_F32), out.new_empty(vector, dtype=_F32), out.new_empty(vector, dtype=_F32))


# --------------------------------------------------------------------------- GroupNorm
@torch.library.custom_op("repa_e_fast::group_norm_fwd", mutates_args=())
def group_norm_fwd(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   silu: bool, channels_last: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return kernels("group_norm").group_norm_fwd(x, num_groups, weight, bias, eps, silu, channels_last)


@group_norm_fwd.register_fake
def _(x, num_groups, weight, bias, eps, silu, channels_last):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    stats = (x.shape[0], num_groups)
    return (torch.empty_like(x, memory_format=layout), x.new_empty(stats, dtype=_F32),
            x.new_empty(stats, dtype=_F32))


@torch.library.custom_op("repa_e_fast::group_norm_bwd", mutates_args=())
def group_norm_bwd(x: Tensor, dy: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, silu: bool, channels_last: bool) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = kernels("group_norm").group_norm_bwd(x, dy, num_groups, weight, bias, mean, rstd, silu,
                                                              channels_last, need_dx=True)
    return dx, dweight, dbias


@group_norm_bwd.register_fake
def _(x, dy, num_groups, weight, bias, mean, rstd, silu, channels_last):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    channels = (x.shape[1],)
    return (torch.empty_like(x, memory_format=layout), x.new_empty(channels, dtype=_F32),
            x.new_empty(channels, dtype=_F32))


# --------------------------------------------------------------------------- REPA loss
def repa_loss_sum(zs, zts, weights, eps):
    """The loss: per encoder, per-program partial sums of weight * cos, then one
    fixed-order sum (deterministic, no atomics)."""
    k = kernels("repa_loss")
    counts = [k.repa_num_partials(z.shape[0] * z.shape[1], z.shape[2]) for z in zs]
    part = k.new_partials(sum(counts), zs[0].device)
    offset = 0
    for z, zt, weight, count in zip(zs, zts, weights, counts):
        d = z.shape[2]
        k.repa_fwd_partials(z.reshape(-1, d), zt.reshape(-1, d), weight, eps, part[offset:offset + count])
        offset += count
    return part.sum()


@torch.library.custom_op("repa_e_fast::repa_loss_fwd", mutates_args=())
def repa_loss_fwd(zs: List[Tensor], zts: List[Tensor], weights: List[float], eps: float) -> Tensor:
    return repa_loss_sum(zs, zts, weights, eps)


@repa_loss_fwd.register_fake
def _(zs, zts, weights, eps):
    return zs[0].new_empty((), dtype=_F32)


def repa_loss_grads(z, zt, grad, weight, eps, need_dz, need_dzt):
    """(dz, dzt) of one encoder's pair; a gradient that is not needed comes back empty."""
    d = z.shape[2]
    dz, dzt = kernels("repa_loss").repa_bwd(z.reshape(-1, d), zt.reshape(-1, d), grad, weight, eps, need_dz,
                                            need_dzt)
    return (dz.view(z.shape) if need_dz else z.new_empty(0)), (dzt.view(zt.shape) if need_dzt else zt.new_empty(0))


@torch.library.custom_op("repa_e_fast::repa_loss_bwd", mutates_args=())
def repa_loss_bwd(z: Tensor, zt: Tensor, grad: Tensor, weight: float, eps: float, need_dz: bool, need_dzt: bool
                  ) -> Tuple[Tensor, Tensor]:
    return repa_loss_grads(z, zt, grad, weight, eps, need_dz, need_dzt)


@repa_loss_bwd.register_fake
def _(z, zt, grad, weight, eps, need_dz, need_dzt):
    return (z.new_empty(z.shape) if need_dz else z.new_empty(0)), (zt.new_empty(zt.shape) if need_dzt else zt.new_empty(0))
