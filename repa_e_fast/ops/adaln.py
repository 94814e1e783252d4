"""adaLN modulation: ``y = LayerNorm(x) * (1 + scale) + shift`` (SiT/DiT ``modulate(norm(x))``)."""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import (check_modulation, check_same_device, check_tensor, kernel_op, kernels, promote,
                        rows_unit_stride, use_triton)
from .gated_residual import gated_residual_bwd

OP = "adaln_modulate"
_F32 = torch.float32


@kernel_op("adaln_fwd")
def adaln_fwd(x: Tensor, shift: Tensor, scale: Tensor, eps: float, out_dtype: torch.dtype
              ) -> Tuple[Tensor, Tensor, Tensor]:
    return kernels("adaln").adaln_fwd(x, shift, scale, eps, out_dtype)


@adaln_fwd.register_fake
def _(x, shift, scale, eps, out_dtype):
    B, T, D = x.shape
    return x.new_empty((B, T, D), dtype=out_dtype), x.new_empty((B * T,), dtype=_F32), \
        x.new_empty((B * T,), dtype=_F32)


@kernel_op("adaln_bwd")
def adaln_bwd(x: Tensor, scale: Tensor, dy: Tensor, mean: Tensor, rstd: Tensor, dx_dtype: torch.dtype
              ) -> Tuple[Tensor, Tensor, Tensor]:
    return kernels("adaln").adaln_bwd(x, scale, dy, mean, rstd, dx_dtype)


@adaln_bwd.register_fake
def _(x, scale, dy, mean, rstd, dx_dtype):
    per_sample = (x.shape[0], x.shape[2])
    return x.new_empty(x.shape, dtype=dx_dtype), x.new_empty(per_sample, dtype=_F32), \
        x.new_empty(per_sample, dtype=_F32)


