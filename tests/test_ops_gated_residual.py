"""The gated residual ``x + gate * y``: Triton kernel vs float64 reference, input checks.

On a CPU machine the kernel runs in the Triton interpreter (tests/conftest.py); kernel outputs
are NaN-poisoned first, so an element the kernel forgets to write fails the comparison.
"""

import pytest
import torch

from repa_e_fast import ops
from _ops_helpers import DTYPES, ROW_SHAPES, case_generator, close, leaf, needs_triton, rand


@needs_triton
@pytest.mark.parametrize("shape,dtype", [(shape, dtype) for shape in ROW_SHAPES for dtype in DTYPES], ids=str)
def test_gated_residual_kernel(kernel_env, shape, dtype):
    gen = case_generator(1, shape, dtype)
    B, T, D = shape
    x, x64 = rand(gen, B, T, D, dtype=dtype)
    gate, gate64 = rand(gen, B, D, dtype=dtype)
    y, y64 = rand(gen, B, T, D, dtype=dtype)
    dout, dout64 = rand(gen, B, T, D, dtype=dtype)

    a = [leaf(x), leaf(gate), leaf(y)]
    out = ops.gated_residual(*a)
    out.backward(dout)
    r = [leaf(x64), leaf(gate64), leaf(y64)]
    outr = ops.gated_residual_reference(*r)
    outr.backward(dout64)

    close(out, outr, dtype, "out")
    for name, ta, tr in zip(("dx", "dgate", "dy"), a, r):
        close(ta.grad, tr.grad, dtype, name)


@needs_triton
def test_non_contiguous_x_is_copied(kernel_env):
    gen = torch.Generator().manual_seed(9)
    x, x64 = rand(gen, 2, 24, 6, dtype=torch.float32)
    xt, xt64 = x.transpose(1, 2), x64.transpose(1, 2)  # [2, 6, 24], not contiguous
    g, g64 = rand(gen, 2, 24, dtype=torch.float32)
    y, y64 = rand(gen, 2, 6, 24, dtype=torch.float32)
    close(ops.gated_residual(xt, g, y), ops.gated_residual_reference(xt64, g64, y64), torch.float32, "out")


def test_reference_gradcheck(monkeypatch):
    monkeypatch.setenv("REPA_E_FAST_OPS", "torch")
    gen = torch.Generator().manual_seed(10)
    B, T, D = 2, 3, 5
    x, gate, y = (torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_(True)
                  for s in ((B, T, D), (B, D), (B, T, D)))
    assert torch.autograd.gradcheck(ops.gated_residual, (x, gate, y))


def test_validation_errors():
    x = torch.randn(2, 3, 8)
    v = torch.randn(2, 8)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ops.gated_residual(x, [1.0] * 8, x)
    with pytest.raises(ValueError, match="y must have x's shape"):
        ops.gated_residual(x, v, torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="one device"):
        ops.gated_residual(x, v.to("meta"), x)
