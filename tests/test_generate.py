"""generate.py (docs/workflows.md#repa_e_fastgenerate): the sampling plan (seeds, global
indices, class balance), the official-format inputs (--exp-path / --ckpt, REPA-E and LDM-only
VAEs), the truncating uint8 cast, the PNG folder + npz outputs, one process vs torchrun with two
CPU ranks, and errors.

The model is a random SiT-S/2 on 4x4 latents (32 px images, f8d4 VAE with ch=32). Every
process runs single-threaded (torchrun's default), so in-process runs reproduce the
subprocesses' images.
"""

import argparse
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from _paths import REPO
from repa_e_fast import generate
from repa_e_fast.models import build_sit, build_vae
from repa_e_fast.models.checkpoints import CheckpointError

RUN_ARGS = dict(model="SiT-S/2", vae="f8d4", enc_type="dinov2-vit-s", resolution=32, num_classes=10, cfg_prob=0.1,
                encoder_depth=2, qk_norm=False, fused_attn=True, bn_momentum=0.1, projector_dim=64)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """An official experiment directory (args.json + checkpoints/0000005.pt, REPA-E: with
    'vae'), the same checkpoint as a lone file with pickled Namespace args, and an LDM-only
    checkpoint (no 'vae') with a separate VAE file and its latent statistics."""
    root = tmp_path_factory.mktemp("generate")
    torch.manual_seed(0)
    sit = build_sit("SiT-S/2", input_size=4, in_channels=4, num_classes=10, z_dims=[384], encoder_depth=2,
                    projector_dim=64)
    with torch.no_grad():
        # adaLN-Zero starts with a zero velocity: randomise the modulation and output layers
        # so that the samples depend on the noise, the label and the guidance.
        for name, parameter in sit.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                parameter.normal_(0, 0.05)
        sit.bn.running_mean.uniform_(-0.5, 0.5)
        sit.bn.running_var.uniform_(0.5, 2.0)
    vae = build_vae("f8d4", ch=32)
    ema, vae_state = sit.state_dict(), vae.state_dict()

    exp = root / "exp-run"
    (exp / "checkpoints").mkdir(parents=True)
    (exp / "args.json").write_text(json.dumps(RUN_ARGS))
    torch.save({"ema": ema, "vae": vae_state, "args": argparse.Namespace(**RUN_ARGS), "steps": 5},
               exp / "checkpoints" / "0000005.pt")

    vae_path = root / "frozen-vae.pt"
    torch.save(vae_state, vae_path)
    stats = {"latents_scale": torch.rand(1, 4, 1, 1) + 0.5, "latents_bias": torch.randn(1, 4, 1, 1)}
    torch.save(stats, root / "frozen-vae-latents-stats.pt")
    ldm_ckpt = root / "ldm.pt"
    torch.save({"ema": ema, "args": {**RUN_ARGS, "vae_ckpt": str(vae_path)}, "steps": 5}, ldm_ckpt)
    return SimpleNamespace(root=root, exp=exp, ckpt=exp / "checkpoints" / "0000005.pt", ldm_ckpt=ldm_ckpt,
                           vae_path=vae_path, stats=stats, bn_mean=ema["bn.running_mean"], bn_var=ema["bn.running_var"])


@pytest.fixture(scope="module")
def repae_run(run_files):
    """The REPA-E run as generate loads it (through --exp-path), loaded once."""
    return generate.load_run(None, str(run_files.exp), "5", None, None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread, as each torchrun worker has (OMP_NUM_THREADS=1): the in-process runs
    then reproduce the subprocesses' arithmetic, and the shared 2-core machine is not
    oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def single_threaded_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}


def parse_options(flags):
    return generate.build_parser().parse_args(["--ckpt", "unused"] + flags)


def read_pngs(folder, indices):
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png"))) for i in indices])


def generate_in_process(run, folder, opts, rank, world_size):
    os.makedirs(folder, exist_ok=True)
    return generate.generate_on_rank(run, str(folder), opts, rank, world_size, torch.device("cpu"))


# ----------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------
def test_rank_seeds_are_the_official_formula():
    assert [generate.rank_seed(0, r, 1) for r in range(1)] == [0]
    assert [generate.rank_seed(0, r, 2) for r in range(2)] == [0, 1]
    assert [generate.rank_seed(7, r, 3) for r in range(3)] == [10, 12, 13]  # (7+r)*3//2
    assert generate.rank_seed(1, 0, 8) == 4


