"""Two CPU ranks (gloo, DS_ACCELERATOR=cpu) for tests/test_init_from.py:

    python tests/_deepspeed_init_from.py OUT.json

A single-process torch AdamW trains a tiny MLP for 2 steps (state S, weights W2) and a third
(W3). Each DeepSpeed run (ZeRO 0 and 2) starts from W2, loads S with
``load_optimizer_state_dicts`` (or not, as a control), exports it again and takes the
third step on per-rank halves of the same batch. OUT.json: per run, the largest differences
of the re-exported state from S and of the weights from W3."""

import copy
import datetime
import json
import os
import socket
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

WORLD = 2
OPTIMIZER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0)
RUNS = {"zero0": (0, True), "zero2": (2, True), "zero2_fresh_adam": (2, False)}


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))


def batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, generator=generator), torch.randn(4, 3, generator=generator)) for _ in range(3)]


def reference():
    net, data = model(), batches()
    optimizer = torch.optim.AdamW(net.parameters(), **OPTIMIZER)
    for index, (x, y) in enumerate(data):
        if index == 2:
            state = copy.deepcopy(optimizer.state_dict())  # state_dict() shares the live tensors
            weights2 = {k: v.clone() for k, v in net.state_dict().items()}
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()
    return state, weights2, net.state_dict()


def worker(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from repa_e_fast.engine.backend_deepspeed import DeepSpeedBackend

    state, weights2, weights3 = reference()
    x, y = batches()[2]
    results = {}
    for name, (stage, load) in RUNS.items():
        net = model()
        net.load_state_dict(weights2)
        backend = DeepSpeedBackend({"m": net}, {"m": OPTIMIZER}, {"zero_optimization": {"stage": stage}},
                                   precision="fp32", micro_batch_size=2, max_grad_norm=100.0)
        if load:
            backend.load_optimizer_state_dicts({"m": state})
        exported = backend.optimizer_state_dicts()["m"]["state"]
        state_diff = max((exported[i][key] - s[key]).abs().max().item()
                         for i, s in state["state"].items() for key in ("exp_avg", "exp_avg_sq")) if exported else None
        steps = sorted({float(s["step"]) for s in exported.values()})
        part = slice(2 * rank, 2 * rank + 2)
        loss = nn.functional.mse_loss(backend.models["m"](x[part]), y[part])
        backend.backward("m", loss)
        backend.step("m")
        backend.end_micro_step()
        weight_diff = max((p - weights3[k]).abs().max().item() for k, p in backend.unwrap("m").state_dict().items())
        results[name] = dict(state_diff=state_diff, steps=steps, weight_diff=weight_diff)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(results, handle)
    dist.barrier()
    dist.destroy_process_group()


def run(rank, port, out):
    try:
        worker(rank, port, out)
    except BaseException:
        traceback.print_exc()
        raise


if __name__ == "__main__":
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    torch.multiprocessing.spawn(run, args=(free_port, sys.argv[1]), nprocs=WORLD)
