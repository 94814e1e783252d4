"""``repa_e_fast.ops.patch`` on the real diffusers modules and on a DiT-pattern block:
outputs and gradients against the unpatched model (Triton interpreter and PyTorch
reference paths, NCHW and channels_last, fp32 and bf16), patch counts, Parameters and
state dicts untouched, ``unpatch``."""

import copy

import pytest
import torch
import torch.nn as nn

from repa_e_fast import ops
from repa_e_fast.ops import patching
from _ops_helpers import needs_triton

diffusers = pytest.importorskip("diffusers")

CL = torch.channels_last
# Largest error relative to the largest reference magnitude, per output / gradient.
TOL = {("triton", torch.float32): 2e-5, ("torch", torch.float32): 0.0,
       ("triton", torch.bfloat16): 1e-1, ("torch", torch.bfloat16): 1e-1}
PATHS = [pytest.param("triton", marks=needs_triton), "torch"]


def relative_error(actual, expected, floor=0.0):
    scale = max(expected.float().abs().max().item(), floor, 1e-30)
    return (actual.float() - expected.float()).abs().max().item() / scale


def compare(patched, unpatched, make_inputs, run, tol):
    """Forward + backward of both models on the same inputs; the worst relative error of
    the output, the input gradient and every parameter gradient. The attention key bias is
    skipped: softmax ignores it, so its gradient is zero up to rounding noise; any other
    gradient is measured against at least 1e-3 of the largest one."""
    outputs, input_grads = [], []
    for model in (patched, unpatched):
        inputs = make_inputs()
        out = run(model, inputs)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype))
        outputs.append(out.detach())
        input_grads.append(inputs[0].grad)
    grads = {"input grad": (input_grads[0], input_grads[1])}
    for (name, p), q in zip(patched.named_parameters(), unpatched.parameters()):
        if q.grad is not None and not name.endswith("to_k.bias"):
            grads[name] = (p.grad, q.grad)
    floor = 1e-3 * max(expected.float().abs().max().item() for _, expected in grads.values())
    errors = {"output": relative_error(outputs[0], outputs[1])}
    errors.update({name: relative_error(actual, expected, floor) for name, (actual, expected) in grads.items()})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{worst}: relative error {errors[worst]:.2e} > {tol:.0e}"
    return errors


def set_path(monkeypatch, path):
    monkeypatch.setenv("REPA_E_FAST_OPS", path)
    if path == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def patched_pair(model):
    """(patched model, unpatched deep copy), checking Parameters and state dict survive."""
    reference = copy.deepcopy(model)
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = ops.patch(model)
    assert all(p is params[name] for name, p in model.named_parameters())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    return model, reference, report