def test_global_indices_cover_every_image_once():
    num_samples, batch, world = 23, 4, 3
    iterations = generate.num_iterations(num_samples, batch, world)
    assert iterations == 2  # ceil(23 / 12)
    per_rank = {r: torch.cat([generate.global_indices(r, world, batch, it) for it in range(iterations)]).tolist()
                for r in range(world)}
    everything = sorted(i for indices in per_rank.values() for i in indices)
    assert everything == list(range(iterations * batch * world))
    assert per_rank[1][:4] == [1, 4, 7, 10]  # i * W + r, then + n * W per iteration
    assert per_rank[1][4:] == [13, 16, 19, 22]


def test_class_balanced_labels():
    labels = generate.class_balanced_labels(50, 10, seed=3)
    assert torch.bincount(labels, minlength=10).tolist() == [5] * 10
    assert torch.equal(labels, generate.class_balanced_labels(50, 10, seed=3))
    assert not torch.equal(labels, generate.class_balanced_labels(50, 10, seed=4))
    assert not torch.equal(labels, torch.arange(10).repeat_interleave(5))  # shuffled
    with pytest.raises(ValueError, match="divisible"):
        generate.class_balanced_labels(55, 10, seed=0)


def test_decode_truncates_to_uint8():
    class Decoder:  # decode returns the latents themselves as "images" in [-1, 1]
        def decode(self, z):
            return SimpleNamespace(sample=z)

    # 255 * (v + 1) / 2 = 254.9, 0.4, 127.99..., then out-of-range values clamp.
    values = torch.tensor([254.9 / 127.5 - 1, 0.4 / 127.5 - 1, 127.99 / 127.5 - 1, -3.0, 2.0], dtype=torch.float64)
    latents = values.view(1, 1, 1, 5).expand(1, 3, 1, 5)
    images = generate.decode_to_uint8(Decoder(), latents, torch.ones(1), torch.zeros(1))
    assert images.dtype == np.uint8 and images.shape == (1, 1, 5, 3)
    assert images[0, 0, :, 0].tolist() == [254, 0, 127, 0, 255]


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
def test_repae_checkpoint_uses_its_vae_and_ema_bn_statistics(run_files, repae_run):
    assert repae_run.run_name == "exp-run_0000005"
    assert not repae_run.model.training and not repae_run.vae.training
    assert torch.equal(repae_run.latents_scale, run_files.bn_var.rsqrt().view(1, 4, 1, 1))
    assert torch.equal(repae_run.latents_bias, run_files.bn_mean.view(1, 4, 1, 1))
    # A lone file in <exp>/checkpoints/ names its samples like --exp-path; elsewhere by its stem.
    assert generate.run_name_from_paths(str(run_files.ckpt), None, None) == "exp-run_0000005"
    assert generate.run_name_from_paths("/x/y/model-ema.pt", None, None) == "model-ema"


def test_ldm_only_checkpoint_uses_vae_file_and_its_statistics(run_files, tmp_path):
    run = generate.load_run(str(run_files.ldm_ckpt), None, None, None, None)
    assert run.run_name == "ldm"
    assert torch.equal(run.latents_scale, run_files.stats["latents_scale"])
    assert torch.equal(run.latents_bias, run_files.stats["latents_bias"])
    # --vae-ckpt overrides the run's vae_ckpt; its statistics file must exist beside it.
    lone_vae = tmp_path / "other.pt"
    lone_vae.write_bytes(run_files.vae_path.read_bytes())
    with pytest.raises(FileNotFoundError, match="other-latents-stats.pt"):
        generate.load_run(str(run_files.ldm_ckpt), None, None, None, str(lone_vae))


