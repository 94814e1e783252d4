"""What every op shares: the choice between the Triton kernels and the PyTorch reference,
the kernel calls as custom ops for ``torch.compile`` (``kernel_op``), and the input checks.

Rule (docs/ops.md#dispatch): Triton when the tensors are on CUDA, or when ``TRITON_INTERPRET=1``
(Triton's CPU interpreter, so tests run the real kernels on CPU tensors); the PyTorch
reference otherwise. ``REPA_E_FAST_OPS=torch`` forces the reference,
``REPA_E_FAST_OPS=triton`` forces the kernels (an error where they cannot run).
float64 inputs always take the reference (the kernels do fp32/bf16/fp16 I/O), unless
triton is forced, which is then a TypeError.

Triton is imported lazily, and only when a kernel is about to run, so
``import repa_e_fast.ops`` works without it (macOS, CPU-only installs).
"""

import functools
import importlib
import os

import torch

OPS_ENV = "REPA_E_FAST_OPS"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
        return True
    except Exception:  # ImportError, or a broken install that fails at import
        return False


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def ops_mode() -> str:
    mode = os.environ.get(OPS_ENV, "").strip().lower() or "auto"
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"{OPS_ENV}={mode!r}: expected 'torch', 'triton' or unset")
    return mode


def _environment():
    """(mode, triton installed, interpreter on). Read at trace time under torch.compile:
    dynamo cannot trace the import test, and a compiled graph keeps the choice it was
    traced with (changing REPA_E_FAST_OPS later does not retrace it)."""
    return ops_mode(), triton_available(), interpreter_enabled()


# What ``@torch.compiler.assume_constant_result`` does, without its cost: that decorator
# imports torch._dynamo (about 1 s, and triton with it) only to set this flag, which would
# make ``import repa_e_fast.ops`` heavy and read TRITON_INTERPRET before the user sets it.
# tests/test_ops_compile.py checks that compiled graphs still treat the result as constant.
_environment._dynamo_marked_constant = True


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """True if ``op`` should run its Triton kernel on these (already validated) tensors."""
    mode, available, interpreted = _environment()
    if mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    kernel_dtypes = all(t.dtype in KERNEL_DTYPES for t in tensors)
    if mode == "triton":
        if not available:
            raise RuntimeError(f"{op}: {OPS_ENV}=triton but triton is not installed")
        if not (on_cuda or interpreted):
            raise RuntimeError(
                f"{op}: {OPS_ENV}=triton needs CUDA tensors or TRITON_INTERPRET=1 "
                f"(got tensors on {tensors[0].device}); unset {OPS_ENV} to use the PyTorch reference")
        if not kernel_dtypes:
            raise TypeError(f"{op}: the Triton kernels take float32/bfloat16/float16, got "
                            f"{sorted({str(t.dtype) for t in tensors})}")
        return True
    return kernel_dtypes and available and (on_cuda or interpreted)


def kernels(name: str):
    """Import ``repa_e_fast.kernels.<name>`` (this is where triton gets imported)."""
    return importlib.import_module(f"repa_e_fast.kernels.{name}")


class KernelOp:
    """A function that launches an op's Triton kernels, registered as the custom op
    ``torch.ops.repa_e_fast.<name>``; each op's autograd.Function calls its kernels only
    through these.

    Dynamo cannot trace a Triton launcher (it imports modules, computes grids in Python and
    reads strides), so while torch.compile traces, a call goes to the custom op: an opaque
    node of one graph whose outputs (shapes, dtypes, layouts) the function registered with
    ``register_fake`` describes, so the surrounding ops are still fused and the region can
    be captured in a CUDA graph. Eager calls run the function directly, the cheaper path (a
    custom-op dispatch costs a few microseconds). A custom op cannot return None, so a
    result that is not needed comes back as an empty tensor.
    """

    def __init__(self, name: str, launch):
        self.name = name
        self.launch = launch
        # Registering imports no Triton: ``launch`` imports its kernel module when it runs.
        self.custom_op = torch.library.custom_op(f"repa_e_fast::{name}", launch, mutates_args=())

    def register_fake(self, fake):
        self.custom_op.register_fake(fake)
        return fake

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return getattr(torch.ops.repa_e_fast, self.name)(*args)
        return self.launch(*args)


def kernel_op(name: str):
    """Decorator: the function becomes the :class:`KernelOp` ``repa_e_fast::<name>``."""
    return lambda launch: KernelOp(name, launch)


# --------------------------------------------------------------------------- validation


def check_tensor(op: str, name: str, t, ndim=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_same_device(op: str, **tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got "
                         + ", ".join(f"{k} on {v}" for k, v in devices.items()))


def check_modulation(op: str, name: str, v, B: int, D: int) -> torch.Tensor:
    """A per-sample modulation vector (adaLN shift / scale / gate) of an x of shape
    ``[B, T, D]``, as ``[B, D]``: ``[B, D]`` and ``[B, 1, D]`` are per sample; ``[D]``,
    ``[1, D]`` and ``[1, 1, D]`` are shared by the batch and broadcast (a stride-0 view, no
    copy; autograd sums its gradient over the batch)."""
    check_tensor(op, name, v, ndim=(1, 2, 3))
    if v.dim() == 3:
        if v.shape[1] != 1:
            raise ValueError(f"{op}: {name} must be [B, D] or [B, 1, D], got {tuple(v.shape)}")
        v = v.squeeze(1)
    if v.dim() == 1:
        v = v.unsqueeze(0)
    if v.shape[1] != D or v.shape[0] not in (1, B):
        raise ValueError(f"{op}: {name} must have shape {(B, D)}, {(1, D)} or {(D,)} to match x, "
                         f"got {tuple(v.shape)}")
    return v.expand(B, D)


def rows_unit_stride(t: torch.Tensor) -> torch.Tensor:
    """A [B, D] tensor the kernels can read: unit column stride (any row stride).

    ``chunk``/slice views of the adaLN projection already qualify and are not copied;
    anything else is copied by ``.contiguous()``.
    """
    return t if t.stride(-1) == 1 else t.contiguous()


def promote(*tensors) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
