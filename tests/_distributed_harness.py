"""Multi-process runs for tests/test_distributed.py (CPU, gloo, DS_ACCELERATOR=cpu).

    python tests/_distributed_harness.py OUT_DIR [RUN ...]

The parent process runs the single-process references (SingleProcessBackend, global batch
2b), then spawns 2 ranks (torch.multiprocessing, 127.0.0.1, a free port) that run every
requested run one after another on per-rank batches b (the global tensors sliced by rank),
and writes OUT_DIR/results.json: per run the largest differences from its reference and
the facts the tests assert on. Every random draw of the step (posterior noise, t, noise) and
the encoder targets are injected; label dropout is off; the SiT latent BN and the
discriminator's BatchNorms are global BatchNorms. Collectives time out, so a hang is an error.
"""

import copy
import dataclasses
import datetime
import json
import logging
import math
import os
import pathlib
import socket
import sys
import time
import traceback
from typing import Optional

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from repa_e_fast.engine import build  # noqa: E402
from repa_e_fast.engine.step import REPAEStep  # noqa: E402
from repa_e_fast.engine.sync_batchnorm import convert_to_global_batchnorm  # noqa: E402
from repa_e_fast.losses.vae_loss import VAELossConfig, VAERegularizationLoss  # noqa: E402
from repa_e_fast.models.sit import SiT  # noqa: E402
from repa_e_fast.models.vae import AutoencoderKL  # noqa: E402

# oneDNN picks its convolution algorithm by batch size on some CPUs, so a conv over b images
# differs in the last bit from the same images inside a batch of 2b; the discriminator's
# BatchNorms amplify that to ~5e-5 after 3 steps (measured on this project's CI-type machine,
# also at commit 0c92915). PyTorch's native convolutions are batch-invariant: the comparison
# then measures the backends, not oneDNN (ddp: discriminator 1.7e-6).
torch.backends.mkldnn.enabled = False

WORLD = 2
PER_RANK = 2  # b; the single-process reference uses 2b
STEPS = 3     # k
CONFIGS = REPO / "configs" / "deepspeed"
# eps 1e-6, not the official 1e-8: several parameters have a mathematically zero gradient
# (conv biases right before a GroupNorm with one channel per group, attention key biases),
# and with eps 1e-8 Adam turns the fp32 rounding noise of that zero into +-lr updates, so two
# exact implementations differ by ~lr there. 1e-6 keeps the comparison about the backends.
OPTIMIZER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
TIMEOUT = datetime.timedelta(seconds=60)


@dataclasses.dataclass(frozen=True)
class Run:
    distributed: str               # "ddp" or "deepspeed"
    template: Optional[str]        # configs/deepspeed/*.json
    precision: str = "fp32"
    accumulation: int = 1
    micro_batches: int = STEPS
    fault: Optional[int] = None    # micro-batch whose sit_loss is NaN on rank 1

    @property
    def reference_key(self):
        return (self.precision, self.accumulation, self.micro_batches, self.fault)


RUNS = {
    "ddp": Run("ddp", None),
    "ds_zero0": Run("deepspeed", "zero0_fp32.json"),
    "ds_zero1": Run("deepspeed", "zero1_bf16.json"),  # the bf16 templates without their autocast section
    "ds_zero2": Run("deepspeed", "zero2_bf16.json"),
    "ds_zero2_accum": Run("deepspeed", "zero2_bf16.json", accumulation=2, micro_batches=4),
    "ds_zero1_skip": Run("deepspeed", "zero1_bf16.json", fault=1),
    "ds_zero2_skip": Run("deepspeed", "zero2_bf16.json", fault=1),
    # A fault on the first micro-step of a window: the gradients ZeRO accumulated must go too.
    "ds_zero1_accum_skip": Run("deepspeed", "zero1_bf16.json", accumulation=2, micro_batches=4, fault=0),
    "ds_zero2_accum_skip": Run("deepspeed", "zero2_bf16.json", accumulation=2, micro_batches=4, fault=0),
    # The templates as they are. Low precision is compared on the first step only (same
    # weights, so only autocast rounding differs); after an update Adam amplifies it.
    "ds_zero1_bf16": Run("deepspeed", "zero1_bf16.json", precision="bf16", micro_batches=2),
    "ds_zero2_bf16": Run("deepspeed", "zero2_bf16.json", precision="bf16", micro_batches=2),
    "ds_zero2_fp16": Run("deepspeed", "zero2_fp16.json", precision="fp16", micro_batches=2),
}
OTHER = ("ds_zero2_resume", "ds_zero3")


