"""engine/peers.py on an in-memory store (no processes): which ranks count as lost, the
watchdog that stops a rank whose peer went silent, and the message naming the lost rank.
The real thing (a node killed across network namespaces) is in tests/test_multinode.py."""

import threading
import time

import pytest
import torch.distributed as dist

from repa_e_fast.engine.peers import DONE, EXIT_LOST_RANK, FAILED, PREFIX, PeerWatch, heartbeat_interval, node_of


class Exits:
    def __init__(self):
        self.codes = []
        self.called = threading.Event()

    def __call__(self, code):
        self.codes.append(code)
        self.called.set()


def peer_store(store):
    return dist.PrefixStore(PREFIX, store)


def test_a_silent_peer_stops_this_rank_after_the_timeout_with_its_rank_named(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    store, exits = dist.HashStore(), Exits()
    peer_store(store).set("1", "0")  # rank 1 beat once, then went silent
    begin = time.monotonic()
    watch = PeerWatch(0, 2, timeout_s=1.0, store=store, exit_process=exits)
    try:
        assert exits.called.wait(10)
    finally:
        watch.close(DONE)
    assert exits.codes == [EXIT_LOST_RANK] and 1.0 < time.monotonic() - begin < 5
    err = capsys.readouterr().err
    assert "error: lost rank(s) [1] of 2 — rank 1 (node 1 of 2): no heartbeat for more than 1 s" in err
    assert "--resume auto" in err


def test_a_beating_or_finished_peer_is_not_lost():
    store, exits = dist.HashStore(), Exits()
    peers = peer_store(store)
    watch = PeerWatch(0, 3, timeout_s=1.0, store=store, exit_process=exits)
    peers.set("2", DONE)  # rank 2 ended normally (e.g. rank 0 still writes the last checkpoint)
    try:
        for beat in range(12):  # rank 1 keeps beating for 3 s, three times the timeout
            peers.set("1", str(beat))
            time.sleep(0.25)
        assert not exits.called.is_set()
        assert watch.lost_ranks(wait_s=0.1) == {1: "no heartbeat for 0.1 s (process killed, node down or network cut)"}
    finally:
        watch.close(DONE)
    assert peers.get("0") == DONE.encode()


def test_after_a_failure_a_peer_that_failed_on_its_own_is_named_as_such(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    store = dist.HashStore()
    peer_store(store).set("1", FAILED)
    watch = PeerWatch(0, 2, timeout_s=60, store=store, exit_process=Exits())
    try:
        lost = watch.lost_ranks(wait_s=0.0)
    finally:
        watch.close(FAILED)
    assert lost == {1: "it stopped with an error of its own (see its log)"}
    assert "lost rank(s) [1] of 2 — rank 1 (node unknown): it stopped with an error of its own" in watch.message(lost)


@pytest.mark.parametrize("timeout, interval", [(600, 5.0), (20, 2.0), (1, 0.25)])
def test_heartbeat_interval(timeout, interval):
    assert heartbeat_interval(timeout) == interval


def test_node_of(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert node_of(9, 16) == "node 1 of 2"
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert node_of(9, 16) == "node unknown"
