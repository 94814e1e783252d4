"""Patch a model in place to run the fused ops: ``patch(model)`` / ``unpatch(model)``.

What is recognised (by class and structure; nothing is imported from the libraries):

* every ``nn.GroupNorm`` -> :class:`FusedGroupNorm` (any rank, e.g. diffusers' attention
  GroupNorm on ``[B, C, H*W]``), with the following SiLU fused into it where the SiLU is
  provably applied to the GroupNorm's output and nothing else:
  ``nn.Sequential(..., GroupNorm, SiLU, ...)``; diffusers ``ResnetBlock2D`` without a time
  embedding (every ``AutoencoderKL`` block, encoder and decoder, ``time_embedding_norm``
  ``"default"`` or ``"group"``: both GroupNorms), diffusers ``ResnetBlock2D`` with a time
  embedding (its forward is replaced, see below) and diffusers' VAE ``Encoder`` /
  ``Decoder`` ``conv_norm_out`` + ``conv_act``.
* diffusers ``BasicTransformerBlock(norm_type="ada_norm_zero")`` (DiT / PixArt-alpha
  family): adaLN modulate, gated residuals and, where the MLP LayerNorm has no affine,
  the attention residual + MLP modulate in one pass.
* DiT / SiT-pattern blocks (``x + gate.unsqueeze(1) * attn(modulate(norm1(x), shift,
  scale))`` then the same for the MLP, modulation from ``adaLN_modulation(c).chunk(6)``)
  and their final layer (``linear(modulate(norm_final(x), shift, scale))``): the modules
  must match, the forward must be exactly those statements (compared as parsed source)
  and the module's ``modulate`` must compute DiT's.
* this project's own SiT and VAE modules (their ``fused_ops`` switch).

Parameters are never copied or re-created: patched modules hold the same Parameter
objects, so state dicts and existing optimizers stay valid. A block whose forward must
change gets a subclass (``Fused<Name>``) of its own class via ``__class__``, whose forward
computes the same numbers with the fused ops and falls back to the original forward for
inputs it does not cover. ``unpatch`` restores the original modules and classes (do it
before pickling a whole module with ``torch.save(model)``; state dicts need nothing).
"""

import ast
import collections
import dataclasses
import inspect
import textwrap

import torch
import torch.nn as nn

from .adaln import adaln_modulate, gated_residual_adaln_modulate
from .gated_residual import gated_residual
from .group_norm import FusedGroupNorm

# Where a replaced module is kept on its replacement (a plain attribute, so it is neither a
# submodule nor part of the state dict).
_ORIGINAL = "_repa_e_fast_original"

GROUP_NORM = "GroupNorm"
GROUP_NORM_SILU = "GroupNorm+SiLU"
DIFFUSERS_RESNET_TEMB = "diffusers ResnetBlock2D with time embedding (forward)"
DIFFUSERS_ADALN_ZERO = "diffusers BasicTransformerBlock ada_norm_zero (forward)"
DIT_BLOCK = "DiT-pattern block (forward)"
DIT_FINAL = "DiT-pattern final layer (forward)"
OWN_SWITCH = "repa_e_fast fused_ops switch"


@dataclasses.dataclass
class PatchReport:
    """What :func:`patch` did: ``patched`` counts per kind; ``left_alone`` lists
    ``(module name, reason)`` for modules that looked relevant but were not (fully) fused."""

    patched: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    left_alone: list = dataclasses.field(default_factory=list)

    def __str__(self):
        lines = ["patched:"] + [f"  {count:4d}  {kind}" for kind, count in sorted(self.patched.items())]
        if not self.patched:
            lines.append("  nothing")
        if self.left_alone:
            lines.append("left alone:")
            lines += [f"  {name or '<root>'}: {reason}" for name, reason in self.left_alone]
        return "\n".join(lines)


class FusedAwaySiLU(nn.Identity):
    """Stands where an ``nn.SiLU`` was, whose SiLU now runs inside the GroupNorm before it."""


# --------------------------------------------------------------------------- helpers


