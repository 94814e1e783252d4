"""REPA projection loss and the denoising loss, reference definitions (spec §4.4).

The fused Triton version of the REPA loss lives in ``repa_e_fast.ops``; this module is the
plain PyTorch definition that the models use unless ``fused_ops`` is on.
"""

from typing import Sequence

import torch
import torch.nn.functional as F


def repa_projection_loss(zs: Sequence[torch.Tensor], zs_tilde: Sequence[torch.Tensor]) -> torch.Tensor:
    """Official REPA reduction: -cos per token, mean over tokens, summed over samples and
    encoders, divided by ``len(zs) * batch``. Vectors are normalised with F.normalize
    (eps 1e-12) in fp32 whatever the input dtype (fp16 normalisation overflows)."""
    if len(zs) != len(zs_tilde):
        raise ValueError(f"got {len(zs)} encoder targets but {len(zs_tilde)} projector outputs")
    if len(zs) == 0:
        raise ValueError("repa_projection_loss needs at least one encoder")
    batch = zs[0].shape[0]
    total = zs_tilde[0].new_zeros((), dtype=torch.float32)
    for z, z_tilde in zip(zs, zs_tilde):
        if z.shape != z_tilde.shape:
            raise ValueError(f"target {tuple(z.shape)} and projector output {tuple(z_tilde.shape)} differ")
        z = F.normalize(z.float(), dim=-1)
        z_tilde = F.normalize(z_tilde.float(), dim=-1)
        total = total + (-(z * z_tilde).sum(dim=-1)).mean(dim=-1).sum()
    return total / (len(zs) * batch)


def denoising_loss(model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over all non-batch dims of the squared error, shape [N]."""
    return (model_output - target).square().mean(dim=tuple(range(1, model_output.ndim)))
