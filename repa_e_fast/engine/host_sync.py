"""Count the host synchronisations of a piece of code (tests and ``throughput.py --count-syncs``).

A host synchronisation is any operation whose result the CPU must wait for: reading a
tensor's value into Python (``item``, ``bool``/``if tensor``, ``float``, ``int``,
``tolist``, ``numpy``), an op whose output shape depends on the data (``nonzero``,
``masked_select``, ``unique``, ...) and a copy from an accelerator to the CPU. On a GPU each
one drains the queue of launched kernels, so the GPU idles while the CPU launches the next
ones. The counter works on the CPU as well: it sees the operations, not the waits.
"""

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose result (a Python scalar or an output shape) is only known once the data is.
_DATA_DEPENDENT_OPS = {
    "aten._local_scalar_dense", "aten.nonzero", "aten.nonzero_static", "aten.masked_select", "aten.unique",
    "aten._unique", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.equal",
    "aten.is_nonzero", "aten.allclose",
}
# Tensor methods that read the data into Python without an aten op on a CPU tensor.
_READING_METHODS = {"tolist", "numpy"}


def _op_name(func) -> str:
    return str(getattr(func, "overloadpacket", func))


class _ReadingMethods(TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _READING_METHODS and self.counter.depth == 0:
            self.counter.record(f"Tensor.{name}")
            self.counter.depth += 1  # its own device-to-host copy is the same sync
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self.counter.depth -= 1
        return func(*args, **(kwargs or {}))


class _DataDependentOps(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if self.counter.depth == 0:
            if name in _DATA_DEPENDENT_OPS:
                if not self.counter.is_host_read(args[0]):
                    self.counter.record(name)
            elif name in ("aten._to_copy", "aten.copy_") and _copies_to_host(func, args, kwargs):
                self.counter.record(f"{name} to cpu")
        return func(*args, **kwargs)


def _copies_to_host(func, args, kwargs) -> bool:
    source = args[1] if _op_name(func) == "aten.copy_" else args[0]
    if not isinstance(source, torch.Tensor) or source.device.type == "cpu":
        return False
    if _op_name(func) == "aten.copy_":
        return args[0].device.type == "cpu"
    device = kwargs.get("device")
    return device is not None and torch.device(device).type == "cpu"


class HostSyncCounter:
    """``with HostSyncCounter(device) as syncs: ...`` then ``syncs.count`` and ``syncs.events``
    (a Counter of what synchronised: ``aten._local_scalar_dense`` for item/bool/float/int,
    ``Tensor.tolist``, ``aten.nonzero``, ...). Backward passes are counted too (the autograd
    engine carries the modes to the thread that runs them).

    Reading a tensor that lives on the CPU is no device synchronisation. On a GPU the
    counter therefore skips reads of CPU tensors; on the CPU it cannot tell them apart, so
    ``optimizers`` names the torch optimizers whose step counters stay on the host whatever
    the device (non-fused, non-capturable AdamW reads them with ``item()`` on purpose);
    reads of those counters, also of ones created inside the block, are not counted."""

    def __init__(self, device=torch.device("cpu"), optimizers=()):
        self.events = Counter()
        self.depth = 0
        self.device = torch.device(device)
        self.optimizers = list(optimizers)
        self._modes = (_ReadingMethods(self), _DataDependentOps(self))

    def is_host_read(self, tensor) -> bool:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
            return False
        if self.device.type != "cpu":
            return True
        pointer = tensor.untyped_storage().data_ptr()
        return any(pointer == counter.untyped_storage().data_ptr()
                   for counter in optimizer_step_counters(self.optimizers))

    @property
    def count(self) -> int:
        return sum(self.events.values())

    def record(self, name: str) -> None:
        self.events[name] += 1

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False


def optimizer_step_counters(optimizers):
    """The step counters that torch optimizers keep on the CPU (``state["step"]`` of a
    non-fused, non-capturable optimizer)."""
    return [state["step"] for optimizer in optimizers for state in optimizer.state.values()
            if isinstance(state.get("step"), torch.Tensor) and not optimizer.defaults.get("fused")
            and not optimizer.defaults.get("capturable")]