# -- models and data --------------------------------------------------------------------------
def build_models(seed: int = 0):
    torch.manual_seed(seed)
    sit = SiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
              z_dims=[8], projector_dim=16, encoder_depth=1, class_dropout_prob=0.0)
    with torch.no_grad():  # leave the zero init so every path carries gradient
        for p in sit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ema = copy.deepcopy(sit).requires_grad_(False)
    sit.pos_embed.requires_grad_(True)  # before any wrapper collects the trainable parameters
    vae = AutoencoderKL(embed_dim=4, ch_mult=(1, 2, 2, 2), ch=32, num_res_blocks=1, resolution=32)
    loss_fn = VAERegularizationLoss(VAELossConfig())
    return {"sit": sit, "vae": vae, "vae_loss": loss_fn}, ema


def global_batches(count: int, batch: int = WORLD * PER_RANK, seed: int = 1234):
    gen = torch.Generator().manual_seed(seed)
    return [dict(images=torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=gen),
                 labels=torch.randint(0, 5, (batch,), generator=gen),
                 zs=[torch.randn(batch, 4, 8, generator=gen)],
                 posterior_noise=torch.randn(batch, 4, 4, 4, generator=gen),
                 time_input=torch.rand(batch, 1, 1, 1, generator=gen),
                 noises=torch.randn(batch, 4, 4, 4, generator=gen)) for _ in range(count)]


def rows(data: dict, rank: int, world: int) -> dict:
    if world == 1:
        return data
    part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return {k: ([t[part] for t in v] if isinstance(v, list) else v[part]) for k, v in data.items()}


class FinalLayerFault:
    """Makes the SiT's final-layer output NaN for rank 1's rows while ``on``. The final layer
    runs only in pass (C) (the align pass stops at encoder_depth), so sit_loss is NaN on one
    rank after the VAE and the discriminator have already back-propagated: every engine
    holds gradients that skip() must drop."""

    def __init__(self, sit, world: int, rank: int):
        self.on = False
        self.world, self.rank = world, rank
        sit.final_layer.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        if not self.on:
            return output
        if self.world == 1:
            output = output.clone()
            output[PER_RANK:] = float("nan")
            return output
        return output * float("nan") if self.rank == 1 else output