def _is_diffusers(module, *names):
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("diffusers.")


def _plain_group_norm(module):
    return type(module) is nn.GroupNorm


def _plain_silu(module):
    return type(module) is nn.SiLU


def _plain_layer_norm(module, dim=None):
    """A LayerNorm without affine parameters over the last dim (what adaln_modulate computes)."""
    return (type(module) is nn.LayerNorm and module.weight is None and module.bias is None
            and len(module.normalized_shape) == 1 and (dim is None or module.normalized_shape[0] == dim))


def _child(name, child):
    return f"{name}.{child}" if name else child


def _replace(parent, name, new):
    old = parent._modules[name]
    object.__setattr__(new, _ORIGINAL, old)
    parent._modules[name] = new


def _fuse_norm(parent, name, report, silu):
    norm = parent._modules[name]
    _replace(parent, name, FusedGroupNorm.from_module(norm, "silu" if silu else None))
    report.patched[GROUP_NORM_SILU if silu else GROUP_NORM] += 1


def _fuse_norm_and_silu(parent, norm_name, act_name, report):
    _fuse_norm(parent, norm_name, report, silu=True)
    _replace(parent, act_name, FusedAwaySiLU())


_FUSED_CLASSES = {}


def _swap_class(module, mixin):
    """Give ``module`` the class ``Fused<Name>(mixin, type(module))`` (created once per class)."""
    cls = type(module)
    key = (mixin, cls)
    if key not in _FUSED_CLASSES:
        _FUSED_CLASSES[key] = type(f"Fused{cls.__name__}", (mixin, cls),
                                   {"__module__": __name__, "_unpatched_class": cls})
    module.__class__ = _FUSED_CLASSES[key]


# --------------------------------------------------------------------------- diffusers ResnetBlock2D


class _ResnetBlock2DWithTimeEmbedding:
    """diffusers ``ResnetBlock2D`` (time embedding present): the same computation with
    norm1 (and norm2 unless ``scale_shift``) carrying the SiLU. The block's
    ``nonlinearity`` stays an ``nn.SiLU``: it is still applied to the time embedding."""

    def forward(self, input_tensor, temb, *args, **kwargs):
        if args or kwargs.get("scale") is not None:
            return super().forward(input_tensor, temb, *args, **kwargs)  # deprecated arguments: the original
        hidden_states = self.norm1(input_tensor)  # GroupNorm + SiLU
        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:  # as the original: nearest upsampling of large NHWC batches
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)
        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = self.nonlinearity(self.norm2(hidden_states) * (1 + time_scale) + time_shift)
        else:
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = self.norm2(hidden_states)  # GroupNorm + SiLU
        hidden_states = self.conv2(self.dropout(hidden_states))
        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor


def _patch_resnet_block(name, block, report):
    """Fuse the block's SiLUs into its GroupNorms; True if it was patched."""
    if not (_plain_silu(block.nonlinearity) and _plain_group_norm(block.norm1) and _plain_group_norm(block.norm2)):
        report.left_alone.append((name, "ResnetBlock2D whose activation is not nn.SiLU or whose norms are not "
                                        "nn.GroupNorm: GroupNorms swapped only"))
        return False
    if block.time_embedding_norm not in ("default", "group", "scale_shift"):
        report.left_alone.append((name, f"ResnetBlock2D time_embedding_norm={block.time_embedding_norm!r} "
                                        "unknown: GroupNorms swapped only"))
        return False
    if block.time_emb_proj is None and block.time_embedding_norm != "scale_shift":
        # Every VAE block: the nonlinearity follows norm1 and norm2 and nothing else.
        _fuse_norm(block, "norm1", report, silu=True)
        _fuse_norm(block, "norm2", report, silu=True)
        _replace(block, "nonlinearity", FusedAwaySiLU())
        return True
    _fuse_norm(block, "norm1", report, silu=True)
    _fuse_norm(block, "norm2", report, silu=block.time_embedding_norm != "scale_shift")
    if block.time_embedding_norm == "scale_shift":
        report.left_alone.append((_child(name, "norm2"), "scale_shift modulation sits between GroupNorm and SiLU: "
                                                   "SiLU not fused"))
    _swap_class(block, _ResnetBlock2DWithTimeEmbedding)
    report.patched[DIFFUSERS_RESNET_TEMB] += 1
    return True


