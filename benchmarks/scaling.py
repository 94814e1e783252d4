"""A scaling model for REPA-E training with SiT-XL/2 + the f8d4 VAE at batch 32 per GPU:
bytes each GPU communicates per step under DDP, ZeRO-1 and ZeRO-2 (and ZeRO-3 for the
memory question), how much of it the backward pass can hide, the projected step time and
weak-scaling efficiency from 8 to 1024 GPUs, what the data loader must sustain per node,
and the per-GPU memory of each strategy.

    python benchmarks/scaling.py [--batch 32] [--gpus-per-node 8] [--json OUT.json]

It is a MODEL. Every input is printed with its source: parameter counts are counted from
the real modules (built on the meta device); step times are H100 measurements from
benchmarks/results scaled to batch 32 (a prediction); link bandwidths and latencies are
assumptions stated in ASSUMPTIONS. Its communication volumes are checked against the bytes
the collectives of a real 2-node run carried (tests/test_multinode.py) and its formulas
against hand-worked cases (tests/test_scaling.py).

Volumes, with S = 4 bytes x trainable parameters (fp32 gradients and fp32 weights: the
engine keeps fp32 master weights and runs bf16 autocast, so ZeRO gathers fp32 weights):
  ddp       all-reduce of the gradients                     wire 2(n-1)/n S per GPU
  zero1/2   DeepSpeed 0.19.8 as our templates configure it: each gradient bucket is
            ALL-REDUCED (zero_optimization.use_multi_rank_bucket_allreduce defaults to
            true) and every rank keeps its partition; after the step the updated
            weights are all-gathered                        wire 3(n-1)/n S = 1.5x DDP
  zero2_rs  the same with use_multi_rank_bucket_allreduce: false: each partition is
            reduced to its owner (a reduce-scatter)         wire 2(n-1)/n S = DDP
  zero3     weights all-gathered before every forward and backward use, gradients
            reduce-scattered: wire >= 3(n-1)/n S (more here: the SiT runs two forwards, the
            discriminator two roles per step)
ZeRO-1 and ZeRO-2 send the same bytes (DeepSpeed averages gradients through the same path);
they differ in memory only. ZeRO pads each model's flat weight group to a multiple of
2 x world_size elements, so its all-gather carries that padding too.
"""

import argparse
import json
import math
import pathlib
import sys
from dataclasses import dataclass
from typing import Dict, Optional

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
STEP_TIMES = RESULTS / "throughput_h100_2026-11-22_sitxl2_b16.json"  # measured on one H100 (BENCHMARKS.md)
DATA_RATES = RESULTS / "data_cpu_2026-11-22.json"                    # measured on this project's CPU machine

BYTES_FP32 = 4
STRATEGIES = ("ddp", "zero1", "zero2", "zero2_rs")
GPU_COUNTS = (8, 16, 64, 256, 1024)
GIB = 2**30

ASSUMPTIONS = {
    # Bus bandwidth a large NCCL collective reaches; nccl-tests on 8x H100 SXM (NVSwitch) report
    # ~360-480 GB/s all-reduce bus bandwidth; the lower end is used.
    "nvlink_bus_GBps": 360.0,
    # Network per node: line rate x 0.9 protocol efficiency.
    "networks": {"400 Gb/s per node": 400e9 / 8 * 0.9 / 1e9, "3.2 Tb/s per node": 3.2e12 / 8 * 0.9 / 1e9},
    # Per-message latency of one collective step (tree across nodes: 2 log2(nodes) steps).
    "latency_intra_us": 10.0,
    "latency_inter_us": 15.0,
    # DDP bucket (torch default 25 MB) and DeepSpeed reduce/all-gather buckets (configs/deepspeed: 5e7 elements).
    "ddp_bucket_bytes": 25 * 2**20,
    "zero_bucket_bytes": 5e7 * BYTES_FP32,
    # Backward costs ~2x the forward (FLOPs), so 2/3 of a component's fwd+bwd time is backward.
    "backward_fraction": 2 / 3,
    # Step time grows linearly with the batch from the measured batch 16 (BENCHMARKS.md predicts
    # +0-5 % images/s at 32; linear is the conservative end).
    "step_time_linear_in_batch": True,
    "imagenet_images": 1_281_167,  # for the epoch time
}


