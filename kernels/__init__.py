"""Raw Triton kernels (``@triton.jit`` functions and their launch helpers).

Installed as ``repa_e_fast.kernels``. No autograd here: the public, differentiable API
lives in ``repa_e_fast.ops``.
"""