# --------------------------------------------------------------------------- diffusers adaLN-Zero block


class _AdaLNZeroTransformerBlock:
    """diffusers ``BasicTransformerBlock(norm_type="ada_norm_zero")`` with the adaLN
    modulations and gated residuals fused. Inputs the fused path does not cover (4-D hidden
    states, GLIGEN, chunked feed-forward, the deprecated ``scale``) run the original forward."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                timestep=None, cross_attention_kwargs=None, class_labels=None, added_cond_kwargs=None):
        kwargs = dict(cross_attention_kwargs or {})
        if (hidden_states.dim() != 3 or kwargs.get("gligen") is not None or kwargs.get("scale") is not None
                or self._chunk_size is not None):
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
        kwargs.pop("gligen", None)
        ada = self.norm1
        emb = ada.linear(ada.silu(ada.emb(timestep, class_labels, hidden_dtype=hidden_states.dtype)))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        norm_hidden_states = adaln_modulate(hidden_states, shift_msa, scale_msa, eps=ada.norm.eps)
        if self.pos_embed is not None:
            norm_hidden_states = self.pos_embed(norm_hidden_states)
        attn_output = self.attn1(norm_hidden_states,
                                 encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
                                 attention_mask=attention_mask, **kwargs)
        mlp_norm_fused = _plain_layer_norm(self.norm3, hidden_states.shape[-1])
        if self.attn2 is None and mlp_norm_fused:
            hidden_states, norm_hidden_states = gated_residual_adaln_modulate(
                hidden_states, gate_msa, attn_output, shift_mlp, scale_mlp, eps=self.norm3.eps)
        else:
            hidden_states = gated_residual(hidden_states, gate_msa, attn_output)
            if self.attn2 is not None:
                norm_hidden_states = self.norm2(hidden_states)
                if self.pos_embed is not None:
                    norm_hidden_states = self.pos_embed(norm_hidden_states)
                hidden_states = self.attn2(norm_hidden_states, encoder_hidden_states=encoder_hidden_states,
                                           attention_mask=encoder_attention_mask, **kwargs) + hidden_states
            if mlp_norm_fused:
                norm_hidden_states = adaln_modulate(hidden_states, shift_mlp, scale_mlp, eps=self.norm3.eps)
            else:
                norm_hidden_states = self.norm3(hidden_states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return gated_residual(hidden_states, gate_mlp, self.ff(norm_hidden_states))


def _patch_adaln_zero_block(name, block, report):
    ada = block.norm1
    if getattr(block, "norm_type", None) != "ada_norm_zero":
        report.left_alone.append((name, f"BasicTransformerBlock norm_type={getattr(block, 'norm_type', None)!r}: "
                                        "only ada_norm_zero is fused"))
        return
    if not (_is_diffusers(ada, "AdaLayerNormZero") and ada.emb is not None and _plain_silu(ada.silu)
            and _plain_layer_norm(ada.norm)):
        report.left_alone.append((name, "ada_norm_zero block whose AdaLayerNormZero is not the plain "
                                        "LayerNorm variant: left alone"))
        return
    if hasattr(block, "fuser"):
        report.left_alone.append((name, "GLIGEN (gated attention) block: left alone"))
        return
    if not _plain_layer_norm(block.norm3):
        report.left_alone.append((_child(name, "norm3"), "MLP LayerNorm has an affine: its modulate is left to PyTorch"))
    _swap_class(block, _AdaLNZeroTransformerBlock)
    report.patched[DIFFUSERS_ADALN_ZERO] += 1


# --------------------------------------------------------------------------- DiT / SiT pattern


def _forward_statements(cls):
    """The statements of ``cls.forward`` as normalised source (docstring and comments
    dropped), or None when its source is not available."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    body = tree.body[0].body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return [ast.unparse(statement) for statement in body]


