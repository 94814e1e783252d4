"""Activation checkpointing per block (``--grad-checkpointing sit,vae``).

A checkpointed block keeps only its input during the forward and runs again in the backward
to rebuild its activations (``torch.utils.checkpoint``, non-reentrant): memory for one more
forward of each block. Enabled blocks are the SiT's transformer blocks and the VAE's
ResNet and attention blocks (encoder and decoder, mid blocks included).

The block's class and state-dict keys are unchanged: the instance's ``forward`` is replaced
by one that checkpoints the class's forward (a bound method, so ``copy.deepcopy`` of the
model rebinds it to the copy). A block runs plainly when no gradient is being recorded, and
when its parameters do not require grad: the REPA-E step's align pass calls the SiT with
detached parameters (``torch.func.functional_call``) and a recomputation in the backward
would see the real, trainable ones and save a different set of tensors.

The recomputation runs the same operations on the same inputs, so values and gradients are
bitwise those of the plain run on a deterministic backend; the blocks draw no random numbers
(no dropout), and the non-reentrant implementation restores the RNG state anyway.
"""

import types
from typing import Iterable, Tuple, Type

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

CHECKPOINT_TARGETS = ("sit", "vae")


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    plain = type(self).forward
    if not torch.is_grad_enabled() or not any(p.requires_grad for p in self.parameters()):
        return plain(self, *args, **kwargs)
    return checkpoint(plain, self, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(model: nn.Module, block_types: Tuple[Type[nn.Module], ...]) -> int:
    """Checkpoint every submodule of ``model`` that is one of ``block_types``; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, block_types):
            module.forward = types.MethodType(_checkpointed_forward, module)
            count += 1
    return count


def enable_grad_checkpointing(targets: Iterable[str], sit: nn.Module = None, vae: nn.Module = None) -> dict:
    """``targets`` from {"sit", "vae"}; returns {target: number of checkpointed blocks}."""
    from .sit import SiTBlock
    from .vae import AttnBlock, ResnetBlock

    counts = {}
    for target in targets:
        if target not in CHECKPOINT_TARGETS:
            raise ValueError(f"grad_checkpointing: unknown target {target!r}; choose from {CHECKPOINT_TARGETS}")
        if target == "sit" and sit is not None:
            counts["sit"] = checkpoint_blocks(sit, (SiTBlock,))
        if target == "vae" and vae is not None:
            counts["vae"] = checkpoint_blocks(vae, (ResnetBlock, AttnBlock))
    return counts
