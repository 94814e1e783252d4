"""GroupNorm (+ optional fused SiLU) for NCHW and channels_last tensors."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._dispatch import check_same_device, check_tensor, kernels, use_triton
from ._library import launcher

OP = "group_norm"
ACTIVATIONS = (None, "silu")


def _memory_format(x):
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-6, activation=None):
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
        y, mean, rstd = launcher("group_norm", "group_norm_fwd")(x, num_groups, weight, bias, eps, silu,
                                                                 channels_last)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.cfg = (num_groups, silu, channels_last)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        num_groups, silu, channels_last = ctx.cfg
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        dy = dy.contiguous(memory_format=fmt)  # the kernels read dy with x's layout
        if torch.compiler.is_compiling():  # the custom op always returns dx
            dx, dw, db = torch.ops.repa_e_fast.group_norm_bwd(x, dy, num_groups, weight, bias, mean, rstd, silu,
                                                              channels_last)
        else:
            dx, dw, db = kernels("group_norm").group_norm_bwd(
                x, dy, num_groups, weight, bias, mean, rstd, silu, channels_last, need_dx=ctx.needs_input_grad[0])
        dw = dw.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = db.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-6, activation=None):
    """GroupNorm over ``[N, C, H, W]`` with an optional fused SiLU.

    Args:
        x: ``[N, C, H, W]`` float32 / bfloat16 / float16 (float64 runs the reference),
            NCHW-contiguous or channels_last. Other strides are copied to NCHW first.
        num_groups: number of groups; must divide C.
        weight, bias: optional ``[C]`` affine parameters (any float dtype; their
            gradients come back in their own dtype).
        eps: variance epsilon (the VAE uses 1e-6; nn.GroupNorm's default is 1e-5).
        activation: ``None`` or ``"silu"`` (``y = z * sigmoid(z)`` applied after the
            affine, fused into the same kernel and its backward).

    Returns:
        ``[N, C, H, W]`` in x's dtype and memory format. Mean and variance are fp32
        (tile-wise two-pass, merged with Chan's formula: no sum-of-squares cancellation).
        Unlike ``nn.GroupNorm`` under autocast, fp16/bf16 inputs are not upcast: output
        stays in the input dtype.
    """
    check_tensor(OP, "x", x, ndim=4)
    N, C, H, W = x.shape
    if not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups:
        raise ValueError(f"{OP}: num_groups={num_groups!r} must be a positive int dividing C={C}")
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
    if C * H * W >= 2**31:
        raise ValueError(f"{OP}: one sample has {C * H * W} elements; the kernels index a sample with int32")
    fmt = _memory_format(x)
    if fmt is None:
        x = x.contiguous()  # documented copy for arbitrary strides
        fmt = torch.contiguous_format
    # A tensor contiguous in both formats (C == 1 or H == W == 1) is read as NCHW.
    channels_last = fmt == torch.channels_last
    w = None if weight is None else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    return _GroupNorm.apply(x, w, b, num_groups, float(eps), activation == "silu", channels_last)


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

    def forward(self, x):
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.activation)

    def extra_repr(self):
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


def _fused_from(gn, activation):
    new = FusedGroupNorm(gn.num_groups, gn.num_channels, eps=gn.eps, affine=gn.affine, activation=activation,
                         device=gn.weight.device if gn.affine else None)
    if gn.affine:
        # Reuse the Parameter objects: values, dtype, device and any optimizer state stay.
        new.weight, new.bias = gn.weight, gn.bias
    new.train(gn.training)
    return new


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
        return _fused_from(module, None)
    if isinstance(module, nn.Sequential) and fuse_silu:
        names = list(module._modules.keys())
        for a, b in zip(names, names[1:]):
            gn, act = module._modules[a], module._modules[b]
            if isinstance(gn, nn.GroupNorm) and isinstance(act, nn.SiLU) and getattr(gn, "activation", None) is None:
                module._modules[a] = _fused_from(gn, "silu")
                module._modules[b] = nn.Identity()
    for name, child in module._modules.items():
        if child is not None:
            module._modules[name] = replace_group_norms(child, fuse_silu)
    return module
