"""Where a process runs: the process group, its rank and device, seeds, and the run's log.

Shared by every entry point that may run on several processes (``train``, ``generate``,
``cache_latents``). ``setup_runtime`` starts the process group the launcher asks for
(``deepspeed``, ``torchrun`` or none) and picks the device; ``agree_on_start`` stops every rank
when rank 0's start-up checks fail; ``log`` prints on rank 0 and appends to the run's log.txt.
"""

import os
import random
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError


@dataclass
class Runtime:
    distributed: str  # "single", "ddp" or "deepspeed": how the models are trained on this process group
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_name(launcher_local_rank: Optional[int]) -> Optional[str]:
    """"torchrun", "deepspeed" (its launcher passes --local_rank) or None (started directly)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    return "deepspeed" if launcher_local_rank is not None else None


def setup_runtime(distributed: str = "auto", device: Optional[str] = None, allow_tf32: Optional[bool] = None,
                  dist_timeout: Optional[float] = None, launcher_local_rank: Optional[int] = None,
                  cudnn_benchmark: bool = False) -> Runtime:
    """Start the process group and pick the device. ``distributed`` "auto": deepspeed under the
    deepspeed launcher, ddp when WORLD_SIZE > 1, else single. ``allow_tf32`` None leaves torch's
    TF32 settings alone; ``dist_timeout`` None keeps torch's default collective timeout."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if distributed == "auto":
        distributed = "deepspeed" if launcher_local_rank is not None else ("ddp" if world_size > 1 else "single")
    if distributed == "single" and world_size > 1:
        raise ConfigError(f"distributed single cannot run {world_size} processes; use ddp (torchrun) or deepspeed")
    local_rank = int(os.environ.get("LOCAL_RANK", launcher_local_rank or 0))
    if device:
        device = torch.device(device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if allow_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            torch.backends.cudnn.allow_tf32 = allow_tf32
        if cudnn_benchmark:
            # Fixed shapes every step (VAE, LPIPS, discriminator convolutions): let cuDNN pick
            # the fastest algorithm once. Same numerics class as TF32 on/off: cuDNN's choice.
            torch.backends.cudnn.benchmark = True
    comm = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=dist_timeout) if dist_timeout is not None else None
    if distributed == "deepspeed":
        for key, value in (("RANK", "0"), ("LOCAL_RANK", str(local_rank)), ("WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
            os.environ.setdefault(key, value)
        try:
            import deepspeed
        except ImportError:
            raise ConfigError("distributed deepspeed needs DeepSpeed: pip install 'repa_e_fast[deepspeed]'") from None
        if device.type == "cpu":
            # DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce meant for
            # inference (~100 s on 2 cores) when communication starts; training never uses it.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=comm, **({"timeout": timeout} if timeout else {}))
    elif distributed == "ddp":
        dist.init_process_group(comm, timeout=timeout)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return Runtime(distributed, rank, world_size, local_rank, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def agree_on_start(runtime: Runtime, error: Optional[BaseException]) -> None:
    """Rank 0's start-up checks stop every rank, each with one line."""
    if not dist.is_initialized():
        if error is not None:
            raise error
        return
    flag = torch.tensor([1.0 if error is not None else 0.0], device=runtime.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if flag.item() > 0:
        raise ConfigError("rank 0 refused to start (see its message)")


_log_file = None  # <experiment>/log.txt on rank 0 while a run trains: what stdout shows


def open_log_file(path: Path) -> None:
    global _log_file
    _log_file = open(path, "a", encoding="utf-8")


def close_log_file() -> None:
    global _log_file
    if _log_file is not None:
        _log_file.close()
        _log_file = None


def log(runtime: Runtime, message: str) -> None:
    if runtime.is_main:
        print(f"[repa_e_fast] {message}", flush=True)
        if _log_file is not None:
            _log_file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [repa_e_fast] {message}\n")
            _log_file.flush()
