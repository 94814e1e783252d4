"""Gated residual: ``out = x + gate * y`` with a per-sample gate (adaLN-Zero)."""

from typing import Tuple

import torch
from torch import Tensor

from ._dispatch import (check_modulation, check_same_device, check_tensor, kernel_op, kernels, promote,
                        rows_unit_stride, use_triton)

OP = "gated_residual"
_F32 = torch.float32


@kernel_op("gated_residual_fwd")
def gated_residual_fwd(x: Tensor, gate: Tensor, y: Tensor, out_dtype: torch.dtype) -> Tensor:
    return kernels("gated_residual").gated_residual_fwd(x, gate, y, out_dtype)


@gated_residual_fwd.register_fake
def _(x, gate, y, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@kernel_op("gated_residual_bwd")
def gated_residual_bwd(dout: Tensor, y: Tensor, gate: Tensor, dy_dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(dy, dgate fp32 [B, D]); also the backward of the fused op in ``adaln`` when only its
    residual output is used."""
    return kernels("gated_residual").gated_residual_bwd(dout, y, gate, dy_dtype)


@gated_residual_bwd.register_fake
def _(dout, y, gate, dy_dtype):
    return y.new_empty(y.shape, dtype=dy_dtype), y.new_empty((y.shape[0], y.shape[2]), dtype=_F32)


def gated_residual_reference(x, gate, y):
    """PyTorch definition: ``x + gate[:, None] * y``."""
    return x + gate.unsqueeze(1) * y


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        out = gated_residual_fwd(x, gate, y, promote(x, gate, y))
        ctx.save_for_backward(gate, y)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, y = ctx.saved_tensors
        dout = dout.contiguous()
        dy, dgate = gated_residual_bwd(dout, y, gate, y.dtype)
        # d out / d x is the identity: the incoming gradient is passed through.
        return dout.to(ctx.x_dtype), dgate.to(gate.dtype), dy


def gated_residual(x, gate, y):
    """``out = x + gate[:, None, :] * y``.

    Args:
        x, y: ``[B, T, D]`` float32 / bfloat16 / float16 (float64 runs the reference).
        gate: ``[B, D]`` (or ``[B, 1, D]``; ``[D]`` / ``[1, D]`` shared by the batch); a
            ``chunk`` view is read in place.
    Returns:
        ``[B, T, D]`` in ``promote(x, gate, y)``; arithmetic in fp32. Non-contiguous x/y
        are copied. Gradients: ``dx = dout``, ``dy = dout*gate``, ``dgate = sum_T dout*y``
        (reduced over T in-kernel, fp32).
    """
    check_tensor(OP, "x", x, ndim=3)
    check_tensor(OP, "y", y, ndim=3)
    if y.shape != x.shape:
        raise ValueError(f"{OP}: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    B, T, D = x.shape
    gate = check_modulation(OP, "gate", gate, B, D)
    check_same_device(OP, x=x, gate=gate, y=y)
    if not use_triton(OP, x, gate, y) or x.numel() == 0:
        return gated_residual_reference(x, gate, y)
    return _GatedResidual.apply(x.contiguous(), rows_unit_stride(gate), y.contiguous())