class SplitBatchNorm2d(nn.BatchNorm2d):
    """The single-process reference's BatchNorm: train-mode statistics over the whole batch,
    summed as GlobalBatchNorm2d sums them on WORLD ranks (per-rank partial sums, then centred
    squares). With nn.BatchNorm2d's own kernel the reference differs from DDP and DeepSpeed
    alike by ~5e-5 in the discriminator after 3 steps (its BatchNorms amplify last-bit
    differences of the statistics); this keeps the comparison about the backends."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        x32, dims = x.float(), (0, 2, 3)
        count = torch.tensor([float(x.shape[0] * x.shape[2] * x.shape[3])])
        mean = sum(part.sum(dims) for part in x32.chunk(WORLD)) / count
        centred = x32 - mean.view(1, -1, 1, 1)
        var = sum(part.square().sum(dims) for part in centred.chunk(WORLD)) / count
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            unbiased = var * (count / (count - 1))
            self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(unbiased, alpha=self.momentum)
        out = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(x.dtype)


def ds_config(template: str, precision: str) -> dict:
    config = json.loads((CONFIGS / template).read_text())
    if precision == "fp32":
        config.pop("torch_autocast", None)  # a bf16 template run in fp32, for exactness
    return config


def make_backend(kind, template, precision, accumulation, models):
    if kind == "single":
        for name in ("sit", "vae_loss"):
            for module in models[name].modules():
                if type(module) is nn.BatchNorm2d:
                    module.__class__ = SplitBatchNorm2d  # same parameters and buffers
    else:
        for name in ("sit", "vae_loss"):  # global BN: the SiT latent BN, the discriminator's BNs
            convert_to_global_batchnorm(models[name])
    return build.make_backend(kind, models, {name: OPTIMIZER for name in models}, precision, accumulation,
                              ds_config=ds_config(template, precision) if kind == "deepspeed" else None,
                              micro_batch_size=PER_RANK, max_grad_norm=1.0)


def scalars(logs: dict, world: int) -> dict:
    """The logged values averaged over ranks, as the official trainer logs them (losses are
    per-rank batch means; grad norms are global already)."""
    names = sorted(logs)
    values = torch.stack([logs[name].detach().float().mean() for name in names])
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return dict(zip(names, values.tolist()))


def snapshot(backend, ema) -> dict:
    def copy_state(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {"sit": copy_state(backend.unwrap("sit")), "vae": copy_state(backend.unwrap("vae")),
            "vae_loss": copy_state(backend.unwrap("vae_loss").discriminator), "ema": copy_state(ema)}


def optimizer_states(backend) -> dict:
    return copy.deepcopy(backend.optimizer_state_dicts())


def train(run: Run, models, ema, rank: int, world: int, kind: str, batches=None, start: int = 0, backend=None,
          on_step=None):
    """Runs ``run``'s micro-batches; returns (backend, step, record)."""
    faults = FinalLayerFault(models["sit"], world, rank)
    if backend is None:
        backend = make_backend(kind, run.template, run.precision, run.accumulation, models)
    step = REPAEStep(backend, ema)
    batches = batches if batches is not None else global_batches(run.micro_batches)
    record = {"logs": [], "scales": [], "faults": [], "start": snapshot(backend, ema)}
    for index in range(start, len(batches)):
        faults.on = index == run.fault
        if index == run.fault and kind == "deepspeed":
            record["before_fault"] = (snapshot(backend, ema), optimizer_states(backend))
        data = rows(batches[index], rank, world)
        logs = step(data["images"], data["labels"], index // run.accumulation, zs=data["zs"],
                    posterior_noise=data["posterior_noise"], time_input=data["time_input"], noises=data["noises"])
        record["logs"].append(scalars(logs, world))
        record["faults"].append(step.last_fault)
        record["scales"].append(backend.scaler.get_scale() if backend.scaler is not None else None)
        if index == run.fault and kind == "deepspeed":
            record["after_fault"] = (snapshot(backend, ema), optimizer_states(backend))
            record["counters"] = {n: [e.global_steps, e.skipped_steps, e.micro_steps]
                                  for n, e in backend.models.items()}
        if run.accumulation > 1 and index == run.accumulation - 1:
            record["window1"] = snapshot(backend, ema)
        if on_step is not None:
            on_step(index, backend, ema)
    record["weights"] = snapshot(backend, ema)
    record["optimizers"] = optimizer_states(backend)
    return backend, step, record


# -- runs inside the ranks ------------------------------------------------------------------------
def distributed_run(name, base_models, base_ema, rank, world, out):
    if name == "ds_zero2_resume":
        return resume_run(base_models, base_ema, rank, world, out)
    if name == "ds_zero3":
        return stage3_run(base_models, base_ema)
    run = RUNS[name]
    backend, _, record = train(run, copy.deepcopy(base_models), copy.deepcopy(base_ema), rank, world, run.distributed)
    if run.distributed == "deepspeed":
        record["optimizer_kinds"] = dict(backend.optimizer_kinds)
        record["was_step_applied"] = {n: bool(e.was_step_applied()) for n, e in backend.models.items()}
    return record


def resume_run(base_models, base_ema, rank, world, out):
    """Save at step k, load into fresh engines, continue to 2k == an uninterrupted 2k run."""
    run = Run("deepspeed", "zero2_bf16.json", micro_batches=2 * STEPS)
    batches = global_batches(2 * STEPS)
    checkpoint = pathlib.Path(out) / "checkpoint"
    saved = {}

    def save(index, backend, ema):
        if index != STEPS - 1:
            return
        if rank == 0:
            checkpoint.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        backend.save_checkpoint(checkpoint)
        if rank == 0:  # the EMA belongs to the trainer, which saves it beside the backend
            torch.save(ema.state_dict(), checkpoint / "ema.pt")
        dist.barrier()
        saved["optimizers"] = optimizer_states(backend)

    _, _, uninterrupted = train(run, copy.deepcopy(base_models), copy.deepcopy(base_ema), rank, world, "deepspeed",
                                batches, on_step=save)
    models, ema = build_models(seed=99)  # other weights: everything must come from the files
    backend = make_backend("deepspeed", run.template, run.precision, run.accumulation, models)
    backend.load_checkpoint(checkpoint)
    ema.load_state_dict(torch.load(checkpoint / "ema.pt", weights_only=True))
    loaded_optimizers = optimizer_states(backend)
    _, _, resumed = train(run, models, ema, rank, world, "deepspeed", batches, start=STEPS, backend=backend)
    return {"max_error": {k: max_diff(uninterrupted["weights"][k], resumed["weights"][k])
                          for k in uninterrupted["weights"]},
            "optimizer_max_error": max_diff(uninterrupted["optimizers"], resumed["optimizers"]),
            "loaded_optimizer_max_error": max_diff(saved["optimizers"], loaded_optimizers),
            "log_max_error": compare_logs(uninterrupted["logs"][STEPS:], resumed["logs"]),
            "counters": {n: [e.global_steps, e.micro_steps] for n, e in backend.models.items()},
            "files": sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())}


