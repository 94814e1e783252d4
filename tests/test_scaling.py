"""benchmarks/scaling.py: its volume and time formulas on hand-worked cases, its parameter
counts against the real modules, and the report it prints (the ZeRO-3 decision included).
The check of its volumes against bytes a real 2-node run sent is in tests/test_multinode.py."""

import json
import math
import sys

import pytest

from _paths import REPO

sys.path.insert(0, f"{REPO}/benchmarks")
import scaling  # noqa: E402

COUNTS = {"sit": 1000, "vae": 200, "vae_loss": 50}
S = 4 * 1250


def test_payload_per_step_is_the_fp32_parameter_bytes_once_for_ddp_twice_for_zero():
    assert scaling.payload_per_step("ddp", COUNTS, 2) == {"gradients": S, "parameters": 0}
    # ZeRO pads each model's weight group to a multiple of 2 x world: 1000, 200, 50 -> 52 (world 2),
    # 1008, 208, 64 (world 8); the gradient buckets are not padded
    assert scaling.payload_per_step("zero1", COUNTS, 2) == scaling.payload_per_step("zero2", COUNTS, 2) == \
        {"gradients": S, "parameters": 4 * 1252}
    assert scaling.payload_per_step("zero2_rs", COUNTS, 8) == {"gradients": S, "parameters": 4 * 1280}
    with pytest.raises(ValueError, match="unknown strategy"):
        scaling.payload_per_step("fsdp9", COUNTS, 2)


@pytest.mark.parametrize("n", [2, 8, 1024])
def test_ring_volumes(n):
    ddp = scaling.wire_bytes_per_gpu("ddp", S, n)
    zero = scaling.wire_bytes_per_gpu("zero2", S, n)
    rs = scaling.wire_bytes_per_gpu("zero2_rs", S, n)
    assert ddp == {"overlapped": 2 * (n - 1) / n * S, "exposed": 0.0}
    assert zero == {"overlapped": 2 * (n - 1) / n * S, "exposed": (n - 1) / n * S}  # DeepSpeed's default: AR + AG
    assert rs == {"overlapped": (n - 1) / n * S, "exposed": (n - 1) / n * S}  # RS + AG = one all-reduce
    assert sum(scaling.wire_bytes_per_gpu("zero3", S, n).values()) == pytest.approx(1.5 * sum(ddp.values()))
    assert scaling.wire_bytes_per_gpu("ddp", S, 1) == {"overlapped": 0.0, "exposed": 0.0}


def test_collective_time_within_a_node_and_across_nodes(monkeypatch):
    monkeypatch.setitem(scaling.ASSUMPTIONS, "nvlink_bus_GBps", 100.0)
    monkeypatch.setitem(scaling.ASSUMPTIONS, "latency_intra_us", 0.0)
    monkeypatch.setitem(scaling.ASSUMPTIONS, "latency_inter_us", 0.0)
    size = 8e9
    # 8 GPUs, one node: the ring volume 2*7/8*S over 100 GB/s
    assert scaling.collective_seconds(2 * 7 / 8 * size, 8, 8, None, 1) == pytest.approx(2 * 7 / 8 * 8e9 / 100e9)
    # 16 GPUs on 2 nodes of 8: NVLink part 2*7/8*S/100 GB/s, network part 2*(1/2)*S over 10 GB/s per node
    got = scaling.collective_seconds(2 * 15 / 16 * size, 16, 8, 10.0, 1)
    assert got == pytest.approx(2 * 7 / 8 * 8e9 / 100e9 + 2 * 0.5 * 8e9 / 10e9)
    monkeypatch.setitem(scaling.ASSUMPTIONS, "latency_inter_us", 10.0)
    with_latency = scaling.collective_seconds(2 * 15 / 16 * size, 16, 8, 10.0, 5)
    assert with_latency - got == pytest.approx(5 * 2 * math.log2(2) * 10e-6)
    with pytest.raises(ValueError, match="network bandwidth"):
        scaling.collective_seconds(size, 16, 8, None, 1)


