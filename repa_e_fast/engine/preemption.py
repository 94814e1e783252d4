"""The preemption flag a training loop polls every step: SIGTERM, SIGINT, SIGUSR1, or the
launcher gone. The loop then checkpoints, writes ``<run>/PREEMPTED`` (``run_folder.py``) and
exits 75."""

import ctypes
import os
import signal
import sys
from typing import Optional

import torch
import torch.distributed as dist

from .checkpoint import proc_stat_field
from .runtime import Runtime


class PreemptionFlag:
    """Set by SIGTERM, SIGINT (Ctrl-C) or SIGUSR1, or when the launcher is gone: under
    ``deepspeed``/``torchrun`` the trainer's parent is the per-node launcher. When the launcher
    dies, Linux sends SIGTERM (``PR_SET_PDEATHSIG``). Under ``deepspeed`` the launcher has a
    parent of its own, the runner (the ``deepspeed`` command); when only the runner dies (it
    forwards no signal on one node) the launcher trains on, orphaned, and nothing signals
    anyone: so the launcher's parent is compared with the one seen at start at every step.
    (Not under torchrun: its parent is the user's shell, which may end under nohup.)"""

    def __init__(self, launcher: Optional[str]):
        self.signal = None
        self.reason = None
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._handler)
        self._launcher = self._launcher_parent = None
        if launcher is not None and sys.platform.startswith("linux"):
            self._launcher = os.getppid()
            self._launcher_parent = proc_stat_field(self._launcher, "ppid") if launcher == "deepspeed" else None
            try:
                pr_set_pdeathsig = 1
                ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
            except (OSError, AttributeError):
                pass  # launcher_gone() still notices

    def _handler(self, signum, frame):
        self.signal = signum
        self.reason = f"signal {signal.Signals(signum).name}"

    def launcher_gone(self) -> bool:
        if self._launcher is None:
            return False
        if os.getppid() != self._launcher:
            self.reason = f"launcher (pid {self._launcher}) exited"
            return True
        if self._launcher_parent is not None and proc_stat_field(self._launcher, "ppid") != self._launcher_parent:
            self.reason = f"launcher (pid {self._launcher}) orphaned: its parent {self._launcher_parent} exited"
            return True
        return False

    def raised(self, runtime: Runtime) -> bool:
        """Any rank preempted (collective: every rank calls it at the same step)."""
        local = self.signal is not None or self.launcher_gone()
        flag = torch.tensor([1.0 if local else 0.0], device=runtime.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

