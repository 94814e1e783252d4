"""Public fused-op API (Triton kernels with PyTorch references).

Dispatch: Triton when the tensors are on CUDA or ``TRITON_INTERPRET=1``; the PyTorch
reference otherwise; ``REPA_E_FAST_OPS=torch|triton`` forces one. Importing this
package never imports triton (see ``_dispatch``).
"""

from ._dispatch import interpreter_enabled, triton_available, use_triton
from .adaln import (adaln_modulate, adaln_modulate_reference, gated_residual_adaln_modulate,
                    gated_residual_adaln_modulate_reference)
from .gated_residual import gated_residual, gated_residual_reference
from .group_norm import FusedGroupNorm, group_norm, group_norm_reference, replace_group_norms
from .repa_loss import repa_cosine_loss, repa_cosine_loss_reference

__all__ = [
    "adaln_modulate", "adaln_modulate_reference",
    "gated_residual", "gated_residual_reference",
    "gated_residual_adaln_modulate", "gated_residual_adaln_modulate_reference",
    "repa_cosine_loss", "repa_cosine_loss_reference",
    "group_norm", "group_norm_reference", "FusedGroupNorm", "replace_group_norms",
    "triton_available", "interpreter_enabled", "use_triton",
]
