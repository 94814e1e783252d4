"""Exponential moving average of the SiT (docs/numerics.md#ema)."""

import torch
import torch.nn as nn


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float = 0.9999, float_buffers: bool = True) -> None:
    """ema = ema * decay + model * (1 - decay) for every parameter and, with
    ``float_buffers``, every floating-point buffer (the latent BN's running mean/var, as
    REPA-E does); other buffers (``num_batches_tracked``) are copied. ``decay=0`` makes an
    exact copy. Wrapper prefixes (DDP ``module.``, ``_orig_mod.``) must be removed by the
    caller: pass the unwrapped modules."""
    model_params = dict(model.named_parameters())
    ema_list, source_list = [], []
    for name, ema_param in ema.named_parameters():
        ema_list.append(ema_param)
        source_list.append(model_params[name].detach().to(ema_param.dtype))
    # One multi-tensor kernel per op instead of two launches per tensor; the same arithmetic
    # (multiply, then add with alpha) as the per-tensor loop, so the result is bit-equal.
    torch._foreach_mul_(ema_list, decay)
    torch._foreach_add_(ema_list, source_list, alpha=1 - decay)
    model_buffers = dict(model.named_buffers())
    averaged, averaged_sources, copied, copied_sources = [], [], [], []
    for name, ema_buffer in ema.named_buffers():
        source = model_buffers[name].detach()
        if float_buffers and ema_buffer.is_floating_point():
            averaged.append(ema_buffer)
            averaged_sources.append(source.to(ema_buffer.dtype))
        else:
            copied.append(ema_buffer)
            copied_sources.append(source)
    if averaged:
        torch._foreach_mul_(averaged, decay)
        torch._foreach_add_(averaged, averaged_sources, alpha=1 - decay)
    if copied:
        torch._foreach_copy_(copied, copied_sources)
