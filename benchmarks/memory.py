"""Memory of one REPA-E training step, counted on fake tensors: no GPU, nothing allocated.

    python benchmarks/memory.py --model SiT-XL/2 --batch 32
    python benchmarks/memory.py --smoke                  # tiny models, a few seconds

The step is built by ``benchmarks/throughput.py`` (the same models, optimizers, EMA and
loss module as the timed step) under ``FakeTensorMode`` and run once, forward, backward,
clipping, three AdamW updates and the EMA. Every tensor has its real shape, dtype and
layout but no data, so a full-size SiT-XL/2 step at batch 32 is counted on a laptop. Two
counts are made:

- bytes saved for backward, per component (saved-tensor hooks; a storage counts once, at
  the first component that saves it; parameters do not count: they are in the static part);
- the live bytes of every tensor at every operation (a dispatch mode that follows each
  storage until it is freed); its maximum is the predicted peak.

The step runs as on CUDA: bf16 autocast with CUDA's casting rules (see ``cuda_autocast_rules``),
and for the fast variant the fused ops through their custom-op registrations (the fake
implementations beside each op in ``repa_e_fast/ops/``), a channels_last VAE and loss module.
What the count leaves out: the CUDA context (~0.5 GiB), cuBLAS/cuDNN workspaces and the
caching allocator's fragmentation; the attention kernels save what the CPU's kernels save
(output and log-sum-exp, as flash attention does).
"""

import argparse
import collections
import contextlib
import copy
import functools
import json
import os
import sys
import types
import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import throughput  # noqa: E402
from repa_e_fast.losses.vae_loss import VAERegularizationLoss  # noqa: E402
from repa_e_fast.models.discriminator import NLayerDiscriminator  # noqa: E402
from repa_e_fast.models.encoders import DinoVisionTransformer  # noqa: E402
from repa_e_fast.models.lpips import LPIPS  # noqa: E402
from repa_e_fast.models.sit import SiT  # noqa: E402
from repa_e_fast.models.vae import Decoder, Encoder  # noqa: E402

GIB = 2**30
# torch.cuda.get_device_properties(0).total_memory of an H100 80GB HBM3.
H100_BYTES = 85_017_755_648
VARIANTS = ("reference", "fast")
COMPONENTS = ("DINOv2", "VAE encoder", "VAE decoder", "LPIPS", "discriminator (VAE loss)", "SiT align pass",
              "discriminator (D loss)", "SiT train pass", "other")
# Saved by the VAE sub-step (A) and alive together at its backward; (B) and (C) come after.
VAE_SUBSTEP = COMPONENTS[:6]
D_LOSS_MODE = "loss module, discriminator mode"


def component_of(module, args, stack):
    """The component a module's forward belongs to, or None. Labels that are not in
    COMPONENTS only mark the context (the loss module's mode)."""
    if isinstance(module, VAERegularizationLoss):
        return D_LOSS_MODE if "discriminator" in args[4:5] else "other"
    if isinstance(module, DinoVisionTransformer):
        return "DINOv2"
    if isinstance(module, Encoder):
        return "VAE encoder"
    if isinstance(module, Decoder):
        return "VAE decoder"
    if isinstance(module, LPIPS):
        return "LPIPS"
    if isinstance(module, NLayerDiscriminator):
        return "discriminator (D loss)" if D_LOSS_MODE in stack else "discriminator (VAE loss)"
    if isinstance(module, SiT):
        # The align pass runs the SiT in eval mode, the denoising pass in train mode.
        return "SiT train pass" if module.training else "SiT align pass"
    return None


@contextlib.contextmanager
def component_stack():
    """A list of the labels of the running forwards, innermost last."""
    stack = []

    entered = []  # per module call: whether it pushed a label

    def enter(module, args):
        label = component_of(module, args, stack)
        if label:
            stack.append(label)
        entered.append(bool(label))

    def leave(module, args, output):
        if entered.pop():
            stack.pop()

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
               torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