# -- inputs ---------------------------------------------------------------------------------------
def count_trainable(model: str = "SiT-XL/2", vae: str = "f8d4", encoder_dim: int = 768) -> Dict[str, int]:
    """Trainable parameters of the real modules, built on the meta device (no memory, no
    weights): the SiT with its projector (pos_embed trained, as in REPA-E), the VAE, and the
    PatchGAN discriminator of the VAE loss (LPIPS is frozen)."""
    import torch

    sys.path.insert(0, str(REPO))
    from repa_e_fast.config import make_config
    from repa_e_fast.losses.vae_loss import VAELossConfig, VAERegularizationLoss
    from repa_e_fast.models.sit import SiT
    from repa_e_fast.models.vae import build_vae

    config = make_config({"model": model, "vae": vae})
    with torch.device("meta"):
        sit = SiT(**config.sit_kwargs(), z_dims=[encoder_dim])
        sit.pos_embed.requires_grad_(True)
        autoencoder = build_vae(vae, ch=config.vae_ch)
        loss = VAERegularizationLoss(VAELossConfig())
        loss.perceptual_loss.requires_grad_(False)
    frozen = sum(p.numel() for p in loss.perceptual_loss.parameters())

    def trainable(module):
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    return {"sit": trainable(sit), "vae": trainable(autoencoder), "vae_loss": trainable(loss.discriminator),
            "lpips_frozen": frozen}


@dataclass
class StepTimes:
    """Predicted compute times of one step at ``batch`` per GPU (seconds), from the H100
    measurements at batch 16 (fast variant), linear in the batch."""
    batch: int
    step: float        # the whole REPA-E step
    sit: float         # pass (C): SiT forward+backward (the LDM-only step: SiT + its targets + AdamW)
    source: str

    @property
    def sit_backward(self) -> float:
        return ASSUMPTIONS["backward_fraction"] * self.sit

    @property
    def after_vae_backward(self) -> float:
        """Compute left after (A)'s backward (the VAE's gradients are complete): passes (B)
        and (C). (B), the discriminator on two 256 px batches, is not measured alone; it is
        counted as 0, which makes the VAE's overlap window the smallest it can be."""
        return self.sit


def load_step_times(batch: int, path: pathlib.Path = STEP_TIMES, variant: str = "fast") -> StepTimes:
    rows = json.loads(path.read_text())["rows"]
    pick = {(r["step"], r["variant"]): r for r in rows if r["model"] == "SiT-XL/2"}
    repae, ldm = pick[("repae", variant)], pick[("ldm", variant)]
    scale = batch / repae["batch"]
    return StepTimes(batch, repae["median_s"] * scale, ldm["median_s"] * scale,
                     f"{path.name} ({variant}, batch {repae['batch']}, H100) x {scale:g}")


def load_decode_rate(path: pathlib.Path = DATA_RATES) -> Dict[str, float]:
    """JPEG decode + resize + crop per CPU core: the torch loader on a folder of ImageNet-like
    JPEGs, measured with ``workers`` processes on this project's CPU machine."""
    data = json.loads(path.read_text())
    row = next(r for r in data["rows"] if r["loader"] == "torch" and r["source"] == "folder")
    workers = data["meta"]["workers"]
    return {"images_per_s_per_core": row["images_per_s"] / workers, "source": f"{path.name} (torch loader, folder "
            f"of JPEGs, {workers} workers on {data['meta']['cpu_cores']} {data['meta']['device']} cores)"}


