"""One rank of tests/test_multinode.py, started by a real launcher (torchrun or the deepspeed
launcher) inside a network namespace: the runs of tests/_distributed_harness.py, with the
process group built from the launcher's environment (env://) instead of spawned ranks.

    python tests/_multinode_rank.py OUT_DIR RUN [RUN ...]     (RUN: ddp, ds_zero2, ds_zero2_resume)

Rank 0 writes OUT_DIR/multinode_rank0.pt: the runs' records and, per run, the bytes every
collective carried during the training steps (counted by wrapping torch.distributed's
collectives and, for DDP's C++ reducer, a counting communication hook).
"""

import copy
import logging
import os
import pathlib
import sys
from collections import defaultdict

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _distributed_harness as harness  # noqa: E402  (sets DS_ACCELERATOR=cpu, puts the repo first)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402

# torch.distributed function -> how its payload is named in the counts
COLLECTIVES = ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base",
               "all_gather", "all_gather_into_tensor", "_all_gather_base", "broadcast", "all_reduce_coalesced")


class ByteCounter:
    """Bytes per (category, collective) while ``on``: the payload a call reduces or gathers
    (for a reduce-scatter its full input, for an all-gather its full output), as the scaling
    model (benchmarks/scaling.py) states its volumes before the ring factors.

    Categories: "gradients" (DDP's bucket all-reduces, the discriminator's flat all-reduce,
    whatever ZeRO's gradient averaging calls), "parameters" (ZeRO's all-gather of the updated
    partitions) and "control" (everything else: norms, finite flags, BN statistics, logs)."""

    def __init__(self):
        self.on = False
        self.category = None  # set while a known gradient path runs
        self.bytes = defaultdict(int)
        self.calls = defaultdict(int)

    def add(self, op: str, nbytes: int) -> None:
        if not self.on:
            return
        category = self.category or ZERO_CATEGORIES.get(op, "control")
        self.bytes[f"{category}/{op}"] += int(nbytes)
        self.calls[f"{category}/{op}"] += 1

    def install(self) -> None:
        """Wraps the module-level collectives (before DeepSpeed's comm layer captures them)."""
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            self.add(name, payload_bytes(name, args, kwargs))
            return original(*args, **kwargs)
        return counted

    def tagged(self, category, function):
        def call(*args, **kwargs):
            self.category = category
            try:
                return function(*args, **kwargs)
            finally:
                self.category = None
        return call

    def ddp_hook(self, state, bucket):
        return self.tagged("gradients", default_hooks.allreduce_hook)(state, bucket)  # calls dist.all_reduce


# Untagged all-gathers during the steps are ZeRO's all-gather of the updated weight partitions.
ZERO_CATEGORIES = {"all_gather": "parameters", "all_gather_into_tensor": "parameters", "_all_gather_base": "parameters"}


def tensor_bytes(value) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def payload_bytes(name, args, kwargs) -> int:
    if name in ("all_gather_into_tensor", "_all_gather_base"):
        return tensor_bytes(kwargs.get("output_tensor", args[0] if args else None))
    if name == "all_gather":
        return tensor_bytes(kwargs.get("tensor_list", args[0] if args else None))
    if name in ("reduce_scatter_tensor", "_reduce_scatter_base"):
        return tensor_bytes(kwargs.get("input", args[1] if len(args) > 1 else kwargs.get("input_tensor")))
    if name == "reduce_scatter":
        return tensor_bytes(kwargs.get("input_list", args[1] if len(args) > 1 else None))
    key = "tensors" if name == "all_reduce_coalesced" else "tensor"
    return tensor_bytes(kwargs.get(key, args[0] if args else None))


def trainable_counts(backend) -> dict:
    counts = {"sit": backend.unwrap("sit"), "vae": backend.unwrap("vae"), "vae_loss": backend.unwrap("vae_loss")}
    return {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in counts.items()}


def counted_run(name, base_models, base_ema, rank, world, counter, out):
    """A harness run with the byte counter on during its training steps only (not during the
    engines' construction broadcasts nor the final optimizer-state gathering)."""
    if name == "ds_zero2_resume":
        return harness.resume_run(base_models, base_ema, rank, world, out), None
    run = harness.RUNS[name]
    models, ema = copy.deepcopy(base_models), copy.deepcopy(base_ema)
    backend = harness.make_backend(run.distributed, run.template, run.precision, run.accumulation, models)
    if run.distributed == "ddp":
        for module in backend.models.values():
            if isinstance(module, torch.nn.parallel.DistributedDataParallel):
                module.register_comm_hook(dist.group.WORLD, counter.ddp_hook)
        # the discriminator's flat all-reduce (not a DDP module)
        backend._reduce_gradients = counter.tagged("gradients", backend._reduce_gradients)
    else:  # ZeRO's gradient reduction (DeepSpeed 0.19: a bucket all-reduce, or reduces to each owner)
        for engine in backend.models.values():
            engine.optimizer.average_tensor = counter.tagged("gradients", engine.optimizer.average_tensor)
    counter.bytes.clear(), counter.calls.clear()

    def stop_counting(index, backend, ema):
        if index == run.micro_batches - 1:
            counter.on = False

    counter.on = True
    _, _, record = harness.train(run, models, ema, rank, world, run.distributed, backend=backend, on_step=stop_counting)
    if run.distributed == "deepspeed":
        record["optimizer_kinds"] = dict(backend.optimizer_kinds)
    counts = {"bytes": dict(counter.bytes), "calls": dict(counter.calls), "steps": run.micro_batches,
              "trainable": trainable_counts(backend)}
    return record, counts


def main(out: str, names):
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    counter = ByteCounter()
    counter.install()
    dist.init_process_group("gloo", timeout=harness.TIMEOUT)
    if any(name.startswith("ds_") for name in names):
        import deepspeed.ops
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see the harness's rank_main
    base_models, base_ema = harness.build_models()
    results, counts = {}, {}
    for name in names:
        results[name], counts[name] = counted_run(name, base_models, base_ema, rank, world, counter, out)
        dist.barrier()
    if rank == 0:
        hosts = [None] * world
        dist.all_gather_object(hosts, os.environ.get("GLOO_SOCKET_IFNAME"))
        torch.save({"results": results, "counts": counts, "interfaces": hosts, "world": world},
                   pathlib.Path(out) / "multinode_rank0.pt")
    else:
        dist.all_gather_object([None] * world, os.environ.get("GLOO_SOCKET_IFNAME"))
    dist.destroy_process_group()


if __name__ == "__main__":
    arguments = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]  # the deepspeed launcher's
    if len(arguments) < 2:
        raise SystemExit(__doc__)
    main(arguments[0], arguments[1:])