def _standard_modulate(cls):
    """True if the block's module defines ``modulate(x, shift, scale)`` as DiT does."""
    fn = inspect.getmodule(cls).__dict__.get("modulate") if inspect.getmodule(cls) else None
    if not callable(fn):
        return False
    generator = torch.Generator().manual_seed(0)
    x, shift, scale = (torch.randn(2, 3, 4, generator=generator, dtype=torch.float64),
                       torch.randn(2, 4, generator=generator, dtype=torch.float64),
                       torch.randn(2, 4, generator=generator, dtype=torch.float64))
    try:
        return torch.equal(fn(x, shift, scale), x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))
    except Exception:
        return False


def _adaln_projection(module, chunks):
    seq = getattr(module, "adaLN_modulation", None)
    return (isinstance(seq, nn.Sequential) and len(seq) == 2 and _plain_silu(seq[0])
            and type(seq[1]) is nn.Linear and seq[1].out_features == chunks * seq[1].in_features)


def _looks_like_dit_block(module):
    return (_adaln_projection(module, 6) and hasattr(module, "attn") and hasattr(module, "mlp")
            and _plain_layer_norm(getattr(module, "norm1", None)) and _plain_layer_norm(getattr(module, "norm2", None)))


def _looks_like_dit_final_layer(module):
    return (_adaln_projection(module, 2) and type(getattr(module, "linear", None)) is nn.Linear
            and _plain_layer_norm(getattr(module, "norm_final", None)))


# The forwards recognised, statement for statement (chunk along dim 1 or -1 of a 2-D c).
def _chunk(names, n):
    return [f"{names} = self.adaLN_modulation(c).chunk({n}, dim={d})" for d in ("1", "-1")]


_DIT_BLOCK_FORWARDS = [[unpack,
                        "x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))",
                        "x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))",
                        "return x"]
                       for unpack in _chunk("shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp", 6)]
_DIT_FINAL_FORWARDS = [[unpack] + tail
                       for unpack in _chunk("shift, scale", 2)
                       for tail in (["return self.linear(modulate(self.norm_final(x), shift, scale))"],
                                    ["x = modulate(self.norm_final(x), shift, scale)", "x = self.linear(x)",
                                     "return x"])]


