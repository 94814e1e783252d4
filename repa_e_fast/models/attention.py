"""Multi-head self-attention with a switchable kernel.

The kernels compute the same function (softmax(q k^T * scale) v, no mask, no dropout):
- ``sdpa`` (default): torch.nn.functional.scaled_dot_product_attention, which picks
  PyTorch's flash / cuDNN / memory-efficient kernels on GPU and a fused CPU kernel.
- ``flash_attn``: the flash-attn package (CUDA, fp16/bf16 only).
- ``xformers``: xformers.ops.memory_efficient_attention.
- ``math``: the explicit formula, the readable reference.
A model's attention modules are switched together with ``fast_path.set_fast_path(model, attention=...)``.
"""

import importlib.util
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_KERNELS = ("sdpa", "flash_attn", "xformers", "math")
_warned = set()


def check_attention_kernel(kernel: str) -> str:
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    package = {"flash_attn": "flash_attn", "xformers": "xformers"}.get(kernel)
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(
            f"attention={kernel!r} needs the '{package}' package, which is not installed "
            f"(pip install 'repa_e_fast[{'flash' if package == 'flash_attn' else package}]'), "
            "or use attention='sdpa'"
        )
    return kernel


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "sdpa") -> torch.Tensor:
    """q, k, v: [B, heads, N, head_dim] -> [B, heads, N, head_dim], scale head_dim^-0.5."""
    if kernel in ("flash_attn", "xformers"):
        usable = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        if not usable:
            _warn_once(
                f"attention={kernel!r} needs fp16/bf16 CUDA tensors; got {q.dtype} on {q.device}, "
                "using 'sdpa' for these calls"
            )
            kernel = "sdpa"
    if kernel == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if kernel == "math":
        scale = q.shape[-1] ** -0.5
        weights = torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1)
        return weights @ v
    # Both packages take [B, N, heads, head_dim].
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if kernel == "flash_attn":
        from flash_attn import flash_attn_func

        out = flash_attn_func(q, k, v)
    else:
        import xformers.ops

        out = xformers.ops.memory_efficient_attention(q, k, v)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """timm-layout attention: ``qkv`` Linear(D, 3D) laid out [q | k | v], heads contiguous
    inside each; optional per-head LayerNorm on q and k (``q_norm``/``k_norm``, eps 1e-5)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False, kernel: str = "sdpa"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.kernel = check_attention_kernel(kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = multi_head_attention(q, k, v, self.kernel)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
