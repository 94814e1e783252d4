"""Gated residual: ``out = x + gate * y`` with a per-sample gate (adaLN-Zero)."""

import torch

from ._dispatch import check_same_device, check_tensor, promote, rows_unit_stride, use_triton
from ._library import launcher
from .adaln import _check_mod

OP = "gated_residual"


def gated_residual_reference(x, gate, y):
    """PyTorch definition: ``x + gate[:, None] * y``."""
    return x + gate.unsqueeze(1) * y


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        out = launcher("gated_residual", "gated_residual_fwd")(x, gate, y, promote(x, gate, y))
        ctx.save_for_backward(gate, y)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        gate, y = ctx.saved_tensors
        dout = dout.contiguous()
        dy, dgate = launcher("gated_residual", "gated_residual_bwd")(dout, y, gate, y.dtype)
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
    gate = _check_mod(OP, "gate", gate, B, D)
    check_same_device(OP, x=x, gate=gate, y=y)
    if not use_triton(OP, x, gate, y) or x.numel() == 0:
        return gated_residual_reference(x, gate, y)
    return _GatedResidual.apply(x.contiguous(), rows_unit_stride(gate), y.contiguous())
