"""The one switch between the models' reference PyTorch path and their fast paths.

A module with a fast path subclasses :class:`FastPath` and reads ``self.fused_ops`` in its
``forward``: True runs the fast path (the fused Triton ops of ``repa_e_fast.ops``; for
LPIPS the same fp32 math in fewer, larger kernels), False the reference PyTorch ops in the
official order. The attention kernel of every :class:`Attention` is the other switch.
:func:`set_fast_path` sets both for a model and all its submodules, and
``model.set_fused_ops(enabled)`` is ``set_fast_path(model, fused_ops=enabled)``.
``repa_e_fast.ops.patch`` flips the same ``fused_ops`` attribute. No switch changes a
state-dict key.
"""

from typing import Optional, TypeVar

import torch.nn as nn

from .attention import Attention, check_attention_kernel

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class FastPath:
    """Mixin for an ``nn.Module`` that has a fast path, or holds modules that have one."""

    fused_ops: bool = False

    def set_fused_ops(self: ModuleT, enabled: bool) -> ModuleT:
        """The fast path on or off, for this module and every module inside it."""
        return set_fast_path(self, fused_ops=enabled)


def set_fast_path(model: ModuleT, fused_ops: Optional[bool] = None, attention: Optional[str] = None) -> ModuleT:
    """Set the fast-path switches of ``model`` and its submodules; None leaves a switch as it is.

    ``fused_ops``: every :class:`FastPath` module. ``attention``: the kernel of every
    :class:`Attention` ("sdpa", "flash_attn", "xformers" or "math", the explicit formula).
    """
    if attention is not None:
        check_attention_kernel(attention)
    for module in model.modules():
        if fused_ops is not None and isinstance(module, FastPath):
            module.fused_ops = bool(fused_ops)
        if attention is not None and isinstance(module, Attention):
            module.kernel = attention
    return model