# -- volumes --------------------------------------------------------------------------------------
def zero_padded(count: int, world: int) -> int:
    """DeepSpeed's flat group size: padded to a multiple of 2 x world elements."""
    alignment = 2 * world
    return -(-count // alignment) * alignment


def payload_per_step(strategy: str, trainable: Dict[str, int], world: int) -> Dict[str, int]:
    """Bytes handed to collectives per step and rank, before ring factors: what a counting
    wrapper around torch.distributed sees (an all-reduce's tensor, a reduce-scatter's full
    input, an all-gather's full output). ``trainable``: {"sit", "vae", "vae_loss"} counts."""
    models = ("sit", "vae", "vae_loss")
    size = BYTES_FP32 * sum(trainable[k] for k in models)
    if strategy == "ddp":
        return {"gradients": size, "parameters": 0}
    if strategy in ("zero1", "zero2", "zero2_rs"):
        # the gradient buckets hold the gradients only; the gathered weight groups are padded
        return {"gradients": size, "parameters": BYTES_FP32 * sum(zero_padded(trainable[k], world) for k in models)}
    if strategy == "zero3":
        raise ValueError("zero3 is not run by the engine (see "
                         "docs/distributed.md#zero-3--fsdp2-not-needed-on-80-gb-decided-with-numbers)")
    raise ValueError(f"unknown strategy {strategy!r}; one of {STRATEGIES}")


def ring_factor(n: int) -> float:
    return (n - 1) / n


def wire_bytes_per_gpu(strategy: str, size: float, n: int) -> Dict[str, float]:
    """Bytes each GPU sends per step (ring algorithms), by phase: 'overlapped' (gradient
    reduction, can run under the backward) and 'exposed' (ZeRO's all-gather of the updated
    weights, which runs after the optimizer step and before the next forward)."""
    if n == 1:
        return {"overlapped": 0.0, "exposed": 0.0}
    if strategy == "ddp":
        return {"overlapped": 2 * ring_factor(n) * size, "exposed": 0.0}
    if strategy in ("zero1", "zero2"):
        return {"overlapped": 2 * ring_factor(n) * size, "exposed": ring_factor(n) * size}
    if strategy == "zero2_rs":
        return {"overlapped": ring_factor(n) * size, "exposed": ring_factor(n) * size}
    if strategy == "zero3":  # forward + backward all-gathers (a 2nd SiT forward not counted), reduce-scatter
        return {"overlapped": 2 * ring_factor(n) * size, "exposed": ring_factor(n) * size}
    raise ValueError(f"unknown strategy {strategy!r}")


def collective_seconds(nbytes_per_gpu: float, n: int, gpus_per_node: int, network_GBps: Optional[float],
                       messages: int) -> float:
    """Time for collectives whose ring volume per GPU is ``nbytes_per_gpu`` on n GPUs.
    Within a node: NVLink bus bandwidth. Across nodes (hierarchical, as NCCL does it): the
    intra-node part at NVLink speed, and the node's network carries the inter-node ring
    volume of the whole node's data: per node (N-1)/N x (its GPUs' share) = the per-GPU
    volume rescaled to N nodes, over the node's bandwidth."""
    nvlink = ASSUMPTIONS["nvlink_bus_GBps"] * 1e9
    local = min(n, gpus_per_node)
    nodes = math.ceil(n / gpus_per_node)
    base = nbytes_per_gpu / ring_factor(n)  # the volume before the ring factor
    seconds = ring_factor(local) * base / nvlink if local > 1 else 0.0
    seconds += messages * ASSUMPTIONS["latency_intra_us"] * 1e-6
    if nodes > 1:
        if network_GBps is None:
            raise ValueError("more than one node needs a network bandwidth")
        # every GPU of a node sends its 1/g shard of the node's data through the node's NICs
        seconds += ring_factor(nodes) * base / (network_GBps * 1e9)
        seconds += messages * 2 * math.log2(nodes) * ASSUMPTIONS["latency_inter_us"] * 1e-6
    return seconds


@dataclass
class Projection:
    strategy: str
    gpus: int
    network: str
    wire_gb_per_gpu: float
    comm_s: float
    exposed_s: float
    step_s: float
    efficiency: float


def project(strategy: str, trainable: Dict[str, int], times: StepTimes, n: int, gpus_per_node: int,
            network: str, network_GBps: Optional[float]) -> Projection:
    """Step time on n GPUs = compute + the communication the backward cannot hide.

    Overlap, in the step's order (engine/step.py): the VAE's and the discriminator's
    gradients are complete after passes (A) and (B), so their reduction can run under pass
    (C) (SiT forward+backward); the SiT's gradients appear bucket by bucket during (C)'s
    backward, so their reduction can hide under that backward except its last bucket. What
    does not fit is exposed. ZeRO's all-gather of the updated weights is always exposed."""
    size_of = {k: BYTES_FP32 * trainable[k] for k in ("sit", "vae", "vae_loss")}
    size = sum(size_of.values())
    wire = wire_bytes_per_gpu(strategy, size, n)
    bucket = ASSUMPTIONS["ddp_bucket_bytes"] if strategy == "ddp" else ASSUMPTIONS["zero_bucket_bytes"]

    def seconds(nbytes, fraction_of_size):
        messages = max(1, math.ceil(fraction_of_size * size / bucket))
        return collective_seconds(nbytes, n, gpus_per_node, network_GBps, messages) if n > 1 else 0.0

    early = (size_of["vae"] + size_of["vae_loss"]) / size
    reduce_early = seconds(wire["overlapped"] * early, early)         # VAE + disc, under pass (C)
    reduce_sit = seconds(wire["overlapped"] * (1 - early), 1 - early)  # SiT buckets, under (C)'s backward
    last_bucket = reduce_sit * min(1.0, bucket / size_of["sit"])
    # the network is one queue: the early reduction delays the SiT's
    sit_start_free = max(0.0, reduce_early - (times.after_vae_backward - times.sit_backward))
    hidden_budget = times.sit_backward
    overlapped_exposed = max(last_bucket, sit_start_free + reduce_sit - hidden_budget + last_bucket)
    gather = seconds(wire["exposed"], 1.0) if wire["exposed"] else 0.0
    exposed = max(0.0, overlapped_exposed) + gather
    step = times.step + exposed
    return Projection(strategy, n, network, (wire["overlapped"] + wire["exposed"]) / 1e9,
                      reduce_early + reduce_sit + gather, exposed, step, times.step / step)


# -- memory (the ZeRO-3 / FSDP2 question) -------------------------------------------------------
def model_state_bytes(strategy: str, trainable: int, n: int) -> Dict[str, float]:
    """Per-GPU bytes of the trained models' states: fp32 weights, fp32 gradients, AdamW
    m and v (fp32). ZeRO-1 shards the optimizer states, ZeRO-2 also the gradients, ZeRO-3
    (FSDP2 alike) also the weights."""
    weights, grads, adam = (BYTES_FP32 * trainable, BYTES_FP32 * trainable, 2 * BYTES_FP32 * trainable)
    shard = {"ddp": (1, 1, 1), "zero1": (1, 1, n), "zero2": (1, n, n), "zero3": (n, n, n)}[strategy]
    return {"weights": weights / shard[0], "gradients": grads / shard[1], "optimizer": adam / shard[2]}


def memory_table(trainable: Dict[str, int], measured_peak_gib: float, measured_batch: int, batch: int,
                 n: int) -> Dict[str, Dict[str, float]]:
    """Per-GPU memory at ``batch`` on n GPUs, per strategy (GiB). Activations+workspace =
    the measured single-GPU peak minus the states the measured run held (its weights, grads,
    AdamW, the SiT's EMA copy and the frozen encoder + LPIPS), scaled linearly in the batch."""
    total = sum(trainable[k] for k in ("sit", "vae", "vae_loss"))
    fixed = BYTES_FP32 * (trainable["sit"] + trainable["lpips_frozen"] + trainable.get("encoder_frozen", 0))  # EMA, frozen nets
    held = sum(model_state_bytes("ddp", total, 1).values()) + fixed
    activations = max(0.0, measured_peak_gib * GIB - held) * batch / measured_batch
    table = {}
    for strategy in ("ddp", "zero1", "zero2", "zero3"):
        states = model_state_bytes(strategy, total, n)
        peak = sum(states.values()) + fixed + activations
        table[strategy] = {**{k: v / GIB for k, v in states.items()}, "ema_and_frozen": fixed / GIB,
                           "activations": activations / GIB, "peak": peak / GIB}
    return table


# -- the report -----------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="images per GPU per step")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--json", help="also write every number to this file")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.gpus_per_node < 1:
        print("error: --batch and --gpus-per-node must be >= 1", file=sys.stderr)
        return 2

    trainable = count_trainable()
    trainable["encoder_frozen"] = count_encoder()
    times = load_step_times(args.batch)
    decode = load_decode_rate()
    size = BYTES_FP32 * sum(trainable[k] for k in ("sit", "vae", "vae_loss"))
    print("SCALING MODEL (a model, not a measurement) for REPA-E SiT-XL/2 + f8d4, batch", args.batch, "per GPU")
    print(f"trainable parameters (counted on the meta device): SiT {trainable['sit']:,}, VAE {trainable['vae']:,}, "
          f"discriminator {trainable['vae_loss']:,}; fp32 gradient/weight volume S = {size / 1e9:.3f} GB")
    print(f"step compute (prediction from {times.source}): step {times.step * 1e3:.0f} ms, SiT pass (C) "
          f"{times.sit * 1e3:.0f} ms, of it backward {times.sit_backward * 1e3:.0f} ms")
    print(f"assumptions: {json.dumps({k: v for k, v in ASSUMPTIONS.items() if k != 'imagenet_images'})}")

    rows = []
    print("\n| strategy | GPUs | inter-node link | GB sent per GPU per step | comm ms | exposed ms | step ms | "
          "efficiency |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for strategy in STRATEGIES:
        for n in GPU_COUNTS:
            links = [("NVLink only", None)] if n <= args.gpus_per_node else list(ASSUMPTIONS["networks"].items())
            for name, bandwidth in links:
                p = project(strategy, trainable, times, n, args.gpus_per_node, name, bandwidth)
                rows.append(p.__dict__)
                print(f"| {strategy} | {n} | {name} | {p.wire_gb_per_gpu:.2f} | {p.comm_s * 1e3:.0f} | "
                      f"{p.exposed_s * 1e3:.0f} | {p.step_s * 1e3:.0f} | {p.efficiency:.1%} |")

    per_node = args.gpus_per_node * args.batch / times.step
    cores = per_node / decode["images_per_s_per_core"]
    print(f"\ndata: each node must deliver {per_node:.0f} images/s ({args.gpus_per_node} x {args.batch} images per "
          f"{times.step * 1e3:.0f} ms step, at 100 % efficiency); that is {per_node:.0f} JPEG decodes/s per node, "
          f"{cores:.1f} CPU cores at the measured {decode['images_per_s_per_core']:.0f} images/s per core "
          f"({decode['source']}), or the GPU decoder (DALI); one node alone would take "
          f"{ASSUMPTIONS['imagenet_images'] / per_node:.0f} s per ImageNet epoch.")
    for n in GPU_COUNTS:
        print(f"  {n:5d} GPUs: {n * args.batch / times.step:8.0f} images/s in total")

    measured = json.loads(STEP_TIMES.read_text())["rows"]
    fast = next(r for r in measured if r["step"] == "repae" and r["variant"] == "fast")
    print(f"\nmemory per GPU at batch {args.batch}, 8 GPUs (GiB; activations from the measured peak "
          f"{fast['peak_memory_gib']:.1f} GiB at batch {fast['batch']}, scaled linearly):")
    memory = memory_table(trainable, fast["peak_memory_gib"], fast["batch"], args.batch, 8)
    print("| strategy | weights | gradients | AdamW | EMA + frozen nets | activations | peak |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for strategy, m in memory.items():
        print(f"| {strategy} | {m['weights']:.1f} | {m['gradients']:.1f} | {m['optimizer']:.1f} | "
              f"{m['ema_and_frozen']:.1f} | {m['activations']:.1f} | {m['peak']:.1f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            "trainable": trainable, "step_times": times.__dict__, "assumptions": ASSUMPTIONS, "rows": rows,
            "data_images_per_s_per_node": per_node, "decode": decode, "memory_gib_8_gpus": memory}, indent=1))
    return 0


def count_encoder(enc_type: str = "dinov2-vit-b", resolution: int = 256) -> int:
    """Parameters of the frozen REPA target encoder (kept in fp32 on every GPU)."""
    import warnings

    import torch

    from repa_e_fast.models.encoders import load_encoders

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "RANDOM encoder weights": only the shapes are used here
        encoders = load_encoders(enc_type, resolution, None, "/nonexistent", allow_random=True, device="meta")
    return sum(p.numel() for e in encoders for p in e.parameters())


if __name__ == "__main__":
    sys.exit(main())
