"""GroupNorm (+ optional fused SiLU) for ``[N, C, *]`` tensors, NCHW or channels_last."""

import operator
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import check_same_device, check_tensor, kernel_op, kernels, use_triton

OP = "group_norm"
ACTIVATIONS = (None, "silu")
_F32 = torch.float32


@kernel_op("group_norm_fwd")
def group_norm_fwd(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   silu: bool, channels_last: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return kernels("group_norm").group_norm_fwd(x, num_groups, weight, bias, eps, silu, channels_last)


@group_norm_fwd.register_fake
def _(x, num_groups, weight, bias, eps, silu, channels_last):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    stats = (x.shape[0], num_groups)
    return (torch.empty_like(x, memory_format=layout), x.new_empty(stats, dtype=_F32),
            x.new_empty(stats, dtype=_F32))


@kernel_op("group_norm_bwd")
def group_norm_bwd(x: Tensor, dy: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, silu: bool, channels_last: bool, need_dx: bool
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight fp32 [C], dbias fp32 [C]); dx is empty unless ``need_dx``."""
    dx, dweight, dbias = kernels("group_norm").group_norm_bwd(x, dy, num_groups, weight, bias, mean, rstd, silu,
                                                              channels_last, need_dx)
    return (dx if need_dx else x.new_empty(0)), dweight, dbias


@group_norm_bwd.register_fake
def _(x, dy, num_groups, weight, bias, mean, rstd, silu, channels_last, need_dx):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    channels = (x.shape[1],)
    return (torch.empty_like(x, memory_format=layout) if need_dx else x.new_empty(0),
            x.new_empty(channels, dtype=_F32), x.new_empty(channels, dtype=_F32))


def _memory_format(x):
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _as_4d(x):
    """``x`` of shape ``[N, C, *spatial]`` as a 4-D ``[N, C, S, 1]`` view the kernels read
    (S = product of the spatial sizes), and a function that views a ``[N, C, S, 1]`` result
    back as ``[N, C, *spatial]``.

    Channels-first memory (``x.contiguous()``) becomes NCHW; channels-minor memory
    (channels_last / channels_last_3d, or diffusers' attention ``[B, C, H*W]`` taken from a
    channels_last image) becomes channels_last, so neither is copied. Other strides are
    copied to channels-first.
    """
    if x.dim() == 4:
        return x, lambda y: y
    N, C, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
    S = 1
    for size in spatial:
        S *= size
    channels_minor = x.movedim(1, -1)
    if not x.is_contiguous() and channels_minor.is_contiguous():
        x4 = channels_minor.reshape(N, S, 1, C).permute(0, 3, 1, 2)
        return x4, lambda y: y.permute(0, 2, 3, 1).reshape(N, *spatial, C).movedim(-1, 1)
    return x.reshape(N, C, S, 1), lambda y: y.reshape(N, C, *spatial)


def _groups(num_groups, C):
    """``num_groups`` as a Python int (integer-like values such as ``np.int64`` accepted)."""
    try:
        if isinstance(num_groups, bool):
            raise TypeError
        groups = operator.index(num_groups)
    except TypeError:
        groups = None
    if groups is None or groups <= 0 or C % groups:
        raise ValueError(f"{OP}: num_groups={num_groups!r} must be a positive integer dividing C={C}")
    return groups


def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None):
    """PyTorch definition: ``F.group_norm`` then optional ``F.silu``.

    fp16/bf16 inputs are computed in fp32 and cast back (statistics in fp32, as in the
    kernels); the output keeps the input's memory format.
    """
    fmt = _memory_format(x) or torch.contiguous_format
    low = x.dtype in (torch.float16, torch.bfloat16)
    ct = torch.float32 if low else x.dtype
    w = None if weight is None else weight.to(ct)
    b = None if bias is None else bias.to(ct)
    y = F.group_norm(x.to(ct), num_groups, w, b, eps)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype).contiguous(memory_format=fmt)


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu, channels_last):
        y, mean, rstd = group_norm_fwd(x, num_groups, weight, bias, eps, silu, channels_last)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.cfg = (num_groups, silu, channels_last)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        num_groups, silu, channels_last = ctx.cfg
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        dy = dy.contiguous(memory_format=fmt)  # the kernels read dy with x's layout
        need_dx = ctx.needs_input_grad[0]
        dx, dw, db = group_norm_bwd(x, dy, num_groups, weight, bias, mean, rstd, silu, channels_last, need_dx)
        dx = dx if need_dx else None
        dw = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = db.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None):
    """GroupNorm over ``[N, C, *]`` (any rank ``nn.GroupNorm`` accepts) with an optional
    fused SiLU.

    Args:
        x: ``[N, C, *spatial]`` float32 / bfloat16 / float16 (float64 runs the reference).
            The spatial dims are flattened into one (a view, no copy) when x is
            channels-first contiguous or channels-minor (channels_last, channels_last_3d,
            or a ``[B, C, L]`` transpose of a ``[B, L, C]`` tensor). Other strides are
            copied to channels-first first.
        num_groups: number of groups (an int or integer-like, e.g. ``np.int64``); must divide C.
        weight, bias: optional ``[C]`` affine parameters (any float dtype; their
            gradients come back in their own dtype).
        eps: variance epsilon (default 1e-5 as in ``F.group_norm``; the VAE uses 1e-6).
        activation: ``None`` or ``"silu"`` (``y = z * sigmoid(z)`` applied after the
            affine, fused into the same kernel and its backward).

    Returns:
        x's shape, in x's dtype and memory format (a channels-first or channels-minor
        input keeps its layout). Mean and variance are fp32
        (tile-wise two-pass, merged with Chan's formula: no sum-of-squares cancellation).
        Unlike ``nn.GroupNorm`` under autocast, fp16/bf16 inputs are not upcast: output
        stays in the input dtype.
    """
    check_tensor(OP, "x", x)
    if x.dim() < 2:
        raise ValueError(f"{OP}: x must be [N, C, *], got shape {tuple(x.shape)}")
    C = x.shape[1]
    num_groups = _groups(num_groups, C)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(OP, name, p, ndim=1)
            if p.shape[0] != C:
                raise ValueError(f"{OP}: {name} must have shape ({C},), got {tuple(p.shape)}")
    check_same_device(OP, x=x, weight=weight, bias=bias)
    if not use_triton(OP, *[t for t in (x, weight, bias) if t is not None]) or x.numel() == 0:
        return group_norm_reference(x, num_groups, weight, bias, eps, activation)
    if x.numel() // x.shape[0] >= 2**31:
        raise ValueError(f"{OP}: one sample has {x.numel() // x.shape[0]} elements; the kernels index a "
                         "sample with int32")
    x, restore_shape = _as_4d(x)
    fmt = _memory_format(x)
    if fmt is None:
        x = x.contiguous()  # documented copy for arbitrary strides
        fmt = torch.contiguous_format
    # A tensor contiguous in both formats (C == 1 or H == W == 1) is read as NCHW.
    channels_last = fmt == torch.channels_last
    w = None if weight is None else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    return restore_shape(_GroupNorm.apply(x, w, b, num_groups, float(eps), activation == "silu", channels_last))


class FusedGroupNorm(nn.GroupNorm):
    """Drop-in ``nn.GroupNorm`` running :func:`group_norm`, optionally with a fused SiLU.

    Same constructor arguments, attributes and state dict (``weight``, ``bias``) as
    ``nn.GroupNorm`` (it is a subclass), plus ``activation=None|"silu"``.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, activation=None, device=None,
                 dtype=None):
        if activation not in ACTIVATIONS:
            raise ValueError(f"FusedGroupNorm: activation must be one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.activation = activation

    @classmethod
    def from_module(cls, norm, activation=None):
        """A FusedGroupNorm computing ``norm`` (an ``nn.GroupNorm``), optionally followed by
        ``activation``. It holds the same ``weight``/``bias`` Parameter objects, so state
        dicts, optimizers and parameter counts are unchanged; training mode is copied."""
        if not isinstance(norm, nn.GroupNorm):
            raise TypeError(f"FusedGroupNorm.from_module: expected an nn.GroupNorm, got {type(norm).__name__}")
        # Built without parameters of its own, then given norm's.
        new = cls(int(norm.num_groups), norm.num_channels, eps=norm.eps, affine=False, activation=activation)
        if norm.affine:
            new.affine = True
            new.weight, new.bias = norm.weight, norm.bias
        new.train(norm.training)
        return new

    def forward(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation)

    def extra_repr(self):
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


def replace_group_norms(module, fuse_silu=True):
    """Swap every ``nn.GroupNorm`` in ``module`` for a :class:`FusedGroupNorm` (in place).

    The replacement reuses the original ``weight``/``bias`` Parameters, so state dicts,
    optimizers and parameter counts are unchanged. With ``fuse_silu``, a GroupNorm that
    is directly followed by an ``nn.SiLU`` module inside an ``nn.Sequential`` gets the
    SiLU fused into its kernel and the SiLU is replaced by ``nn.Identity``.

    Only module structure is visible: a SiLU applied functionally in a ``forward``
    (``F.silu(self.norm(x))``, ``x * torch.sigmoid(x)``, or an ``nn.SiLU`` stored as an
    attribute and called separately, as in diffusers' ResnetBlock2D) cannot be detected
    and stays unfused; only the GroupNorm itself is swapped there.

    Returns the module (the replacement itself if ``module`` is an ``nn.GroupNorm``).
    """
    if type(module) is nn.GroupNorm:
        return FusedGroupNorm.from_module(module)
    if isinstance(module, nn.Sequential) and fuse_silu:
        names = list(module._modules.keys())
        for a, b in zip(names, names[1:]):
            gn, act = module._modules[a], module._modules[b]
            if isinstance(gn, nn.GroupNorm) and isinstance(act, nn.SiLU) and getattr(gn, "activation", None) is None:
                module._modules[a] = FusedGroupNorm.from_module(gn, "silu")
                module._modules[b] = nn.Identity()
    for name, child in module._modules.items():
        if child is not None:
            module._modules[name] = replace_group_norms(child, fuse_silu)
    return module