def test_projection_hides_what_fits_under_the_backward_and_exposes_the_rest(monkeypatch):
    for key in ("latency_intra_us", "latency_inter_us"):
        monkeypatch.setitem(scaling.ASSUMPTIONS, key, 0.0)
    monkeypatch.setitem(scaling.ASSUMPTIONS, "nvlink_bus_GBps", 1e12)  # NVLink: free
    counts = {"sit": 10**9, "vae": 0, "vae_loss": 0}  # one model: 4 GB of gradients
    times = scaling.StepTimes(batch=32, step=1.0, sit=0.6, source="test")  # SiT backward 0.4 s
    monkeypatch.setitem(scaling.ASSUMPTIONS, "ddp_bucket_bytes", 4e9)  # one bucket: nothing overlaps
    p = scaling.project("ddp", counts, times, 16, 8, "net", 100.0)
    reduce_s = 2 * 0.5 * 4e9 / 100e9  # the network part of 2 nodes
    assert p.comm_s == pytest.approx(reduce_s, rel=1e-6) and p.exposed_s == pytest.approx(reduce_s, rel=1e-6)
    monkeypatch.setitem(scaling.ASSUMPTIONS, "ddp_bucket_bytes", 4e6)  # 1000 buckets: all but the last hidden
    p = scaling.project("ddp", counts, times, 16, 8, "net", 100.0)
    assert p.exposed_s == pytest.approx(reduce_s / 1000, rel=1e-6)
    assert p.step_s == pytest.approx(1.0 + reduce_s / 1000) and p.efficiency == pytest.approx(1.0 / p.step_s)
    slow = scaling.project("ddp", counts, times, 16, 8, "net", 1.0)  # 4 s of reduction > 0.4 s backward
    assert slow.exposed_s == pytest.approx(4.0 - 0.4 + 4.0 / 1000, rel=1e-6)
    # ZeRO-2 with reduce-scatter: the reduce-scatter (half the volume) hides, the all-gather
    # (the other half) does not; as DeepSpeed runs it by default, the gradients are all-reduced
    monkeypatch.setitem(scaling.ASSUMPTIONS, "zero_bucket_bytes", 4e6)
    z = scaling.project("zero2_rs", counts, times, 16, 8, "net", 100.0)
    assert z.exposed_s == pytest.approx(reduce_s / 2 / 1000 + reduce_s / 2, rel=1e-6)
    z = scaling.project("zero2", counts, times, 16, 8, "net", 100.0)
    assert z.exposed_s == pytest.approx(reduce_s / 1000 + reduce_s / 2, rel=1e-6)
    assert z.comm_s == pytest.approx(1.5 * reduce_s, rel=1e-6)


def test_model_states_per_gpu():
    p, n = 1000, 8
    assert scaling.model_state_bytes("ddp", p, n) == {"weights": 4000, "gradients": 4000, "optimizer": 8000}
    assert scaling.model_state_bytes("zero1", p, n) == {"weights": 4000, "gradients": 4000, "optimizer": 1000}
    assert scaling.model_state_bytes("zero2", p, n) == {"weights": 4000, "gradients": 500, "optimizer": 1000}
    assert scaling.model_state_bytes("zero3", p, n) == {"weights": 500, "gradients": 500, "optimizer": 1000}


def test_measured_inputs_are_read_from_the_results_files():
    rows = json.loads(scaling.STEP_TIMES.read_text())["rows"]
    fast = next(r for r in rows if r["step"] == "repae" and r["variant"] == "fast")
    times = scaling.load_step_times(32)
    assert times.step == pytest.approx(fast["median_s"] * 32 / fast["batch"])
    assert 0 < times.sit < times.step
    assert scaling.load_decode_rate()["images_per_s_per_core"] > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling") / "scaling.json"
    assert scaling.main(["--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_xl2_counts_from_the_real_modules(report):
    counts = report["trainable"]  # the figures: SiT 683 M, VAE 84 M, discriminator 2.8 M
    assert abs(counts["sit"] - 683e6) < 1e6 and abs(counts["vae"] - 84e6) < 1e6 and abs(counts["vae_loss"] - 2.8e6) < 1e5


def test_report_rows_and_the_zero3_decision(report):
    rows = report["rows"]
    assert {(r["strategy"], r["gpus"]) for r in rows} == {(s, n) for s in scaling.STRATEGIES
                                                          for n in scaling.GPU_COUNTS}
    assert all(0 < r["efficiency"] <= 1 for r in rows)
    memory = report["memory_gib_8_gpus"]
    assert memory["zero3"]["peak"] < memory["zero2"]["peak"] < memory["zero1"]["peak"] < memory["ddp"]["peak"]
    # The decision in docs/distributed.md#zero-3--fsdp2-not-needed-on-80-gb-decided-with-numbers:
    # even plain DDP fits an 80 GB GPU at XL/2 batch 32,
    # so ZeRO-3 / FSDP2 (which would save only the weights' shard) is not needed.
    assert memory["ddp"]["peak"] < 80 * 1e9 / 2**30


def test_bad_arguments_exit_2(capsys):
    assert scaling.main(["--batch", "0"]) == 2
    assert "error:" in capsys.readouterr().err
