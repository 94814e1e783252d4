"""Two nodes on one machine: Linux network namespaces joined by a veth pair, one rank per
node, gloo over that link (GLOO_SOCKET_IFNAME; MASTER_ADDR = node A's address). The
launchers are the real ones: torchrun with --nnodes 2 --node_rank, and the deepspeed
launcher's multi-node mode without ssh (--hostfile, --no_ssh, --node_rank).

- the harness runs (tests/_distributed_harness.py) on 2 nodes equal the one-process run at
  the global batch, within tests/test_distributed.py's tolerances; the bytes the collectives carried equal what
  benchmarks/scaling.py predicts for 2 ranks;
- the trainer on 2 nodes: a checkpoint written by a 2-node run and resumed by a 2-node run
  ends bit-identical to an uninterrupted run; a node killed mid-run (kill -9 of every
  process in its namespace) makes the other node stop within a bounded time with a message
  naming the lost rank, and `--resume auto` on both nodes finishes the run, again
  bit-identical.

Skipped, with the reason, where network namespaces cannot be created (not root, no `ip`).
"""

import copy
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import _distributed_harness as harness
from _paths import REPO
from _train_helpers import assert_same_weights, checkpoint_dir, load_official, train_command, train_env
from test_distributed import assert_matches_single_process

TAG = f"re{os.getpid() % 100000}"
NODES = [  # (namespace, interface, address); 10.213.0.0/24 is private, and exists only inside the namespaces
    (f"{TAG}a", f"{TAG}a0", "10.213.0.1"),
    (f"{TAG}b", f"{TAG}b0", "10.213.0.2"),
]
MASTER = NODES[0][2]
RANK_SCRIPT = str(Path(REPO) / "tests" / "_multinode_rank.py")
DIST_TIMEOUT = 20  # s: the trainer's --dist-timeout in the kill test

pytestmark = pytest.mark.timeout(400)


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def namespace_pids(namespace):
    result = ip("netns", "pids", namespace, check=False)
    return [int(pid) for pid in result.stdout.split()]