class SavedBytes:
    """Pack hook that adds each newly saved storage's bytes to the running component."""

    def __init__(self, stack, excluded):
        self.stack = stack
        self.excluded = excluded  # storages of parameters and buffers
        self.seen = {}
        self.by_component = collections.Counter()

    def _forget(self, key, _ref):
        self.seen.pop(key, None)

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.seen and key not in self.excluded:
            self.seen[key] = weakref.ref(storage, functools.partial(self._forget, key))
            label = next((c for c in reversed(self.stack) if c in COMPONENTS), "other")
            self.by_component[label] += storage.nbytes()
        return tensor

    @staticmethod
    def unpack(tensor):
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class LiveBytes(TorchDispatchMode):
    """Follows every storage an operation returns until it is freed: ``peak`` is the most
    bytes alive at once. On fake tensors a data-dependent read (``.item()``, ``bool()``:
    the step's finite checks, AdamW's step count) answers "finite" / 1."""

    def __init__(self):
        super().__init__()
        self.live = {}
        self.current = 0
        self.peak = 0

    def _free(self, key, _ref):
        self.current -= self.live.pop(key)

    def track(self, tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        nbytes = storage.nbytes()
        weakref.finalize(storage, self._free, key, None)
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor

        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self.track(leaf)
        return out


@contextlib.contextmanager
def cuda_autocast_rules():
    """CPU bf16 autocast with CUDA's casting rules where the two differ for the ops of this
    step: on CUDA, GroupNorm, LayerNorm, softmax, sums, exp/log and cosine similarity run
    in fp32 (a bf16 input is upcast, the output is fp32); CPU autocast keeps them in bf16.
    Registered as AutocastCPU kernels, the same dispatcher slot CUDA's rules use, and
    removed on exit."""
    library = torch.library.Library("aten", "IMPL")
    exclude = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
    reduced = (torch.bfloat16, torch.float16)

    def upcast(value):
        if isinstance(value, torch.Tensor) and value.dtype in reduced:
            return value.float()
        return value

    def fp32_kernel(op):
        def kernel(*args, **kwargs):
            args, kwargs = pytree.tree_map(upcast, (args, kwargs))
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                return op(*args, **kwargs)
        return kernel

    def fp32_dtype_kernel(op):  # ops with a dtype argument: computed in fp32 unless given one
        def kernel(*args, **kwargs):
            if args[0].dtype in reduced and kwargs.get("dtype") is None:
                kwargs = {**kwargs, "dtype": torch.float32}
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                return op(*args, **kwargs)
        return kernel

    aten = torch.ops.aten
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name in ("group_norm", "layer_norm", "exp", "log", "rsqrt", "cosine_similarity", "mse_loss", "l1_loss"):
            library.impl(name, fp32_kernel(getattr(aten, name).default), "AutocastCPU")
        for name, overload in (("softmax", "int"), ("log_softmax", "int"), ("sum", "dim_IntList"),
                               ("linalg_vector_norm", "default")):
            qualified = name if overload == "default" else f"{name}.{overload}"
            library.impl(qualified, fp32_dtype_kernel(getattr(getattr(aten, name), overload)), "AutocastCPU")
    try:
        yield
    finally:
        library._destroy()


@contextlib.contextmanager
def fused_ops_as_custom_ops():
    """Route the fused ops through their ``torch.ops.repa_e_fast`` registrations, so fake
    tensors take the fake implementations: the ops choose the custom ops when
    ``torch.compiler.is_compiling()``, which here answers True to ``repa_e_fast.ops`` only.
    TRITON_INTERPRET makes the dispatch pick the kernels on CPU tensors as it does on CUDA."""
    original, previous = torch.compiler.is_compiling, os.environ.get("TRITON_INTERPRET")

    def is_compiling():
        caller = sys._getframe(1).f_globals.get("__name__", "")
        return caller.startswith("repa_e_fast.ops.") or original()

    os.environ["TRITON_INTERPRET"] = "1"
    torch.compiler.is_compiling = is_compiling
    try:
        yield
    finally:
        torch.compiler.is_compiling = original
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def build_step(model_name, batch, variant, smoke):
    """throughput.build_repae's step on the CPU, set up as it is on CUDA (bf16 autocast;
    channels_last VAE and loss module for the fast path). Returns (run, REPAEStep)."""
    captured = {}

    class CapturedStep(throughput.REPAEStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            captured["step"] = self

    original_step, original_to, original_copy = throughput.REPAEStep, torch.nn.Module.to, throughput.copy
    throughput.REPAEStep = CapturedStep
    # Module.to cannot swap fake parameters, nor deepcopy copy their storages.
    torch.nn.Module.to = _to_in_place
    throughput.copy = types.SimpleNamespace(deepcopy=_deepcopy_module)
    try:
        run = throughput.build_repae(model_name, batch, torch.device("cpu"), variant, smoke)
        step = captured["step"]
        step.backend.precision = "bf16"
        if variant == "fast":
            for name in ("vae", "vae_loss"):
                step.backend.models[name].to(memory_format=torch.channels_last)
    finally:
        throughput.REPAEStep, torch.nn.Module.to, throughput.copy = original_step, original_to, original_copy
    return run, step


def _deepcopy_module(module):
    """copy.deepcopy with the parameters and buffers cloned by tensor ops (fake-safe)."""
    memo = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        clone = tensor.detach().clone()
        memo[id(tensor)] = torch.nn.Parameter(clone, tensor.requires_grad) if isinstance(
            tensor, torch.nn.Parameter) else clone
    return copy.deepcopy(module, memo)


def _to_in_place(module, *args, **kwargs):
    """``Module.to`` for the CPU-only build: a move to the CPU is a no-op, a memory format
    is applied to 4-D parameters and buffers in place."""
    device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    if dtype is not None or (device is not None and device.type != "cpu"):
        raise ValueError(f"memory.py builds on the CPU only, got Module.to({args}, {kwargs})")
    if memory_format is not None:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.dim() == 4:
                tensor.data = tensor.data.contiguous(memory_format=memory_format)
    return module


def _bytes(tensors):
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
    return total


def measure(model_name, batch, variant, smoke, fake=True):
    """Count one step. ``fake=False`` runs it for real (the test compares the two counts)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    global_step = 10**6  # past discriminator_start: every loss term is active
    live = LiveBytes()
    with contextlib.ExitStack() as stack:
        if fake:
            stack.enter_context(FakeTensorMode())
        if variant == "fast":
            stack.enter_context(fused_ops_as_custom_ops())
        stack.enter_context(cuda_autocast_rules())
        stack.enter_context(live)
        run, step = build_step(model_name, batch, variant, smoke)
        backend = step.backend
        modules = dict(backend.modules, ema=step.ema, **{f"encoder{i}": e for i, e in enumerate(step.encoders)})
        state = [t for m in modules.values() for t in list(m.parameters()) + list(m.buffers())]
        excluded = {t.untyped_storage()._cdata for t in state}
        static_before = live.current
        live.peak = live.current
        labels = stack.enter_context(component_stack())
        saved = SavedBytes(labels, excluded)
        with saved.hooks():
            logs = run(global_step)
        if step.last_fault:
            raise RuntimeError(f"the counted step skipped its update ({step.last_fault})")
        del logs
        optimizer_state = [t for o in backend.optimizers.values() for s in o.state.values()
                           for t in s.values() if isinstance(t, torch.Tensor)]
        result = {
            "variant": variant, "model": "tiny" if smoke else model_name, "batch": batch, "fake": fake,
            "saved_bytes": {c: saved.by_component.get(c, 0) for c in COMPONENTS},
            "parameter_bytes": {name: _bytes(list(m.parameters()) + list(m.buffers())) for name, m in modules.items()},
            # set_to_none after each update: gradients exist during the step, counted here as
            # fp32 copies of every trainable parameter
            "gradient_bytes": {name: sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
                               for name, m in backend.modules.items()},
            "optimizer_bytes": _bytes(optimizer_state),
            "live_before_step_bytes": static_before,
            "peak_bytes": live.peak,
        }
    return result


# Beyond the counted tensors: CUDA context, cuDNN/cuBLAS workspaces, allocator fragmentation.
HEADROOM = 0.85


def fits(result, capacity=H100_BYTES):
    """'yes' under 85% of the device, 'tight' up to 100% (the uncounted part decides), else 'NO'."""
    if result["peak_bytes"] <= HEADROOM * capacity:
        return "yes"
    return "tight" if result["peak_bytes"] <= capacity else "NO"


def print_table(results, capacity=H100_BYTES, unit=GIB):
    names = [r["variant"] for r in results]
    unit_name = "GiB" if unit == GIB else "MiB"
    title = f"bytes saved for backward, {unit_name}"
    print(f"\n{title:<34}" + "".join(f"{n:>12}" for n in names))
    for component in COMPONENTS:
        print(f"  {component:<32}" + "".join(f"{r['saved_bytes'][component] / unit:>12.2f}" for r in results))
    print(f"  {'VAE sub-step, alive together':<32}"
          + "".join(f"{sum(r['saved_bytes'][c] for c in VAE_SUBSTEP) / unit:>12.2f}" for r in results))
    print(f"parameters and buffers, {unit_name}")
    for model in results[0]["parameter_bytes"]:
        label = {"sit": "SiT", "vae": "VAE", "vae_loss": "loss module (D + LPIPS)", "ema": "EMA (SiT copy)",
                 "encoder0": "DINOv2"}.get(model, model)
        print(f"  {label:<32}" + "".join(f"{r['parameter_bytes'][model] / unit:>12.2f}" for r in results))
    print(f"  {'gradients (fp32)':<32}" + "".join(f"{sum(r['gradient_bytes'].values()) / unit:>12.2f}" for r in results))
    print(f"  {'AdamW states (fp32 m, v)':<32}" + "".join(f"{r['optimizer_bytes'] / unit:>12.2f}" for r in results))
    title = f"predicted peak (live tensors), {unit_name}"
    print(f"{title:<34}" + "".join(f"{r['peak_bytes'] / unit:>12.2f}" for r in results))
    print(f"{f'fits in {capacity / GIB:.1f} GiB (H100 80GB)':<34}"
          + "".join(f"{fits(r, capacity):>12}" for r in results))
    print(f"(counted on fake tensors, not measured; 'yes' leaves {100 - 100 * HEADROOM:.0f}% for the CUDA context, "
          "workspaces and fragmentation, which are not counted)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SiT-XL/2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--smoke", action="store_true", help="tiny models (the throughput smoke step)")
    parser.add_argument("--out", help="also write the counts to this JSON file")
    args = parser.parse_args(argv)
    from repa_e_fast.models.sit import SIT_MODEL_NAMES

    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS) or args.batch < 1 or (not args.smoke and args.model not in SIT_MODEL_NAMES):
        print(f"memory.py: variants from {','.join(VARIANTS)}, --batch >= 1, --model one of "
              f"{', '.join(SIT_MODEL_NAMES)}", file=sys.stderr)
        return 2
    results = [measure(args.model, args.batch, variant, args.smoke) for variant in variants]
    print(f"REPA-E step, {'tiny models' if args.smoke else args.model + ' + f8d4 VAE + DINOv2-B'}, batch {args.batch}, "
          "bf16 autocast")
    print_table(results, unit=2**20 if args.smoke else GIB)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
