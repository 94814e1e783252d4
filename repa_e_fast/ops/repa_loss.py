"""REPA projection loss: mean negative cosine similarity, the official reduction."""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import check_same_device, check_tensor, kernel_op, kernels, use_triton

OP = "repa_cosine_loss"
EPS = 1e-12  # F.normalize's default, as in the official code


@kernel_op("repa_loss_fwd")
def repa_loss_fwd(zs: List[Tensor], zts: List[Tensor], weights: List[float], eps: float) -> Tensor:
    return kernels("repa_loss").repa_loss_fwd(zs, zts, weights, eps)


@repa_loss_fwd.register_fake
def _(zs, zts, weights, eps):
    return zs[0].new_empty((), dtype=torch.float32)


@kernel_op("repa_loss_bwd")
def repa_loss_bwd(z: Tensor, zt: Tensor, grad: Tensor, weight: float, eps: float, need_dz: bool, need_dzt: bool
                  ) -> Tuple[Tensor, Tensor]:
    """(dz, dzt) of one encoder's pair; a gradient that is not needed comes back empty."""
    dz, dzt = kernels("repa_loss").repa_loss_bwd(z, zt, grad, weight, eps, need_dz, need_dzt)
    return (dz if need_dz else z.new_empty(0)), (dzt if need_dzt else zt.new_empty(0))


@repa_loss_bwd.register_fake
def _(z, zt, grad, weight, eps, need_dz, need_dzt):
    return (z.new_empty(z.shape) if need_dz else z.new_empty(0),
            zt.new_empty(zt.shape) if need_dzt else zt.new_empty(0))


def _as_list(v, name):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in v):
        return list(v)
    raise TypeError(f"{OP}: {name} must be a tensor or a list/tuple of tensors, got {type(v).__name__}")


def repa_cosine_loss_reference(zs, zs_tilde):
    """The REPA loss in PyTorch: the definition the fused op is tested against and the
    models' path when their fast path is off (accepts what :func:`repa_cosine_loss` accepts).

    ``-(1/(E*B)) * sum_e sum_n mean_t <normalize(zs[e][n,t]), normalize(zs_tilde[e][n,t])>``,
    with F.normalize (eps 1e-12), computed in fp32 for fp16/bf16 inputs (fp16 normalisation
    overflows) and in fp64 for fp64 inputs. Raises ValueError for lists of different lengths
    or none, and for a pair whose shapes differ.
    """
    zs, zs_tilde = _as_list(zs, "zs"), _as_list(zs_tilde, "zs_tilde")
    if len(zs) == 0 or len(zs) != len(zs_tilde):
        raise ValueError(f"{OP}: need one zs_tilde per zs and at least one pair, got {len(zs)} and {len(zs_tilde)}")
    total = 0.0
    for i, (z, zt) in enumerate(zip(zs, zs_tilde)):
        if z.shape != zt.shape:
            raise ValueError(f"{OP}: zs[{i}] {tuple(z.shape)} and zs_tilde[{i}] {tuple(zt.shape)} differ in shape")
        if z.dtype != torch.float64:
            z = z.float()
        if zt.dtype != torch.float64:
            zt = zt.float()
        cos = (F.normalize(z, dim=-1, eps=EPS) * F.normalize(zt, dim=-1, eps=EPS)).sum(dim=-1)
        total = total + (-cos).mean(dim=-1).sum()
    return total / (len(zs) * zs[0].shape[0])


class _RepaLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n_enc, batch, *pairs):
        zs, zts = list(pairs[0::2]), list(pairs[1::2])
        ctx.weights = [-1.0 / (n_enc * batch * z.shape[1]) for z in zs]
        ctx.save_for_backward(*pairs)
        return repa_loss_fwd(zs, zts, ctx.weights, EPS)

    @staticmethod
    def backward(ctx, grad):
        pairs = ctx.saved_tensors
        g = grad.reshape(1).float().contiguous()
        grads = []
        for i, w in enumerate(ctx.weights):
            z, zt = pairs[2 * i], pairs[2 * i + 1]
            need_z, need_zt = ctx.needs_input_grad[2 + 2 * i], ctx.needs_input_grad[3 + 2 * i]
            if not (need_z or need_zt):
                grads += [None, None]
                continue
            dz, dzt = repa_loss_bwd(z, zt, g, w, EPS, need_z, need_zt)
            grads += [dz if need_z else None, dzt if need_zt else None]
        return (None, None, *grads)


def repa_cosine_loss(zs, zs_tilde):
    """REPA alignment loss (docs/numerics.md#projectors-and-the-repa-loss), one fused pass per encoder.

    Args:
        zs: encoder features (targets), a ``[B, T, d_e]`` tensor or a list with one per
            encoder. Usually detached; it gets a gradient if it requires one.
        zs_tilde: projector outputs, same structure and shapes as ``zs``.
            ``d_e`` (and T) may differ between encoders; B must not. float32 / bfloat16 /
            float16 (float64 runs the reference); the two tensors of a pair may differ in
            dtype. Non-contiguous inputs are copied.

    Returns:
        0-dim float32 tensor (float64 for float64 inputs):
        ``-(1/(E*B)) * sum_e sum_n mean_t cos(zs[e][n,t], zs_tilde[e][n,t])``.
        Norms, dots and the sum are fp32; the sum over per-program partials is fixed-order
        (deterministic). No normalised copies are written.

    Zero vectors: like ``F.normalize(v, eps=1e-12)``, a row is divided by
    ``max(||v||, 1e-12)``, so a zero row has cosine 0 and adds 0 to the loss. Its
    gradient is the one autograd gives through F.normalize, which is finite: for a zero
    projector row, ``d loss/d zs_tilde[n,t] = w * zs[n,t] / (1e-12 * max(||zs[n,t]||, 1e-12))``
    with ``w = -1/(E*B*T)`` (the norm is clamped, so only the direct term remains); for a
    zero target row the projector gradient is 0. Both paths produce these exact values;
    in float16 the zero-row gradient (about ``1e12 * w``) exceeds the float16 range and
    becomes +-inf after the cast, as it does for the reference, never NaN.
    """
    zs, zs_tilde = _as_list(zs, "zs"), _as_list(zs_tilde, "zs_tilde")
    if len(zs) == 0 or len(zs) != len(zs_tilde):
        raise ValueError(f"{OP}: need one zs_tilde per zs and at least one pair, got {len(zs)} and {len(zs_tilde)}")
    flat = []
    for i, (z, zt) in enumerate(zip(zs, zs_tilde)):
        check_tensor(OP, f"zs[{i}]", z, ndim=3)
        check_tensor(OP, f"zs_tilde[{i}]", zt, ndim=3)
        if z.shape != zt.shape:
            raise ValueError(f"{OP}: zs[{i}] {tuple(z.shape)} and zs_tilde[{i}] {tuple(zt.shape)} differ in shape")
        if z.shape[0] != zs[0].shape[0]:
            raise ValueError(f"{OP}: every encoder needs the same batch size, got {zs[0].shape[0]} and {z.shape[0]}")
        if z.numel() == 0:
            raise ValueError(f"{OP}: zs[{i}] is empty ({tuple(z.shape)})")
        flat += [z, zt]
    check_same_device(OP, **{f"t{i}": t for i, t in enumerate(flat)})
    if not use_triton(OP, *flat):
        return repa_cosine_loss_reference(zs, zs_tilde)
    return _RepaLoss.apply(len(zs), zs[0].shape[0], *[t.contiguous() for t in flat])
