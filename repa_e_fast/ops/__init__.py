"""Public fused-op API (Triton kernels with PyTorch references).

Dispatch: Triton when the tensors are on CUDA or ``TRITON_INTERPRET=1``; the PyTorch
reference otherwise; ``REPA_E_FAST_OPS=torch|triton`` forces one. Importing this
package imports neither triton nor ``torch._dynamo``: the kernels module (and triton with
it) is imported when a kernel first runs, which is when ``TRITON_INTERPRET`` is read.

``patch(model)`` makes an existing model (diffusers VAE / DiT, DiT / SiT pattern) run the
fused ops in place; ``unpatch(model)`` restores it (see ``patching``).
"""

from ._dispatch import interpreter_enabled, triton_available, use_triton
from .adaln import (adaln_modulate, adaln_modulate_reference, gated_residual_adaln_modulate,
                    gated_residual_adaln_modulate_reference)
from .gated_residual import gated_residual, gated_residual_reference
from .patching import PatchReport, patch, unpatch
from .group_norm import FusedGroupNorm, group_norm, group_norm_reference, replace_group_norms
from .repa_loss import repa_cosine_loss, repa_cosine_loss_reference

__all__ = [
    "adaln_modulate", "adaln_modulate_reference",
    "gated_residual", "gated_residual_reference",
    "gated_residual_adaln_modulate", "gated_residual_adaln_modulate_reference",
    "repa_cosine_loss", "repa_cosine_loss_reference",
    "group_norm", "group_norm_reference", "FusedGroupNorm", "replace_group_norms",
    "patch", "unpatch", "PatchReport",
    "triton_available", "interpreter_enabled", "use_triton",
]
