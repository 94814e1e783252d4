"""BatchNorm with statistics over the GLOBAL batch, on any device and process group.

``torch.nn.SyncBatchNorm`` runs on GPUs only; this one uses differentiable all-reduces
(``torch.distributed.nn``), so it also runs on CPU ranks (gloo), which is how the
distributed tests check that 2 ranks x batch b train exactly like 1 process x batch 2b.
State-dict keys are those of ``nn.BatchNorm2d``, so checkpoints are unchanged.
The tensors reduced are per-channel sums (a few floats for the latent BN, 64-512 for the
discriminator), so speed is not a concern.
"""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F


class GlobalBatchNorm2d(nn.BatchNorm2d):
    process_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size(self.process_group) == 1:
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"expected a [N,C,H,W] input, got shape {tuple(x.shape)}")
        x32 = x.float()
        dims = (0, 2, 3)
        count = torch.tensor([float(x.shape[0] * x.shape[2] * x.shape[3])], device=x.device)
        dist.all_reduce(count, group=self.process_group)
        # Two passes (mean, then centred squares) as a local BatchNorm computes it, so the
        # global statistics match a single process's to fp32 rounding.
        mean = dist_fn.all_reduce(x32.sum(dims), group=self.process_group) / count
        centred = x32 - mean.view(1, -1, 1, 1)
        var = dist_fn.all_reduce(centred.square().sum(dims), group=self.process_group) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach().to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach().to(self.running_var.dtype), alpha=momentum)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)


def convert_to_global_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Swap every ``nn.BatchNorm2d`` in ``module`` for a ``GlobalBatchNorm2d`` carrying the
    same parameters and buffers (in place; returns ``module``)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats, device=child.running_mean.device
                                            if child.running_mean is not None else None)
            replacement.load_state_dict(child.state_dict())
            if child.affine:
                replacement.weight, replacement.bias = child.weight, child.bias
            replacement.train(child.training)
            replacement.process_group = process_group
            setattr(module, name, replacement)
        else:
            convert_to_global_batchnorm(child, process_group)
    return module