def test_projector_widths_come_from_the_encoder_type(run_files, tmp_path):
    # dinov2-vit-b means 768-wide projector outputs: the 384-wide checkpoint must not load.
    args_json = tmp_path / "args.json"
    args_json.write_text(json.dumps({**RUN_ARGS, "enc_type": "dinov2-vit-b"}))
    with pytest.raises(CheckpointError, match=r"projectors.0.4.weight: checkpoint \(384, 64\) vs model \(768, 64\)"):
        generate.load_run(str(run_files.ckpt), None, None, str(args_json), None)
    assert generate.encoder_dims("dinov2-vit-s,dinov2-vit-l") == [384, 1024]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ckpt", "missing.pt"], "checkpoint not found: missing.pt"),
        (["--exp-path", "nowhere", "--train-steps", "5"], "experiment directory not found"),
        (["--exp-path", "x"], "--exp-path needs --train-steps"),
        (["--ckpt", "x.pt", "--mode", "sde", "--heun"], "only available for ODE"),
        (["--ckpt", "x.pt", "--cfg-scale", "0.5"], "--cfg-scale must be >= 1"),
        (["--ckpt", "x.pt", "--guidance-low", "0.8", "--guidance-high", "0.2"], "guidance interval"),
    ],
)
def test_flag_and_file_errors(argv, message, capsys, tmp_path):
    assert generate.main(argv + ["--sample-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error


def test_checkpoint_errors(run_files, tmp_path, capsys):
    no_args = tmp_path / "no-args.pt"
    torch.save({"ema": {"x": torch.zeros(1)}}, no_args)
    assert generate.main(["--ckpt", str(no_args), "--sample-dir", str(tmp_path)]) == 2
    assert "has no 'args' entry: pass --args-json" in capsys.readouterr().err

    argv = ["--exp-path", str(run_files.exp), "--train-steps", "5", "--sample-dir", str(tmp_path)]
    assert generate.main(argv + ["--class-balanced", "--num-fid-samples", "15"]) == 2
    assert "divisible by the number of classes (10)" in capsys.readouterr().err
    assert generate.main(argv[:3] + ["6"] + argv[4:]) == 2  # no checkpoints/0000006.pt
    assert "0000006.pt" in capsys.readouterr().err
    assert not any(tmp_path.glob("*cfg*")), "nothing may be written before the inputs are checked"


# ----------------------------------------------------------------------------------------
# Outputs: one process (CLI) == in-process; torchrun with 2 ranks == the per-rank plan
# ----------------------------------------------------------------------------------------
def test_single_process_cli_writes_pngs_and_npz_and_skips_when_done(run_files, repae_run, tmp_path, capsys):
    flags = ["--num-fid-samples", "5", "--pproc-batch-size", "4", "--num-steps", "2", "--mode", "sde",
             "--cfg-scale", "2.0", "--guidance-high", "0.7"]
    command = [sys.executable, "-m", "repa_e_fast.generate", "--exp-path", str(run_files.exp), "--train-steps", "5",
               "--sample-dir", str(tmp_path / "cli")] + flags
    result = subprocess.run(command, capture_output=True, text=True, env=single_threaded_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "cli" / "exp-run_0000005_cfg2.0-0.0-0.7"
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(8)]  # ceil(5 / 4) * 4 images
    with np.load(f"{folder}.npz") as npz:
        assert list(npz.keys()) == ["arr_0"]
        samples = npz["arr_0"]
    assert samples.dtype == np.uint8 and samples.shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(samples, read_pngs(folder, range(5)))
    assert samples.std() > 0

    # The same plan in this process gives the same images.
    opts = parse_options(flags)
    written = generate_in_process(repae_run, tmp_path / "here", opts, rank=0, world_size=1)
    assert written == list(range(8))
    assert np.abs(read_pngs(tmp_path / "here", range(8)).astype(int) - read_pngs(folder, range(8))).max() <= 1

    # A finished run is not loaded or sampled again.
    (folder / "000000.png").unlink()
    argv = ["--exp-path", str(run_files.exp), "--train-steps", "5", "--sample-dir", str(tmp_path / "cli")] + flags
    assert generate.main(argv) == 0
    assert "Skipping sampling" in capsys.readouterr().out
    assert not (folder / "000000.png").exists()


def test_torchrun_two_ranks_class_balanced(run_files, repae_run, tmp_path):
    flags = ["--num-fid-samples", "10", "--pproc-batch-size", "3", "--num-steps", "2", "--cfg-scale", "1.0",
             "--class-balanced", "--global-seed", "5"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "repa_e_fast.generate", "--ckpt", str(run_files.ckpt),
               "--sample-dir", str(tmp_path / "ddp")] + flags
    result = subprocess.run(command, capture_output=True, text=True, env=single_threaded_env(), timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = tmp_path / "ddp" / "exp-run_0000005_cfg1.0-0.0-1.0-balanced"
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(12)]  # ceil(10 / 6) * 6
    with np.load(f"{folder}.npz") as npz:
        samples = npz["arr_0"]
    assert samples.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(samples, read_pngs(folder, range(10)))

    # Each rank's images are exactly what the plan gives rank r of 2 (its seed, its
    # interleaved indices, the balanced labels); the ranks' index sets are disjoint.
    run = repae_run  # the same checkpoint, loaded through --exp-path
    opts = parse_options(flags)
    rank0 = generate_in_process(run, tmp_path / "r", opts, rank=0, world_size=2)
    rank1 = generate_in_process(run, tmp_path / "r", opts, rank=1, world_size=2)
    assert rank0 == [0, 2, 4, 6, 8, 10] and rank1 == [1, 3, 5, 7, 9, 11]
    assert np.abs(read_pngs(tmp_path / "r", range(12)).astype(int) - read_pngs(folder, range(12))).max() <= 1

    # Labels matter: the same seeds without class balance give different images.
    uniform = parse_options([flag for flag in flags if flag != "--class-balanced"])
    generate_in_process(run, tmp_path / "u", uniform, rank=0, world_size=2)
    assert not np.array_equal(read_pngs(tmp_path / "u", rank0), read_pngs(folder, rank0))


# ----------------------------------------------------------------------------------------
# A checkpoint sweep: one sample folder per checkpoint, never another checkpoint's samples
# ----------------------------------------------------------------------------------------
def test_our_checkpoint_layout_names_the_folder_by_run_and_step(tmp_path):
    ours = tmp_path / "exp" / "checkpoints"
    assert generate.run_name_from_paths(str(ours / "0000020" / "official.pt"), None, None) == "exp_0000020"
    assert generate.run_name_from_paths(str(ours / "0000010" / "official.pt"), None, None) == "exp_0000010"
    assert generate.run_name_from_paths(str(tmp_path / "A" / "0000020" / "official.pt"), None, None) == "A_0000020"


def test_samples_of_another_checkpoint_are_never_reused(run_files, tmp_path, capsys):
    """Two steps of one run: their folders differ; an .npz made from another checkpoint (same
    folder name, e.g. a file replaced in place) or with other flags is refused (exit 2)."""
    flags = ["--num-fid-samples", "2", "--pproc-batch-size", "2", "--num-steps", "1", "--cfg-scale", "1.0",
             "--sample-dir", str(tmp_path / "s")]
    steps = {}
    for step in (20, 10):
        directory = tmp_path / "A" / "checkpoints" / f"{step:07d}"
        directory.mkdir(parents=True)
        os.link(run_files.ckpt, directory / "official.pt")
        steps[step] = directory / "official.pt"
        assert generate.main(["--ckpt", str(steps[step])] + flags) == 0, capsys.readouterr().err
    produced = sorted(p.name for p in (tmp_path / "s").glob("*.npz"))
    assert produced == ["A_0000010_cfg1.0-0.0-1.0.npz", "A_0000020_cfg1.0-0.0-1.0.npz"]
    source = json.loads((tmp_path / "s" / "A_0000020_cfg1.0-0.0-1.0.source.json").read_text())
    assert source["checkpoint"] == os.path.realpath(steps[20]) and source["sampling"]["num_fid_samples"] == 2
    capsys.readouterr()

    # The same checkpoint and flags again: reused.
    assert generate.main(["--ckpt", str(steps[20])] + flags) == 0
    assert "Skipping sampling" in capsys.readouterr().out
    # Step 20 saved again (a resumed run rewrites it): another file under the same name.
    steps[20].unlink()
    torch.save({**torch.load(run_files.ckpt, weights_only=False), "steps": 21}, steps[20])
    assert generate.main(["--ckpt", str(steps[20])] + flags) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "holds samples of" in error and "remove" in error
    # Other sampling flags under the same folder name (the seed is not in the name).
    assert generate.main(["--ckpt", str(steps[10]), "--global-seed", "3"] + flags) == 2
    assert "global_seed differ" in capsys.readouterr().err
    # An .npz whose origin is unknown (no source record) is not trusted either.
    (tmp_path / "s" / "A_0000010_cfg1.0-0.0-1.0.source.json").unlink()
    assert generate.main(["--ckpt", str(steps[10])] + flags) == 2
    assert "is missing or unreadable" in capsys.readouterr().err


def test_projector_widths_of_every_encoder_family():
    assert generate.encoder_dims("jepa-vit-h,clip-vit-L,mocov3-vit-b,mae-vit-l,dinov2-vit-b") == [
        1280, 1024, 768, 1024, 768]


def test_official_generate_command_line_and_label_sampling(run_files, tmp_path, capsys):
    """The official README's generate.py flags, unchanged (a smaller run: fewer samples and steps
    appended, later flags win); --label-sampling equal is --class-balanced."""
    official = ["--num-fid-samples", "50000", "--path-type", "linear", "--mode", "sde", "--num-steps", "250",
                "--cfg-scale", "1.0", "--guidance-high", "1.0", "--guidance-low", "0.0",
                "--exp-path", str(run_files.exp), "--train-steps", "5"]
    small = ["--num-fid-samples", "10", "--num-steps", "1", "--pproc-batch-size", "10", "--sample-dir", str(tmp_path)]
    assert generate.main(official + small + ["--label-sampling", "equal"]) == 0, capsys.readouterr().err
    assert (tmp_path / "exp-run_0000005_cfg1.0-0.0-1.0-balanced.npz").is_file()
    assert generate.main(official + small + ["--label-sampling", "random", "--class-balanced"]) == 2
    assert "contradicts --class-balanced" in capsys.readouterr().err
