"""Knowing which rank was lost when a multi-node run breaks.

Every rank of a multi-process run writes a heartbeat (a counter) into the rendezvous store
from a background thread. When the run fails (a collective raises because a peer's sockets
closed, or times out after ``dist_timeout`` seconds) or a peer stops beating for
``dist_timeout`` seconds (a hang a collective would not notice: a node that vanished
without closing its connections), the surviving ranks say which ranks are gone and exit
with EXIT_LOST_RANK, so a scheduler can relaunch every node with ``--resume auto``.

A rank that ends normally (or with its own error) marks itself in the store first, so a
peer that is still writing its last checkpoint is never taken for a lost one.
"""

import datetime
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch.distributed as dist

EXIT_LOST_RANK = 76  # a peer rank died or stopped answering; relaunch every node with --resume auto
DONE, FAILED = "done", "failed"
PREFIX = "repa_e_fast/heartbeat/"


def heartbeat_interval(timeout_s: float) -> float:
    """Often enough that a stalled peer is seen well within the timeout."""
    return max(0.25, min(5.0, timeout_s / 10))


def node_of(rank: int, world_size: int) -> str:
    """The node a rank runs on, from the launcher's layout (torchrun and the deepspeed
    launcher give LOCAL_WORLD_SIZE / nproc per node; equal on every node)."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if per_node <= 0:
        return "node unknown"
    return f"node {rank // per_node} of {max(1, world_size // per_node)}"


class PeerWatch:
    """The heartbeat thread and the question 'which ranks are gone?'.

    It uses its own client of the rendezvous store (MASTER_ADDR:MASTER_PORT; torchrun's
    agent store or rank 0's store under the deepspeed launcher), so it never competes with
    the process group's own connection."""

    def __init__(self, rank: int, world_size: int, timeout_s: float, store=None, exit_process=os._exit):
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.interval = heartbeat_interval(self.timeout_s)
        self.address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        if store is None:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=max(5.0, min(30.0, self.timeout_s))),
                                  wait_for_workers=False)
        self.store = dist.PrefixStore(PREFIX, store)
        self.exit_process = exit_process
        self.beats = 0
        self.stopped = threading.Event()
        self.last_change: Dict[int, float] = {}  # rank -> monotonic time its value last changed
        self.last_value: Dict[int, Optional[str]] = {}
        self.store.set(str(rank), "0")
        self.thread = threading.Thread(target=self._run, name="repa_e_fast-heartbeat", daemon=True)
        self.thread.start()

    # -- the background thread -------------------------------------------------------------
    def _run(self) -> None:
        store_lost_since = None
        while not self.stopped.wait(self.interval):
            try:
                self.beats += 1
                self.store.set(str(self.rank), str(self.beats))
                lost = self._stalled()
                store_lost_since = None
                reason = f"no heartbeat for more than {self.timeout_s:g} s"
            except Exception as error:
                # The store is gone: its host (rank 0's node) is lost, or rank 0 finished and
                # exited while this rank is finishing too. Give the main thread timeout_s to
                # end (or to fail in a collective, which names the lost rank) before exiting.
                if self.stopped.is_set():
                    return
                store_lost_since = store_lost_since or time.monotonic()
                if time.monotonic() - store_lost_since <= self.timeout_s:
                    continue
                lost, reason = [0], f"the rendezvous store at {self.address} is unreachable ({error})"
            if lost and not self.stopped.is_set():
                print(self.message(lost, reason), file=sys.stderr, flush=True)
                self.exit_process(EXIT_LOST_RANK)
                return

    def _read(self) -> Dict[int, Optional[str]]:
        others = [r for r in range(self.world_size) if r != self.rank]
        present = {r for r in others if self.store.check([str(r)])}
        values = self.store.multi_get([str(r) for r in sorted(present)]) if present else []
        read = {r: None for r in others}
        read.update({r: v.decode() for r, v in zip(sorted(present), values)})
        return read

    def _stalled(self) -> List[int]:
        """Ranks whose heartbeat has not changed for timeout_s (updates last_change)."""
        now = time.monotonic()
        stalled = []
        for r, value in self._read().items():
            if value in (DONE, FAILED):
                continue
            if r not in self.last_value or value != self.last_value[r]:
                self.last_value[r], self.last_change[r] = value, now
            elif now - self.last_change[r] > self.timeout_s:
                stalled.append(r)
        return stalled

    # -- after a failure ----------------------------------------------------------------------
    def lost_ranks(self, wait_s: Optional[float] = None) -> Dict[int, str]:
        """{rank: why} for every peer that is gone: it marked itself failed, or its heartbeat
        did not move during ``wait_s`` (default: three heartbeat intervals). {0: ...} when the
        store (on rank 0's node) cannot be reached."""
        wait_s = 3 * self.interval if wait_s is None else wait_s
        try:
            before = self._read()
            time.sleep(wait_s)
            after = self._read()
        except Exception as error:
            return {0: f"the rendezvous store at {self.address} is unreachable ({error})"}
        lost = {}
        for r in after:
            if after[r] == FAILED:
                lost[r] = "it stopped with an error of its own (see its log)"
            elif after[r] != DONE and after[r] == before[r]:
                lost[r] = f"no heartbeat for {wait_s:.1f} s (process killed, node down or network cut)"
        return lost

    def message(self, lost, reason: Optional[str] = None) -> str:
        reasons = lost if isinstance(lost, dict) else {r: reason for r in lost}
        named = "; ".join(f"rank {r} ({node_of(r, self.world_size)}): {why}" for r, why in sorted(reasons.items()))
        return (f"error: lost rank(s) {sorted(reasons)} of {self.world_size} — {named}. Rank {self.rank} stops "
                f"(exit {EXIT_LOST_RANK}); relaunch every node with --resume auto to continue from the last "
                f"complete checkpoint.")

    def close(self, state: str) -> None:
        self.stopped.set()
        try:
            self.store.set(str(self.rank), state)
        except Exception:
            pass  # the store is gone already; nothing left to tell


@contextmanager
def watch_peers(timeout_s: float):
    """Runs the body with a heartbeat when this process is one rank of several. A failure
    of the body caused by lost peers becomes one clear message and SystemExit(EXIT_LOST_RANK);
    any other failure propagates unchanged."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield None
        return
    watch = PeerWatch(dist.get_rank(), dist.get_world_size(), timeout_s)
    try:
        yield watch
    except BaseException as error:
        watch.close(FAILED)
        # gloo reports a closed peer as a plain RuntimeError, NCCL as a DistError; the
        # trainer's own errors (subclasses, ValueError, ...) are not about peers.
        if not (type(error) is RuntimeError or isinstance(error, dist.DistError)):
            raise
        lost = {r: why for r, why in watch.lost_ranks().items() if r != watch.rank}
        if not lost:
            raise
        print(f"{watch.message(lost)} (the failing call: {type(error).__name__}: {str(error).splitlines()[0][:300]})",
              file=sys.stderr, flush=True)
        raise SystemExit(EXIT_LOST_RANK) from None
    watch.close(DONE)