@kernel_op("gated_residual_adaln_fwd")
def gated_residual_adaln_fwd(x: Tensor, gate: Tensor, y: Tensor, shift: Tensor, scale: Tensor, eps: float,
                             out_dtype: torch.dtype, y2_dtype: torch.dtype
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return kernels("adaln").gated_residual_adaln_fwd(x, gate, y, shift, scale, eps, out_dtype, y2_dtype)


@gated_residual_adaln_fwd.register_fake
def _(x, gate, y, shift, scale, eps, out_dtype, y2_dtype):
    B, T, D = x.shape
    return (x.new_empty((B, T, D), dtype=out_dtype), x.new_empty((B, T, D), dtype=y2_dtype),
            x.new_empty((B * T,), dtype=_F32), x.new_empty((B * T,), dtype=_F32))


@kernel_op("gated_residual_adaln_bwd")
def gated_residual_adaln_bwd(out: Tensor, y: Tensor, gate: Tensor, scale: Tensor, dout: Optional[Tensor],
                             dy2: Tensor, mean: Tensor, rstd: Tensor, dx_dtype: torch.dtype, dy_dtype: torch.dtype
                             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return kernels("adaln").gated_residual_adaln_bwd(out, y, gate, scale, dout, dy2, mean, rstd, dx_dtype,
                                                     dy_dtype)


@gated_residual_adaln_bwd.register_fake
def _(out, y, gate, scale, dout, dy2, mean, rstd, dx_dtype, dy_dtype):
    per_sample = (out.shape[0], out.shape[2])
    return (out.new_empty(out.shape, dtype=dx_dtype), out.new_empty(out.shape, dtype=dy_dtype),
            out.new_empty(per_sample, dtype=_F32), out.new_empty(per_sample, dtype=_F32),
            out.new_empty(per_sample, dtype=_F32))


def adaln_modulate_reference(x, shift, scale, eps=1e-6):
    """PyTorch definition: ``F.layer_norm(x, (D,), eps=eps) * (1 + scale[:, None]) + shift[:, None]``."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _AdaLNModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        y, mean, rstd = adaln_fwd(x, shift, scale, eps, promote(x, shift, scale))
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = adaln_bwd(x, scale, dy.contiguous(), mean, rstd, x.dtype)
        return dx, dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


def adaln_modulate(x, shift, scale, eps=1e-6):
    """Parameter-free LayerNorm over the last dim, then per-sample modulation.

    Args:
        x: ``[B, T, D]`` float32 / bfloat16 / float16 (float64 runs the reference).
        shift, scale: ``[B, D]`` (or ``[B, 1, D]``), broadcast over the T tokens; ``[D]``
            or ``[1, D]`` is shared by every sample. Views
            with a row stride (``chunk(6, dim=1)`` of the adaLN projection) are read in
            place; other non-unit-stride inputs are copied.
        eps: LayerNorm epsilon (SiT uses 1e-6).

    Returns:
        ``[B, T, D]`` in the promoted dtype of the inputs (PyTorch type promotion).
        Mean and variance are computed in fp32. A non-contiguous ``x`` is copied.
    Gradients flow to x, shift and scale (shift/scale gradients reduced over T in-kernel).
    """
    check_tensor(OP, "x", x, ndim=3)
    B, T, D = x.shape
    shift = check_modulation(OP, "shift", shift, B, D)
    scale = check_modulation(OP, "scale", scale, B, D)
    check_same_device(OP, x=x, shift=shift, scale=scale)
    if not use_triton(OP, x, shift, scale) or x.numel() == 0:
        return adaln_modulate_reference(x, shift, scale, eps)
    return _AdaLNModulate.apply(x.contiguous(), rows_unit_stride(shift), rows_unit_stride(scale), float(eps))


# ----------------------------------------------------------------- fused residual + adaLN


def gated_residual_adaln_modulate_reference(x, gate, y, shift, scale, eps=1e-6):
    out = x + gate.unsqueeze(1) * y
    return out, adaln_modulate_reference(out, shift, scale, eps)


class _GatedResidualAdaLN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y, shift, scale, eps):
        out_dtype = promote(x, gate, y)
        y2_dtype = torch.promote_types(out_dtype, promote(shift, scale))
        out, y2, mean, rstd = gated_residual_adaln_fwd(x, gate, y, shift, scale, eps, out_dtype, y2_dtype)
        ctx.save_for_backward(out, y, gate, scale, mean, rstd)
        ctx.dtypes = (x.dtype, gate.dtype, shift.dtype)
        ctx.set_materialize_grads(False)
        return out, y2

    @staticmethod
    def backward(ctx, dout, dy2):
        out, y, gate, scale, mean, rstd = ctx.saved_tensors
        x_dtype, gate_dtype, shift_dtype = ctx.dtypes
        if dout is None and dy2 is None:
            return (None,) * 6
        if dy2 is None:  # only the residual output was used: a plain gated-residual backward
            dout = dout.contiguous()
            dy, dgate = gated_residual_bwd(dout, y, gate, y.dtype)
            return dout.to(x_dtype), dgate.to(gate_dtype), dy, None, None, None
        dx, dy, dgate, dshift, dscale = gated_residual_adaln_bwd(
            out, y, gate, scale, None if dout is None else dout.contiguous(), dy2.contiguous(), mean, rstd,
            x_dtype, y.dtype)
        return dx, dgate.to(gate_dtype), dy, dshift.to(shift_dtype), dscale.to(scale.dtype), None


def gated_residual_adaln_modulate(x, gate, y, shift, scale, eps=1e-6):
    """``out = x + gate * y`` and ``y2 = LayerNorm(out) * (1 + scale) + shift`` in one pass.

    This is the boundary between two SiT sub-blocks: the gated residual of the attention
    (or MLP) branch, immediately followed by the modulated LayerNorm feeding the next one.
    The residual stream is read once.

    Args:
        x, y: ``[B, T, D]`` (residual stream and branch output).
        gate, shift, scale: ``[B, D]`` (or ``[B, 1, D]``; ``[D]`` / ``[1, D]`` shared by
            the batch), broadcast over T.
        eps: LayerNorm epsilon.

    Returns:
        ``(out, y2)``, both ``[B, T, D]``; ``out`` in ``promote(x, gate, y)``, ``y2`` in
        the promotion of that with shift/scale. LayerNorm is applied to ``out`` as stored
        (rounded to its dtype), exactly like the unfused pair.
    """
    op = "gated_residual_adaln_modulate"
    check_tensor(op, "x", x, ndim=3)
    check_tensor(op, "y", y, ndim=3)
    B, T, D = x.shape
    if y.shape != x.shape:
        raise ValueError(f"{op}: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    gate = check_modulation(op, "gate", gate, B, D)
    shift = check_modulation(op, "shift", shift, B, D)
    scale = check_modulation(op, "scale", scale, B, D)
    check_same_device(op, x=x, gate=gate, y=y, shift=shift, scale=scale)
    if not use_triton(op, x, gate, y, shift, scale) or x.numel() == 0:
        return gated_residual_adaln_modulate_reference(x, gate, y, shift, scale, eps)
    return _GatedResidualAdaLN.apply(x.contiguous(), rows_unit_stride(gate), y.contiguous(),
                                     rows_unit_stride(shift), rows_unit_stride(scale), float(eps))