def stage3_run(base_models, base_ema):
    try:
        from repa_e_fast.engine.backend_deepspeed import DeepSpeedBackend
        config = ds_config("zero2_bf16.json", "fp32")
        config["zero_optimization"] = {"stage": 3}
        DeepSpeedBackend(copy.deepcopy(base_models), {n: OPTIMIZER for n in base_models}, config,
                         micro_batch_size=PER_RANK)
    except NotImplementedError as error:
        return {"raised": "NotImplementedError", "message": str(error)}
    return {"raised": None}


# -- comparisons ----------------------------------------------------------------------------------
def max_diff(a, b) -> float:
    """Largest absolute difference over matching tensors of two nested structures."""
    if isinstance(a, dict):
        if set(a) != set(b):
            raise KeyError(f"key mismatch: {sorted(map(str, set(a) ^ set(b)))[:5]}")
        return max([max_diff(a[k], b[k]) for k in a], default=0.0)
    if isinstance(a, (list, tuple)):
        return max([max_diff(x, y) for x, y in zip(a, b)], default=0.0)
    if torch.is_tensor(a):
        if a.shape != b.shape:
            raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    return 0.0 if a == b else float("inf")


def max_abs(a) -> float:
    if isinstance(a, dict):
        return max([max_abs(v) for v in a.values()], default=0.0)
    if isinstance(a, (list, tuple)):
        return max([max_abs(v) for v in a], default=0.0)
    return float(a.double().abs().max()) if torch.is_tensor(a) and a.numel() else 0.0


def params_only(state: dict) -> dict:
    return {k: v for k, v in state.items() if "running" not in k and "num_batches" not in k}


def compare_logs(reference: list, ours: list) -> dict:
    """Per logged name, the largest relative difference over the steps (NaN must match NaN)."""
    if len(reference) != len(ours):
        raise ValueError(f"{len(reference)} vs {len(ours)} logged steps")
    worst = {}
    for ref, got in zip(reference, ours):
        if set(ref) != set(got):
            raise KeyError(f"logged names differ: {sorted(set(ref) ^ set(got))}")
        for name, value in ref.items():
            finite = (math.isfinite(value), math.isfinite(got[name]))
            if finite != (True, True):  # a NaN/inf norm (fault, fp16 overflow) must match one
                error = 0.0 if finite == (False, False) else float("inf")
            elif value == got[name]:
                error = 0.0
            else:
                error = abs(value - got[name]) / max(abs(value), 1e-12)
            worst[name] = max(worst.get(name, 0.0), error)
    return worst


def compare_optimizers(reference: dict, ours: dict) -> dict:
    """Torch AdamW state dicts: the same layout (param groups, parameter indices with state);
    per model the largest state difference relative to the largest state value."""
    keys = ("params", "lr", "betas", "eps", "weight_decay")
    worst = {}
    for name, ref in reference.items():
        got = ours[name]
        layout = [[g[k] if k != "betas" else tuple(g[k]) for k in keys] for g in ref["param_groups"]]
        if layout != [[g[k] if k != "betas" else tuple(g[k]) for k in keys] for g in got["param_groups"]]:
            raise ValueError(f"{name}: param groups differ")
        if set(ref["state"]) != set(got["state"]):
            raise KeyError(f"{name}: the parameters with optimizer state differ")
        worst[name] = max_diff(ref["state"], got["state"]) / max(max_abs(ref["state"]), 1e-30)
    return worst


def non_finite_norms(logs: list) -> list:
    return [sorted(k for k, v in step.items() if k.startswith("grad_norm") and not math.isfinite(v))
            for step in logs]