def kill_namespace(namespace):
    for pid in namespace_pids(namespace):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def nodes():
    if shutil.which("ip") is None:
        pytest.skip("network namespaces unavailable: the `ip` command (iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.skip("network namespaces unavailable: creating them needs root")
    (ns_a, if_a, addr_a), (ns_b, if_b, addr_b) = NODES
    try:
        for namespace in (ns_a, ns_b):
            ip("netns", "add", namespace)
        ip("link", "add", if_a, "type", "veth", "peer", "name", if_b)
        for namespace, interface, address in NODES:
            ip("link", "set", interface, "netns", namespace)
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
            ip("-n", namespace, "link", "set", interface, "up")
            ip("-n", namespace, "link", "set", "lo", "up")
        ping = subprocess.run(["ip", "netns", "exec", ns_a, sys.executable, "-c",
                               f"import socket; s = socket.socket(); s.settimeout(5); "
                               f"print(s.connect_ex(('{addr_b}', 9)))"], capture_output=True, text=True, timeout=30)
        if ping.returncode != 0 or ping.stdout.strip() not in ("111", "0"):  # 111: refused = host reached
            raise RuntimeError(f"no route from {ns_a} to {addr_b}: {ping.stdout} {ping.stderr}")
    except (subprocess.CalledProcessError, RuntimeError) as error:
        for namespace, _, _ in NODES:
            ip("netns", "del", namespace, check=False)
        detail = error.stderr.strip() if isinstance(error, subprocess.CalledProcessError) else str(error)
        pytest.skip(f"network namespaces unavailable here: {detail}")
    yield NODES
    for namespace, _, _ in NODES:
        kill_namespace(namespace)
        ip("netns", "del", namespace, check=False)


def node_env(interface):
    env = train_env()
    env.update(GLOO_SOCKET_IFNAME=interface, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    return env


def start(node, command, log_path):
    namespace, interface, _ = node
    log = open(log_path, "w")
    process = subprocess.Popen(["ip", "netns", "exec", namespace, *command], cwd=REPO, env=node_env(interface),
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    process.log_path = log_path
    return process


def finish(processes, timeout):
    """Waits for every process; returns (exit codes, logs). Kills what outlives ``timeout``."""
    deadline = time.monotonic() + timeout
    codes = []
    for process in processes:
        try:
            codes.append(process.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            process.kill()
            codes.append("timeout")
    return codes, [Path(p.log_path).read_text() for p in processes]


def run_on_both(nodes, make_command, directory, name, timeout=240):
    processes = [start(node, make_command(rank), directory / f"{name}_node{rank}.log")
                 for rank, node in enumerate(nodes)]
    codes, logs = finish(processes, timeout)
    assert codes == [0, 0], f"{name}: exit codes {codes}\n" + "\n".join(log[-3000:] for log in logs)
    return logs


def torchrun(node_rank, port):
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
            "--nproc_per_node", "1", "--master_addr", MASTER, "--master_port", str(port)]


def deepspeed_launcher(node_rank, port, hostfile):
    return [shutil.which("deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
            "--master_addr", MASTER, "--master_port", str(port)]


@pytest.fixture(scope="module")
def reference():
    """The one-process run at the global batch (2 x per-rank batch), in this process; the
    runs "ddp" and "ds_zero2" share it (fp32, no accumulation, 3 steps, no fault)."""
    assert harness.RUNS["ddp"].reference_key == harness.RUNS["ds_zero2"].reference_key
    base_models, base_ema = harness.build_models()
    _, _, record = harness.train(harness.RUNS["ddp"], copy.deepcopy(base_models), copy.deepcopy(base_ema), 0, 1,
                                 "single")
    return record


def load_rank0(directory):
    return torch.load(directory / "multinode_rank0.pt", weights_only=False)


# -- the harness runs across two nodes ------------------------------------------------------------
def test_torchrun_two_nodes_match_one_process_and_send_the_predicted_bytes(nodes, reference, tmp_path):
    logs = run_on_both(nodes, lambda r: [*torchrun(r, 29400), RANK_SCRIPT, str(tmp_path), "ddp"], tmp_path, "ddp")
    got = load_rank0(tmp_path)
    assert got["world"] == 2 and got["interfaces"] == [NODES[0][1], NODES[1][1]], logs[0][-2000:]
    assert_matches_single_process(harness.summarise("ddp", reference, got["results"]["ddp"]))
    check_bytes_against_model("ddp", got["counts"]["ddp"])


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not installed")
def test_deepspeed_launcher_two_nodes_zero2_matches_one_process_and_resumes_exactly(nodes, reference, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    logs = run_on_both(nodes, lambda r: [*deepspeed_launcher(r, 29410, hostfile), RANK_SCRIPT, str(tmp_path),
                                         "ds_zero2", "ds_zero2_resume"], tmp_path, "ds")
    got = load_rank0(tmp_path)
    assert got["world"] == 2 and got["interfaces"] == [NODES[0][1], NODES[1][1]], logs[0][-2000:]
    entry = harness.summarise("ds_zero2", reference, got["results"]["ds_zero2"])
    assert entry["faults"] == [None, None, None] and entry["optimizer_kinds"]["sit"] == "torch.AdamW"
    assert_matches_single_process(entry)
    check_bytes_against_model("zero2", got["counts"]["ds_zero2"])
    # saved at step 3 by both nodes, loaded into fresh engines, continued to 6: bitwise equal
    resumed = got["results"]["ds_zero2_resume"]
    assert max(resumed["max_error"].values()) == 0.0 and resumed["optimizer_max_error"] == 0.0, resumed
    assert {f"sit/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)} <= set(resumed["files"])


def check_bytes_against_model(strategy, counts):
    """The scaling model's per-step payload for 2 ranks and these trainable counts equals
    what the collectives carried; the rest is the small control traffic the model leaves
    out (gradient norms, finite flags, global BatchNorm statistics, logged scalars)."""
    sys.path.insert(0, str(Path(REPO) / "benchmarks"))
    import scaling

    predicted = scaling.payload_per_step(strategy, counts["trainable"], 2)
    measured = {"gradients": 0, "parameters": 0, "control": 0}
    for key, nbytes in counts["bytes"].items():
        measured[key.split("/")[0]] += nbytes
    per_step = {k: v / counts["steps"] for k, v in measured.items()}
    print(f"\n{strategy}, 2 ranks, bytes per step: model {predicted}, counted {per_step} ({counts['calls']})")
    assert per_step["gradients"] == predicted["gradients"], (per_step, predicted)
    assert per_step["parameters"] == predicted["parameters"], (per_step, predicted)
    assert 0 < per_step["control"] < 0.01 * predicted["gradients"], per_step


# -- the trainer across two nodes: resume, and a lost node ----------------------------------------
def trainer_on_both(nodes, directory, name, port, *extra):
    def command(rank):
        return train_command(directory, "--distributed", "ddp", "--checkpointing-steps", 2, "--log-every", 1,
                             "--dist-timeout", DIST_TIMEOUT, *extra,
                             launcher=[*torchrun(rank, port), "repa_e_fast/train.py"])
    return [start(node, command(rank), directory / f"{name}_node{rank}.log") for rank, node in enumerate(nodes)]


def test_trainer_two_nodes_lost_node_stops_the_other_then_resume_matches_uninterrupted(nodes, tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    killed.mkdir(), straight.mkdir()
    # A long run, so node B is certainly killed mid-run: after checkpoint 2 is complete.
    processes = trainer_on_both(nodes, killed, "first", 29420, "--max-train-steps", 1000)
    deadline = time.monotonic() + 180
    while not (checkpoint_dir(killed, 2) / "official.pt").exists():
        assert time.monotonic() < deadline and processes[0].poll() is None, Path(processes[0].log_path).read_text()
        time.sleep(0.2)
    kill_namespace(NODES[1][0])
    killed_at = time.monotonic()
    codes, logs = finish(processes, timeout=6 * DIST_TIMEOUT)
    stopped_after = time.monotonic() - killed_at
    assert codes[0] not in (0, "timeout"), logs[0][-3000:]  # node A stopped by itself, not by our timeout
    assert stopped_after < 3 * DIST_TIMEOUT, stopped_after
    assert "error: lost rank(s) [1] of 2 — rank 1 (node 1 of 2)" in logs[0], logs[0][-3000:]
    assert "--resume auto" in logs[0]

    # Resume on both nodes from the last complete checkpoint; an uninterrupted run to the same step.
    last = max(int(p.name) for p in (killed / "run" / "checkpoints").iterdir()
               if p.name.isdigit() and (p / "official.pt").exists())
    total = last + 2
    resumed = trainer_on_both(nodes, killed, "resumed", 29430, "--max-train-steps", total, "--resume", "auto")
    codes, logs = finish(resumed, timeout=240)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "resumed from" in logs[0] and f"at step {last}" in logs[0], logs[0][-2000:]
    uninterrupted = trainer_on_both(nodes, straight, "straight", 29440, "--max-train-steps", total)
    codes, logs = finish(uninterrupted, timeout=240)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)

    a, b = load_official(killed, total), load_official(straight, total)
    assert a["steps"] == b["steps"] == total
    assert_same_weights(a, b)  # bit-identical on the CPU
    for key in ("opt", "opt_vae", "opt_disc"):
        assert harness.max_diff(a[key], b[key]) == 0.0, key
