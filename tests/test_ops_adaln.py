"""adaLN modulation and its fusion with the gated residual before it: Triton kernels vs float64
reference (the gated residual alone: tests/test_ops_gated_residual.py).

On a CPU machine the kernels run in the Triton interpreter (tests/conftest.py). Every
kernel-written buffer is NaN-poisoned first (REPA_E_FAST_POISON), so an element a kernel
forgets to write fails the comparison.
"""

import pytest
import torch

from repa_e_fast import ops
from repa_e_fast.ops import _dispatch
from _ops_helpers import DTYPES, ROW_SHAPES, case_generator, close, leaf, needs_triton, rand


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
def test_adaln_modulate_kernel(kernel_env, shape, dtype):
    B, T, D = shape
    gen = case_generator(0, shape, dtype)
    x, x64 = rand(gen, B, T, D, dtype=dtype, scale=2.0, offset=0.5)
    # shift/scale as chunk views of one [B, 6D]-like projection (row stride != D).
    mod, mod64 = rand(gen, B, 3 * D, dtype=dtype, scale=0.5)
    shift, scale = mod[:, :D], mod[:, 2 * D:]
    assert shift.stride(0) == 3 * D
    dy, dy64 = rand(gen, B, T, D, dtype=dtype)

    xs, sh, sc = leaf(x), leaf(shift), leaf(scale)
    y = ops.adaln_modulate(xs, sh, sc, eps=1e-6)
    y.backward(dy)
    xr, shr, scr = leaf(x64), leaf(mod64[:, :D]), leaf(mod64[:, 2 * D:])
    yr = ops.adaln_modulate_reference(xr, shr, scr, eps=1e-6)
    yr.backward(dy64)

    close(y, yr, dtype, "y")
    close(xs.grad, xr.grad, dtype, "dx")
    close(sh.grad, shr.grad, dtype, "dshift")
    close(sc.grad, scr.grad, dtype, "dscale")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
def test_gated_residual_adaln_kernel(kernel_env, shape, dtype):
    B, T, D = shape
    gen = case_generator(2, shape, dtype)
    x, x64 = rand(gen, B, T, D, dtype=dtype, offset=0.3)
    gate, gate64 = rand(gen, B, D, dtype=dtype)
    y, y64 = rand(gen, B, T, D, dtype=dtype)
    shift, shift64 = rand(gen, B, D, dtype=dtype, scale=0.5)
    scale, scale64 = rand(gen, B, D, dtype=dtype, scale=0.5)
    dout, dout64 = rand(gen, B, T, D, dtype=dtype)
    dy2, dy264 = rand(gen, B, T, D, dtype=dtype)

    a = [leaf(v) for v in (x, gate, y, shift, scale)]
    out, y2 = ops.gated_residual_adaln_modulate(*a, eps=1e-6)
    torch.autograd.backward([out, y2], [dout, dy2])
    # Reference: the unfused pair, in float64, LayerNorm of the residual *as stored* in
    # dtype (the fused kernel normalises the rounded residual, like the unfused ops).
    r = [leaf(v) for v in (x64, gate64, y64, shift64, scale64)]
    outr = ops.gated_residual_reference(r[0], r[1], r[2])
    stored = outr + (outr.detach().to(dtype).double() - outr.detach())
    y2r = ops.adaln_modulate_reference(stored, r[3], r[4], eps=1e-6)
    torch.autograd.backward([outr, y2r], [dout64, dy264])

    close(out, outr, dtype, "out")
    close(y2, y2r, dtype, "y2")
    for name, ta, tr in zip(("dx", "dgate", "dy", "dshift", "dscale"), a, r):
        close(ta.grad, tr.grad, dtype, name)


@needs_triton
def test_gated_residual_adaln_only_one_output_used(kernel_env):
    gen = torch.Generator().manual_seed(7)
    B, T, D = 2, 5, 40
    vals = [rand(gen, *s, dtype=torch.float32) for s in ((B, T, D), (B, D), (B, T, D), (B, D), (B, D))]
    for which in (0, 1):
        a = [leaf(v[0]) for v in vals]
        r = [leaf(v[1]) for v in vals]
        ops.gated_residual_adaln_modulate(*a)[which].sum().backward()
        ops.gated_residual_adaln_modulate_reference(*r)[which].sum().backward()
        for name, ta, tr in zip(("dx", "dgate", "dy", "dshift", "dscale"), a, r):
            if tr.grad is None:  # shift/scale do not reach `out`: no gradient, as in autograd
                assert ta.grad is None, f"output {which} {name}: expected no gradient"
            else:
                close(ta.grad, tr.grad, torch.float32, f"output {which} {name}")
        assert (a[3].grad is None) == (which == 0)