class _DiTBlock:
    def forward(self, x, c):
        if x.dim() != 3 or c.dim() != 2:
            return super().forward(x, c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        attn_out = self.attn(adaln_modulate(x, shift_msa, scale_msa, eps=self.norm1.eps))
        x, h = gated_residual_adaln_modulate(x, gate_msa, attn_out, shift_mlp, scale_mlp, eps=self.norm2.eps)
        return gated_residual(x, gate_mlp, self.mlp(h))


class _DiTFinalLayer:
    def forward(self, x, c):
        if x.dim() != 3 or c.dim() != 2:
            return super().forward(x, c)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(adaln_modulate(x, shift, scale, eps=self.norm_final.eps))


def _patch_dit(name, module, report, kind, mixin, forwards):
    cls = type(module)
    if _forward_statements(cls) not in forwards or not _standard_modulate(cls):
        report.left_alone.append((name, f"{cls.__name__} has DiT-like modules but its forward is not the DiT "
                                        "pattern: left alone"))
        return
    _swap_class(module, mixin)
    report.patched[kind] += 1


# --------------------------------------------------------------------------- entry points


def _own_switch(module):
    """This project's modules (SiT, VAE) have a ``fused_ops`` switch of their own."""
    return hasattr(module, "fused_ops") and type(module).__module__.startswith("repa_e_fast.")


def patch(model, group_norms=True, blocks=True):
    """Make ``model`` run the fused ops, in place. Returns a :class:`PatchReport`.

    Args:
        model: any ``nn.Module`` (a diffusers ``AutoencoderKL`` / ``UNet2DModel`` /
            ``DiTTransformer2DModel``, a DiT or SiT, or a module containing them).
        group_norms: swap ``nn.GroupNorm`` modules for :class:`FusedGroupNorm` (with the
            following SiLU fused where it provably applies to the norm's output only).
        blocks: fuse adaLN-Zero transformer blocks (diffusers ``ada_norm_zero``, DiT / SiT
            pattern) and turn on the ``fused_ops`` switch of this project's SiT and VAE.

    Patching twice is harmless (patched modules are skipped). ``model`` itself must not be a
    bare ``nn.GroupNorm`` (there is no parent to put the replacement in): use
    ``FusedGroupNorm.from_module`` for that.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch: expected an nn.Module, got {type(model).__name__}")
    report = PatchReport()

    for name, module in list(model.named_modules()):
        if hasattr(type(module), "_unpatched_class"):
            continue  # already patched
        if group_norms and _is_diffusers(module, "ResnetBlock2D"):
            if not isinstance(module.nonlinearity, FusedAwaySiLU):  # not patched before
                _patch_resnet_block(name, module, report)
        elif group_norms and _is_diffusers(module, "Encoder", "Decoder") and _plain_group_norm(
                getattr(module, "conv_norm_out", None)) and _plain_silu(getattr(module, "conv_act", None)):
            _fuse_norm_and_silu(module, "conv_norm_out", "conv_act", report)
        elif group_norms and _is_diffusers(module, "ResnetBlockCondNorm2D"):
            report.left_alone.append((name, f"ResnetBlockCondNorm2D ({module.time_embedding_norm}): the SiLU "
                                            "follows a conditional modulation; any inner nn.GroupNorm swapped only"))
        elif group_norms and _is_diffusers(module, "AdaGroupNorm"):
            report.left_alone.append((name, "AdaGroupNorm calls F.group_norm functionally: left alone"))
        elif blocks and _is_diffusers(module, "BasicTransformerBlock"):
            _patch_adaln_zero_block(name, module, report)
        elif blocks and _own_switch(module):
            if not module.fused_ops:
                module.fused_ops = True
                object.__setattr__(module, _ORIGINAL, "fused_ops")
                report.patched[OWN_SWITCH] += 1
        elif blocks and _looks_like_dit_block(module):
            _patch_dit(name, module, report, DIT_BLOCK, _DiTBlock, _DIT_BLOCK_FORWARDS)
        elif blocks and _looks_like_dit_final_layer(module):
            _patch_dit(name, module, report, DIT_FINAL, _DiTFinalLayer, _DIT_FINAL_FORWARDS)
        if group_norms and isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in zip(names, names[1:]):
                if _plain_group_norm(module._modules[a]) and _plain_silu(module._modules[b]):
                    _fuse_norm_and_silu(module, a, b, report)

    if group_norms:  # every nn.GroupNorm not fused above: swapped, no activation
        for parent in list(model.modules()):
            if _own_switch(parent):
                continue  # this project's modules call the fused op with their norms' parameters
            for child_name, child in list(parent._modules.items()):
                if _plain_group_norm(child):
                    _fuse_norm(parent, child_name, report, silu=False)
    return report


def unpatch(model):
    """Undo :func:`patch` on ``model`` (in place): original modules (holding the same
    Parameters) and classes come back. Returns the number of modules restored."""
    restored = 0
    for module in list(model.modules()):
        cls = type(module)
        if hasattr(cls, "_unpatched_class") and cls in _FUSED_CLASSES.values():
            module.__class__ = cls._unpatched_class
            restored += 1
        if module.__dict__.get(_ORIGINAL) == "fused_ops":
            module.fused_ops = False
            del module.__dict__[_ORIGINAL]
            restored += 1
        for child_name, child in list(module._modules.items()):
            original = None if child is None else child.__dict__.get(_ORIGINAL)
            if isinstance(original, nn.Module):
                if isinstance(original, nn.GroupNorm):
                    original.train(child.training)
                module._modules[child_name] = original
                del child.__dict__[_ORIGINAL]
                restored += 1
    return restored
