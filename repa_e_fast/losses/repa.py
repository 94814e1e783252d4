"""The SiT's denoising loss (docs/step.md#the-repa-loss-and-the-denoising-loss).

The REPA projection loss is ``repa_e_fast.ops.repa_cosine_loss`` (fused) and
``repa_e_fast.ops.repa_cosine_loss_reference`` (its PyTorch definition).
"""

import torch


def denoising_loss(model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over all non-batch dims of the squared error, shape [N]."""
    return (model_output - target).square().mean(dim=tuple(range(1, model_output.ndim)))