@needs_triton
def test_mixed_dtypes_follow_type_promotion(kernel_env):
    gen = torch.Generator().manual_seed(8)
    x, x64 = rand(gen, 2, 4, 24, dtype=torch.bfloat16)
    sh, sh64 = rand(gen, 2, 24, dtype=torch.float32)
    sc, sc64 = rand(gen, 2, 24, dtype=torch.float32)
    a = [leaf(x), leaf(sh), leaf(sc)]
    y = ops.adaln_modulate(*a)
    assert y.dtype == torch.float32  # bf16 x, fp32 modulation -> fp32, as in eager PyTorch
    y.sum().backward()
    r = [leaf(x64), leaf(sh64), leaf(sc64)]
    ops.adaln_modulate_reference(*r).sum().backward()
    close(a[0].grad, r[0].grad, torch.bfloat16, "dx")
    close(a[2].grad, r[2].grad, torch.float32, "dscale")


@needs_triton
def test_non_contiguous_x_is_copied(kernel_env):
    gen = torch.Generator().manual_seed(9)
    x, x64 = rand(gen, 2, 24, 6, dtype=torch.float32)
    sh, sh64 = rand(gen, 2, 24, dtype=torch.float32)
    sc, sc64 = rand(gen, 2, 24, dtype=torch.float32)
    xt, xt64 = x.transpose(1, 2), x64.transpose(1, 2)  # [2, 6, 24], not contiguous
    close(ops.adaln_modulate(xt, sh, sc), ops.adaln_modulate_reference(xt64, sh64, sc64), torch.float32, "y")


@pytest.mark.parametrize("fn", ["adaln", "fused"])
def test_reference_gradcheck(fn, monkeypatch):
    monkeypatch.setenv("REPA_E_FAST_OPS", "torch")
    gen = torch.Generator().manual_seed(10)
    B, T, D = 2, 3, 5
    mk = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    if fn == "adaln":
        assert torch.autograd.gradcheck(lambda x, a, b: ops.adaln_modulate(x, a, b), (mk(B, T, D), mk(B, D), mk(B, D)))
    else:
        assert torch.autograd.gradcheck(ops.gated_residual_adaln_modulate,
                                        (mk(B, T, D), mk(B, D), mk(B, T, D), mk(B, D), mk(B, D)))


def test_validation_errors():
    x = torch.randn(2, 3, 8)
    v = torch.randn(2, 8)
    with pytest.raises(ValueError, match="3-D"):
        ops.adaln_modulate(torch.randn(3, 8), v, v)
    with pytest.raises(ValueError, match=r"shape \(2, 8\)"):
        ops.adaln_modulate(x, torch.randn(2, 7), v)
    with pytest.raises(ValueError, match=r"\[B, D\] or \[B, 1, D\]"):
        ops.adaln_modulate(x, torch.randn(2, 3, 8), v)
    with pytest.raises(TypeError, match="float32"):
        ops.adaln_modulate(x.long(), v, v)
    # [B, 1, D] modulation vectors are accepted (the official SiT unsqueezes them).
    torch.testing.assert_close(ops.adaln_modulate(x, v[:, None], v[:, None]), ops.adaln_modulate(x, v, v))


@pytest.mark.parametrize("shape", [(16,), (1, 16), (1, 1, 16)], ids=["D", "1xD", "1x1xD"])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_modulation_vectors_shared_by_the_batch_broadcast(monkeypatch, shape, path):
    """A [D] / [1, D] shift, scale or gate broadcasts over the batch like in PyTorch; its
    gradient is summed over the batch."""
    if path == "triton" and not _dispatch.triton_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("REPA_E_FAST_OPS", path)
    gen = torch.Generator().manual_seed(3)
    B, T, D = 3, 5, 16
    x, y = (torch.randn(B, T, D, generator=gen).requires_grad_(True) for _ in range(2))
    gate, shift, scale = (torch.randn(*shape, generator=gen).requires_grad_(True) for _ in range(3))
    out, y2 = ops.gated_residual_adaln_modulate(x, gate, y, shift, scale)
    results = [out, y2, ops.adaln_modulate(x, shift, scale), ops.gated_residual(x, gate, y)]

    def per_sample(v):
        return v.reshape(1, 1, D)

    def layer_norm(t):
        return torch.nn.functional.layer_norm(t, (D,), eps=1e-6)

    ref_out = x + per_sample(gate) * y
    references = [ref_out, layer_norm(ref_out) * (1 + per_sample(scale)) + per_sample(shift),
                  layer_norm(x) * (1 + per_sample(scale)) + per_sample(shift), x + per_sample(gate) * y]
    weights = [torch.randn(r.shape, generator=gen) for r in references]
    leaves = [x, y, gate, shift, scale]
    grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(results, weights)), leaves)
    ref_grads = torch.autograd.grad(sum((r * w).sum() for r, w in zip(references, weights)), leaves)
    for result, reference in zip(results, references):
        torch.testing.assert_close(result, reference, rtol=1e-5, atol=1e-5)
    for grad, reference, leaf in zip(grads, ref_grads, leaves):
        assert grad.shape == leaf.shape
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=2e-5)
    with pytest.raises(ValueError, match=r"must have shape \(3, 16\), \(1, 16\) or \(16,\)"):
        ops.adaln_modulate(x, torch.zeros(2, D), torch.zeros(D))
