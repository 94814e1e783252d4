"""Logging a long run: TensorBoard events read back, W&B offline with the run id kept across a
resume, log.txt with what stdout shows; and --no-fused-attn honoured (explicit formula)."""

import json
import subprocess

import pytest
import torch
import torch.nn.functional as F

from _paths import REPO
from _train_helpers import checkpoint_dir, train_command, train_env
from repa_e_fast.models.sit import SiT


def test_tensorboard_wandb_offline_and_log_txt_across_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    env = {**train_env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    flags = ("--report-to", "jsonl,tensorboard,wandb", "--checkpointing-steps", 2)
    outputs = []
    for steps, extra in ((2, ()), (4, ("--resume", "auto"))):
        done = subprocess.run(train_command(tmp_path, "--max-train-steps", steps, *flags, *extra), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(done.stdout)
    run = tmp_path / "run"

    # W&B: one id, stored in the checkpoint, used by both processes (offline run folders).
    run_id = torch.load(checkpoint_dir(tmp_path, 2) / "trainer.pt", weights_only=False)["progress"]["wandb_run_id"]
    assert run_id and torch.load(checkpoint_dir(tmp_path, 4) / "trainer.pt",
                                 weights_only=False)["progress"]["wandb_run_id"] == run_id
    offline = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith("-" + run_id) for name in offline), offline

    # TensorBoard: the scalars of steps 1..4 equal metrics.jsonl's.
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scalars = events.Scalars("sit_loss")
    assert [s.step for s in scalars] == [1, 2, 3, 4]
    assert [s.value for s in scalars] == pytest.approx([r["sit_loss"] for r in logged], rel=1e-6)
    assert "samples" in events.Tags()["images"]

    # log.txt: every line stdout showed, from both processes, in order.
    log_lines = (run / "log.txt").read_text().splitlines()
    shown = [line for out in outputs for line in out.splitlines() if line.startswith("[repa_e_fast]")]
    assert len(shown) >= 4 and [line.split(" ", 2)[2] for line in log_lines] == shown


def test_no_fused_attn_uses_the_explicit_formula(monkeypatch):
    kwargs = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=5,
                  z_dims=[8], projector_dim=16, encoder_depth=1)
    torch.manual_seed(0)
    fused = SiT(**kwargs)
    explicit = SiT(**kwargs, fused_attn=False)
    explicit.load_state_dict(fused.state_dict())
    assert {b.attn.kernel for b in fused.blocks} == {"sdpa"} and {b.attn.kernel for b in explicit.blocks} == {"math"}
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([0, 3])
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        explicit.load_state_dict(fused.state_dict())
        reference = fused.inference(x, t, y)
    calls = []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        output = explicit.inference(x, t, y)
    assert calls == []  # no fused kernel was called
    torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="conflicts with attention='xformers'"):
        SiT(**kwargs, fused_attn=False, attention="xformers")
