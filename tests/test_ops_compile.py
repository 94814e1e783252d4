"""The fused ops under torch.compile: one graph, no breaks, the eager numbers.

Every op calls its kernels through ``KernelOp``s (``repa_e_fast/ops/_dispatch.py``),
registered as custom ops beside the op (``repa_e_fast/ops/<op>.py``), so dynamo treats
them as opaque nodes. ``fullgraph=True`` turns any graph break into an error. The
aot_eager backend runs the captured forward and backward graphs without code generation,
so the kernels (interpreted here) produce exactly the eager values.
"""

import pytest
import torch

from repa_e_fast import ops
from repa_e_fast.models.sit import SiT


def all_ops(x, gate, y, shift, scale, z, z_tilde, image, weight, bias):
    modulated = ops.adaln_modulate(x, shift, scale)
    residual = ops.gated_residual(x, gate, modulated)
    out, y2 = ops.gated_residual_adaln_modulate(residual, gate, y, shift, scale)
    out_only, _ = ops.gated_residual_adaln_modulate(y, gate, x, shift, scale)  # the backward without dy2
    repa = ops.repa_cosine_loss([z], [z_tilde])
    normed = ops.group_norm(image, 4, weight, bias, 1e-6, "silu")
    normed_const = ops.group_norm(image.detach(), 4, weight, None)  # the backward without dx
    return (out.sum() + y2.square().sum() + out_only.square().sum() + repa + normed.square().sum()
            + normed_const.square().sum())


def inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    B, T, D = 2, 8, 40

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    image = randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    return [randn(B, T, D), randn(B, D), randn(B, T, D), randn(B, D), randn(B, D), randn(B, T, 16),
            randn(B, T, 16), image, randn(8), randn(8)]


def loss_and_grads(fn, args):
    leaves = [a.clone().requires_grad_(index != 5) for index, a in enumerate(args)]  # zs: a detached target
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_fused_op_compiles_into_one_graph_with_the_eager_numbers(dtype):
    torch._dynamo.reset()
    eager_loss, eager_grads = loss_and_grads(all_ops, inputs(dtype))
    compiled = torch.compile(all_ops, backend="aot_eager", fullgraph=True)
    loss, grads = loss_and_grads(compiled, inputs(dtype))
    assert torch.equal(loss, eager_loss)
    assert grads[5] is None and sum(g is not None for g in grads) == 9
    for eager_grad, grad in zip(eager_grads, grads):
        if grad is not None:
            assert grad.dtype == eager_grad.dtype and grad.stride() == eager_grad.stride()
            assert torch.equal(grad, eager_grad)


def test_fused_sit_compiles_into_one_graph_with_the_eager_numbers():
    torch._dynamo.reset()
    torch.manual_seed(0)
    sit = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=72, depth=2, num_heads=2, num_classes=5,
              z_dims=[16], projector_dim=32, encoder_depth=1, class_dropout_prob=0.0, fused_ops=True)

    def loss_of(latents, labels, t, noise, z):
        out = sit(latents, labels, [z], time_input=t, noises=noise)
        return out["denoising_loss"].mean() + out["proj_loss"]

    args = (torch.randn(2, 4, 8, 8), torch.tensor([1, 3]), torch.rand(2, 1, 1, 1), torch.randn(2, 4, 8, 8),
            torch.randn(2, 16, 16))
    results = []
    for fn in (loss_of, torch.compile(loss_of, backend="aot_eager", fullgraph=True)):
        sit.zero_grad(set_to_none=True)
        loss = fn(*args)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in sit.parameters() if p.grad is not None]))
    (eager_loss, eager_grads), (loss, grads) = results
    assert torch.equal(loss, eager_loss)
    assert len(grads) == len(eager_grads) == len(list(sit.parameters())) - 1  # pos_embed is frozen
    assert all(torch.equal(a, b) for a, b in zip(grads, eager_grads))


def test_custom_op_registrations_pass_opcheck():
    # Schema, fake-tensor (shape/dtype/layout) and AOT-dispatch checks of every kernel op.
    x, gate, y, shift, scale, z, z_tilde, image, weight, bias = inputs()
    custom_ops = torch.ops.repa_e_fast
    y_mod, mean, rstd = custom_ops.adaln_fwd(x, shift, scale, 1e-6, torch.float32)
    out, y2, mean2, rstd2 = custom_ops.gated_residual_adaln_fwd(x, gate, y, shift, scale, 1e-6, torch.float32,
                                                         torch.float32)
    normed, gn_mean, gn_rstd = custom_ops.group_norm_fwd(image, 4, weight, bias, 1e-6, True, True)
    assert normed.is_contiguous(memory_format=torch.channels_last)
    grad_out = torch.ones(1)
    cases = [
        (custom_ops.adaln_fwd, (x, shift, scale, 1e-6, torch.float32)),
        (custom_ops.adaln_bwd, (x, scale, y, mean, rstd, torch.float32)),
        (custom_ops.gated_residual_fwd, (x, gate, y, torch.float32)),
        (custom_ops.gated_residual_bwd, (y_mod, y, gate, torch.float32)),
        (custom_ops.gated_residual_adaln_fwd, (x, gate, y, shift, scale, 1e-6, torch.float32, torch.float32)),
        (custom_ops.gated_residual_adaln_bwd, (out, y, gate, scale, y2, y_mod, mean2, rstd2, torch.float32,
                                        torch.float32)),
        (custom_ops.gated_residual_adaln_bwd, (out, y, gate, scale, None, y_mod, mean2, rstd2, torch.float32,
                                        torch.float32)),
        (custom_ops.group_norm_fwd, (image, 4, weight, bias, 1e-6, True, True)),
        (custom_ops.group_norm_fwd, (image.contiguous(), 4, None, None, 1e-6, False, False)),
        (custom_ops.group_norm_bwd, (image, normed, 4, weight, bias, gn_mean, gn_rstd, True, True, True)),
        (custom_ops.group_norm_bwd, (image, normed, 4, weight, None, gn_mean, gn_rstd, False, True, False)),
        (custom_ops.repa_loss_fwd, ([z, z], [z_tilde, z_tilde], [-0.5, -0.25], 1e-12)),
        (custom_ops.repa_loss_bwd, (z, z_tilde, grad_out, -0.5, 1e-12, False, True)),
        (custom_ops.repa_loss_bwd, (z, z_tilde, grad_out, -0.5, 1e-12, True, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