def randomize(model, std=0.2, seed=0):
    """Random weights everywhere (diffusers zero-initialises some layers)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


# --------------------------------------------------------------------------- AutoencoderKL


def tiny_vae():
    # Default block types (DownEncoderBlock2D / UpDecoderBlock2D, mid-block attention on),
    # narrow so the interpreter stays fast.
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(16,), norm_num_groups=4)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "nchw"), (torch.float32, "channels_last"),
                                          (torch.bfloat16, "channels_last")])
def test_autoencoder_kl(monkeypatch, path, dtype, layout):
    set_path(monkeypatch, path)
    vae, reference, report = patched_pair(tiny_vae().to(dtype))
    resnets = sum(patching._is_diffusers(m, "ResnetBlock2D") for m in reference.modules())
    attention_norms = sum(type(m).__name__ == "Attention" and m.group_norm is not None for m in reference.modules())
    # Both norms of every ResnetBlock2D and the encoder's and decoder's conv_norm_out carry
    # the SiLU; the attention GroupNorms ([B, C, H*W]) are swapped without one.
    assert (resnets, attention_norms) == (7, 2)
    assert report.patched == {patching.GROUP_NORM_SILU: 2 * resnets + 2, patching.GROUP_NORM: attention_norms}
    assert not any(type(m) is nn.GroupNorm for m in vae.modules())
    if layout == "channels_last":
        vae, reference = vae.to(memory_format=CL), reference.to(memory_format=CL)

    def make_inputs():
        x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)
        return [(x.contiguous(memory_format=CL) if layout == "channels_last" else x).requires_grad_(True)]

    errors = compare(vae, reference, make_inputs, lambda model, inputs: model(inputs[0]).sample, TOL[path, dtype])
    print(f"AutoencoderKL {path} {dtype} {layout}: output {errors['output']:.1e}, "
          f"worst gradient {max(v for k, v in errors.items() if k != 'output'):.1e} (relative)")


def test_autoencoder_kl_patch_twice_and_unpatch(monkeypatch):
    set_path(monkeypatch, "torch")
    vae = tiny_vae()
    original_types = [type(m) for m in vae.modules()]
    first = ops.patch(vae)
    second = ops.patch(vae)
    assert sum(first.patched.values()) == 18 and not second.patched and not second.left_alone
    restored = ops.unpatch(vae)
    assert restored == 18 + 7 + 2  # the GroupNorms and the SiLUs that were fused away
    assert [type(m) for m in vae.modules()] == original_types
    # An optimizer built before patching keeps working on the same Parameters.
    optimizer = torch.optim.SGD(vae.parameters(), lr=0.1)
    ops.patch(vae)
    before = vae.encoder.conv_norm_out.weight.detach().clone()
    vae(torch.randn(1, 3, 8, 8)).sample.square().mean().backward()
    optimizer.step()
    assert not torch.equal(before, vae.encoder.conv_norm_out.weight)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("time_embedding_norm", ["default", "scale_shift"])
def test_resnet_block_with_time_embedding(monkeypatch, path, time_embedding_norm):
    """The UNet variant: the SiLU also applies to the time embedding, so the forward is replaced."""
    set_path(monkeypatch, path)
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    block = randomize(ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4,
                                    time_embedding_norm=time_embedding_norm))
    block, reference, report = patched_pair(block)
    fused_silu = 2 if time_embedding_norm == "default" else 1
    expected = {patching.GROUP_NORM_SILU: fused_silu, patching.DIFFUSERS_RESNET_TEMB: 1}
    if fused_silu == 1:
        expected[patching.GROUP_NORM] = 1
    assert report.patched == expected
    assert type(block).__name__ == "FusedResnetBlock2D" and isinstance(block, ResnetBlock2D)

    def make_inputs():
        generator = torch.Generator().manual_seed(2)
        return [torch.randn(2, 8, 6, 6, generator=generator).requires_grad_(True),
                torch.randn(2, 12, generator=generator)]

    compare(block, reference, make_inputs, lambda model, inputs: model(*inputs), TOL[path, torch.float32])
    ops.unpatch(block)
    assert type(block) is ResnetBlock2D and type(block.norm1) is nn.GroupNorm


# --------------------------------------------------------------------------- diffusers DiT


def tiny_dit():
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                            num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=10)
    return randomize(model)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diffusers_dit(monkeypatch, path, dtype):
    set_path(monkeypatch, path)
    model, reference, report = patched_pair(tiny_dit().to(dtype))
    assert report.patched == {patching.DIFFUSERS_ADALN_ZERO: 2}
    assert all(type(b).__name__ == "FusedBasicTransformerBlock" for b in model.transformer_blocks)

    def make_inputs():
        x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3)).to(dtype)
        return [x.requires_grad_(True), torch.tensor([3, 700]), torch.tensor([1, 7])]

    def run(m, inputs):
        return m(inputs[0], timestep=inputs[1], class_labels=inputs[2]).sample

    errors = compare(model, reference, make_inputs, run, TOL[path, dtype])
    print(f"DiTTransformer2DModel {path} {dtype}: output {errors['output']:.1e}, "
          f"worst gradient {max(v for k, v in errors.items() if k != 'output'):.1e} (relative)")
    ops.unpatch(model)
    assert all(type(b).__name__ == "BasicTransformerBlock" for b in model.transformer_blocks)


@pytest.mark.parametrize("path", PATHS)
def test_diffusers_adaln_zero_block_with_affine_mlp_norm(monkeypatch, path):
    set_path(monkeypatch, path)
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = randomize(BasicTransformerBlock(16, 2, 8, num_embeds_ada_norm=10, norm_type="ada_norm_zero"))
    block, reference, report = patched_pair(block)
    assert report.patched == {patching.DIFFUSERS_ADALN_ZERO: 1}
    assert [name for name, _ in report.left_alone] == ["norm3"]

    def make_inputs():
        return [torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4)).requires_grad_(True)]

    def run(m, inputs):
        return m(inputs[0], timestep=torch.tensor([1, 2]), class_labels=torch.tensor([0, 3]))

    compare(block, reference, make_inputs, run, TOL[path, torch.float32])


# --------------------------------------------------------------------------- DiT pattern


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class SelfAttention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.inner = nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, x):
        return self.inner(x, x, x, need_weights=False)[0]


class PatternBlock(nn.Module):
    """A block written the way DiT / SiT codebases write theirs."""

    def __init__(self, dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class PatternFinalLayer(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        x = self.linear(x)
        return x


class PreNormBlock(PatternBlock):
    """Same modules, a different computation: must be left alone."""

    def forward(self, x, c):
        return x + self.attn(self.norm1(x)) + self.mlp(self.norm2(x)) + self.adaLN_modulation(c)[:, None, :x.shape[-1]]


class OtherOrderBlock(PatternBlock):
    """DiT's statements with the modulation chunks in another order: must be left alone."""

    def forward(self, x, c):
        scale_msa, shift_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class PatternModel(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.blocks = nn.ModuleList([PatternBlock(dim), PatternBlock(dim), PreNormBlock(dim), OtherOrderBlock(dim)])
        self.final_layer = PatternFinalLayer(dim, 8)

    def forward(self, x, c):
        for block in self.blocks:
            x = block(x, c)
        return self.final_layer(x, c)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dit_pattern_blocks(monkeypatch, path, dtype):
    set_path(monkeypatch, path)
    torch.manual_seed(0)
    model, reference, report = patched_pair(randomize(PatternModel()).to(dtype))
    assert report.patched == {patching.DIT_BLOCK: 2, patching.DIT_FINAL: 1}
    assert [name for name, _ in report.left_alone] == ["blocks.2", "blocks.3"]
    assert type(model.blocks[2]) is PreNormBlock and type(model.blocks[3]) is OtherOrderBlock
    assert type(model.blocks[0]).__name__ == "FusedPatternBlock"

    def make_inputs():
        generator = torch.Generator().manual_seed(6)
        return [torch.randn(2, 5, 16, generator=generator).to(dtype).requires_grad_(True),
                torch.randn(2, 16, generator=generator).to(dtype)]

    errors = compare(model, reference, make_inputs, lambda m, inputs: m(*inputs), TOL[path, dtype])
    print(f"DiT-pattern blocks {path} {dtype}: output {errors['output']:.1e}, "
          f"worst gradient {max(v for k, v in errors.items() if k != 'output'):.1e} (relative)")
    assert ops.unpatch(model) == 3 and type(model.blocks[0]) is PatternBlock


def test_patch_report_and_errors():
    report = ops.patch(nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.SiLU(), nn.GroupNorm(4, 8)))
    assert report.patched == {patching.GROUP_NORM_SILU: 1, patching.GROUP_NORM: 1}
    assert "GroupNorm+SiLU" in str(report)
    with pytest.raises(TypeError, match="nn.Module"):
        ops.patch(lambda x: x)


def test_this_projects_models_use_their_own_switch():
    from repa_e_fast.models.sit import SiT
    from repa_e_fast.models.vae import AutoencoderKL

    sit = SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
              z_dims=[16], projector_dim=32, encoder_depth=1)
    vae = AutoencoderKL(embed_dim=4, ch_mult=(1, 2), ch=32, num_res_blocks=1, resolution=16)
    for model in (sit, vae):
        switches = [m for m in model.modules() if hasattr(m, "fused_ops")]
        report = ops.patch(model)
        assert report.patched == {patching.OWN_SWITCH: len(switches)} and all(m.fused_ops for m in switches)
        assert not any(isinstance(m, ops.FusedGroupNorm) for m in model.modules())  # they call the op themselves
        assert ops.unpatch(model) == len(switches) and not any(m.fused_ops for m in switches)


def test_patched_blocks_compile_into_one_graph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomize(PatternModel())
    model.blocks = nn.ModuleList(list(model.blocks)[:2])  # the recognised ones
    assert ops.patch(model).patched == {patching.DIT_BLOCK: 2, patching.DIT_FINAL: 1}
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break would raise
    assert torch.equal(compiled(x, c), model(x, c))