def weight_errors(reference: dict, ours: dict) -> dict:
    return {k: max_diff(reference[k], ours[k]) for k in reference}


def summarise(name: str, reference: Optional[dict], got: dict) -> dict:
    if "error" in got or reference is None:
        return got
    entry = {"faults": got["faults"], "reference_faults": reference["faults"],
             "scales": got["scales"], "reference_scales": reference["scales"],
             "non_finite_norms": non_finite_norms(got["logs"]),
             "reference_non_finite_norms": non_finite_norms(reference["logs"])}
    if RUNS[name].precision != "fp32":
        entry["step0_log_rel_error"] = compare_logs(reference["logs"][:1], got["logs"][:1])
        entry["changed"] = {k: max_diff(params_only(reference["start"][k]), params_only(got["weights"][k]))
                            for k in ("sit", "vae", "vae_loss")}
        entry["all_losses_finite"] = all(math.isfinite(v) for logs in got["logs"] for k, v in logs.items()
                                         if not k.startswith("grad_norm"))
        return entry
    entry["max_error"] = weight_errors(reference["weights"], got["weights"])
    entry["log_rel_error"] = compare_logs(reference["logs"], got["logs"])
    if "window1" in reference:
        entry["window1_max_error"] = weight_errors(reference["window1"], got["window1"])
    if got.get("optimizers") is not None:
        entry["optimizer_rel_error"] = compare_optimizers(reference["optimizers"], got["optimizers"])
    for key in ("optimizer_kinds", "was_step_applied", "counters"):
        if key in got:
            entry[key] = got[key]
    if "before_fault" in got:
        (w0, o0), (w1, o1) = got["before_fault"], got["after_fault"]
        entry["skip_weight_change"] = max(max_diff(params_only(w0[k]), params_only(w1[k])) for k in w0)
        entry["skip_optimizer_change"] = max_diff(o0, o1)
    return entry


# -- process plumbing -----------------------------------------------------------------------------
def rank_main(rank, world, port, out, names):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    if any(name.startswith("ds_") for name in names):
        import deepspeed.ops
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
        # The CPU accelerator JIT-compiles a shared-memory all-reduce for DeepSpeed INFERENCE
        # when its communication backend starts (~100 s on 2 cores, once per machine);
        # training never calls it. Marking it unavailable keeps the tests fast on a clean machine.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    base_models, base_ema = build_models()
    results, timings = {}, {}
    for name in names:
        start = time.perf_counter()
        try:
            results[name] = distributed_run(name, base_models, base_ema, rank, world, out)
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            print(f"rank {rank}, run {name}:\n{results[name]['error']}", file=sys.stderr, flush=True)
        timings[name] = round(time.perf_counter() - start, 2)
        dist.barrier()
    if rank == 0:
        torch.save({"results": results, "timings": timings}, pathlib.Path(out) / "rank0.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(out: str, names):
    out_dir = pathlib.Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(names) or list(RUNS) + list(OTHER)
    unknown = set(names) - set(RUNS) - set(OTHER)
    if unknown:
        raise SystemExit(f"unknown runs {sorted(unknown)}")
    torch.set_num_threads(2)
    begin = time.perf_counter()
    base_models, base_ema = build_models()
    references, timings = {}, {}
    for name in names:
        if name in RUNS and RUNS[name].reference_key not in references:
            start = time.perf_counter()
            _, _, references[RUNS[name].reference_key] = train(
                RUNS[name], copy.deepcopy(base_models), copy.deepcopy(base_ema), 0, 1, "single")
            timings[f"reference {RUNS[name].reference_key}"] = round(time.perf_counter() - start, 2)

    import torch.multiprocessing as mp
    start = time.perf_counter()
    mp.start_processes(rank_main, args=(WORLD, free_port(), str(out_dir), names), nprocs=WORLD, join=True,
                       start_method="spawn")
    timings["2 ranks, all runs"] = round(time.perf_counter() - start, 2)
    ranks = torch.load(out_dir / "rank0.pt", weights_only=False)
    timings.update({f"run {k}": v for k, v in ranks["timings"].items()})

    summary = {}
    for name in names:
        reference = references[RUNS[name].reference_key] if name in RUNS else None
        summary[name] = summarise(name, reference, ranks["results"][name])
    timings["total"] = round(time.perf_counter() - begin, 2)
    summary["timings"] = timings
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print(json.dumps(main(sys.argv[1], sys.argv[2:]), indent=1, default=str))
