"""evaluate.py and repa_e_fast.metrics: the metric formulas against answers computed
independently (closed forms, scipy's sqrtm, hand-worked point sets), and the Inception
pipeline's mechanics with RANDOM weights (the real pt_inception file is not available here):
architecture / key layout, TF1 resize, feature shapes and layout, weight loading, and the
whole command on tiny image sets (FID(x, x) = 0, precision = recall = 1)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import linalg

from repa_e_fast import evaluate
from repa_e_fast.metrics import (
    InceptionV3,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_inception,
    manifold_radii,
    precision_recall,
    softmax,
    tf1_resize_bilinear,
    trace_sqrt_product,
)
from repa_e_fast.models.checkpoints import CheckpointError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: the 2-core test machine is shared, and two threads that wait on each
    other in every convolution run several times slower there than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------
def random_orthogonal(dim, rng):
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def test_frechet_distance_closed_form_for_commuting_covariances():
    # Same eigenvectors => FD = |mu1 - mu2|^2 + sum (sqrt(d1) - sqrt(d2))^2.
    rng = np.random.default_rng(0)
    dim = 12
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    d1, d2 = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-12)
    q = random_orthogonal(dim, rng)
    rotated = frechet_distance(mu1, q @ np.diag(d1) @ q.T, mu2, q @ np.diag(d2) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)
    # Known numbers: 1-D N(0, 4) vs N(3, 1): 9 + (2 - 1)^2 = 10.
    assert frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(10.0, rel=1e-12)


def test_frechet_distance_matches_sqrtm_for_general_covariances():
    # The ADM evaluator's formula, tr(sqrtm(S1 S2)) with scipy, on non-commuting full-rank covariances.
    rng = np.random.default_rng(1)
    dim = 40
    a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    sigma1, sigma2 = a @ a.T / dim + 0.1 * np.eye(dim), b @ b.T / dim + 0.1 * np.eye(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    reference = (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) \
        - 2 * np.trace(linalg.sqrtm(sigma1 @ sigma2)).real
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-10)
    swapped = frechet_distance(mu2, sigma2, mu1, sigma1)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(swapped, rel=1e-10)
    # Rank-deficient covariances (fewer samples than dimensions): FD(x, x) = 0, and sqrtm agrees.
    mu, sigma = feature_statistics(rng.normal(size=(5, dim)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-10
    assert trace_sqrt_product(sigma, sigma1) == pytest.approx(np.trace(linalg.sqrtm(sigma @ sigma1)).real, rel=1e-6)
    # Singular on the second side too (the factor is taken of the first).
    assert trace_sqrt_product(sigma1, sigma) == pytest.approx(trace_sqrt_product(sigma, sigma1), rel=1e-9)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu1, sigma1, mu2[:-1], sigma2[:-1, :-1])


def test_feature_statistics_are_mean_and_unbiased_covariance():
    features = np.random.default_rng(2).normal(size=(30, 5)).astype(np.float32)
    mu, sigma = feature_statistics(features)
    centred = features.astype(np.float64) - features.mean(0, dtype=np.float64)
    np.testing.assert_allclose(mu, features.mean(0, dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 29, rtol=1e-10)


# ----------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------
def peaked_probs(labels, num_classes, peak):
    probs = np.full((len(labels), num_classes), (1 - peak) / (num_classes - 1))
    probs[np.arange(len(labels)), labels] = peak
    return probs


def test_inception_score_known_answers():
    classes, peak = 4, 0.7
    # Every split holds every class equally => p(y) uniform, and each image has
    # KL = peak log(peak C) + (1 - peak) log((1 - peak) C / (C - 1)).
    kl = peak * math.log(peak * classes) + (1 - peak) * math.log((1 - peak) * classes / (classes - 1))
    balanced = peaked_probs(np.tile(np.arange(classes), 4), classes, peak)  # 16 images
    assert inception_score(balanced, split_size=8) == pytest.approx(math.exp(kl), rel=1e-12)
    # Identical predictions: KL = 0, IS = 1.
    assert inception_score(peaked_probs(np.zeros(10, int), classes, peak), split_size=5) == pytest.approx(1.0)
    # The score is the mean over splits: one collapsed split (1) and one balanced split.
    mixed = np.concatenate([peaked_probs(np.zeros(8, int), classes, peak), balanced[:8]])
    assert inception_score(mixed, split_size=8) == pytest.approx((1 + math.exp(kl)) / 2, rel=1e-12)
    # A shorter last chunk is its own split: here the 4 balanced images after 8 collapsed ones.
    assert inception_score(mixed[:12], split_size=8) == pytest.approx((1 + math.exp(kl)) / 2, rel=1e-12)
    assert inception_score(mixed[:12], split_size=12) < (1 + math.exp(kl)) / 2


def test_softmax_is_stable_and_normalised():
    probs = softmax(np.array([[1000.0, 1000.0, -1000.0], [0.0, math.log(3.0), 0.0]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5, 0.0], [0.2, 0.6, 0.2]], atol=1e-15)


# ----------------------------------------------------------------------------------------
# Precision and recall
# ----------------------------------------------------------------------------------------
def on_a_line(values, dim=3):
    points = torch.zeros(len(values), dim)
    points[:, 0] = torch.tensor(values, dtype=torch.float32)
    return points


def test_precision_recall_on_a_worked_example():
    # Reference 0..4: squared radii (4th smallest distance including the point itself, k = 3)
    # are 9, 4, 4, 4, 9. Samples: a cluster 2..3.5 (radii 2.25, 1, 1, 2.25), a point at 7
    # (radius 20.25) and a far cluster 20..21.5.
    reference = on_a_line([0, 1, 2, 3, 4])
    samples = on_a_line([2, 2.5, 3, 3.5, 7, 20, 20.5, 21, 21.5])
    assert manifold_radii(reference).tolist() == [9, 4, 4, 4, 9]
    assert manifold_radii(samples).tolist() == [2.25, 1, 1, 2.25, 20.25, 2.25, 1, 1, 2.25]
    # Precision: the near cluster is inside, 7 is exactly on the ball of 4 (9 <= 9), the far
    # cluster is out: 5/9. Recall: 0 is 2 away from the nearest sample (4 > 2.25), the others
    # are inside: 4/5.
    for batch_size in (2, 10000):  # blocked and unblocked distance computations agree
        precision, recall = precision_recall(reference, samples, k=3, batch_size=batch_size)
        assert precision == pytest.approx(5 / 9) and recall == pytest.approx(4 / 5)
    assert precision_recall(samples, samples) == (1.0, 1.0)
    with pytest.raises(ValueError, match="at least k"):
        manifold_radii(on_a_line([0, 1, 2]))


# ----------------------------------------------------------------------------------------
# The Inception network (random weights)
# ----------------------------------------------------------------------------------------
def randomise(model):
    """Variance-preserving random weights so activations neither vanish nor explode."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        model.fc.bias.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def inception():
    return randomise(InceptionV3())


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory, inception):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(inception.state_dict(), path)
    return path


def test_architecture_matches_the_fid_inception_layout(inception):
    # torchvision's inception_v3 has 27,161,264 parameters; without AuxLogits (3,326,696) and
    # with a 1008-way fc (+8 * 2049) that is 23,850,960, the FID network's count.
    assert sum(p.numel() for p in inception.parameters()) == 23_850_960
    shapes = {k: tuple(v.shape) for k, v in inception.state_dict().items()}
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6d.branch7x7_2.conv.weight"] == (160, 160, 1, 7)
    assert shapes["Mixed_7a.branch3x3_2.conv.weight"] == (320, 192, 3, 3)
    assert shapes["Mixed_7c.branch3x3dbl_3b.bn.running_var"] == (384,)
    assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)
    assert not any("AuxLogits" in k for k in shapes)


def test_tf1_resize_bilinear_has_no_half_pixel_offset():
    image = torch.tensor([[1.0, 3.0], [5.0, 11.0]]).view(1, 1, 2, 2)
    # Output pixel i samples input i * 2 / 4 = 0, 0.5, 1, 1.5 (the last ones clamp to the border).
    row = lambda a, b: [a, (a + b) / 2, b, b]  # noqa: E731
    top, bottom = row(1.0, 3.0), row(5.0, 11.0)
    expected = torch.tensor([top, [(t + b) / 2 for t, b in zip(top, bottom)], bottom, bottom])
    torch.testing.assert_close(tf1_resize_bilinear(image, 4)[0, 0], expected)
    same = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(tf1_resize_bilinear(same, 5), same)


def test_features_shapes_layout_and_determinism(inception):
    torch.manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 40, 36)).float()
    captured = {}

    def keep_first_output(module, inputs, output):
        captured.setdefault("out", output)  # returns None: the output is not replaced

    hook = inception.Mixed_6d.branch1x1.register_forward_hook(keep_first_output)
    with torch.no_grad():
        out = inception(images)
        again = inception(images)
        alone = inception(images[1:2])
    hook.remove()
    assert out["pool"].shape == (2, 2048) and out["spatial"].shape == (2, 2023) and out["logits"].shape == (2, 1008)
    assert out["pool"].std() > 1e-3 and out["spatial"].std() > 1e-3  # not degenerate
    for name in out:
        assert torch.equal(out[name], again[name])
        torch.testing.assert_close(out[name][1:2], alone[name], rtol=1e-4, atol=1e-5)
    # sFID features: mixed_6/conv, first 7 channels, flattened as TensorFlow's NHWC.
    expected_spatial = captured["out"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)
    assert captured["out"].shape[-2:] == (17, 17)
    torch.testing.assert_close(out["spatial"], expected_spatial)
    # IS logits: pool_3 times the fc weight, without the bias (the ADM evaluator's softmax input).
    torch.testing.assert_close(out["logits"], out["pool"] @ inception.fc.weight.t())
    assert inception.fc.bias.abs().sum() > 0


def test_load_inception_is_strict_and_names_the_missing_file(inception, inception_file, tmp_path):
    state = torch.load(inception_file)
    # Files without BatchNorm counters (older PyTorch) load; the weights are the file's.
    no_counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    torch.save(no_counters, tmp_path / "old.pth")
    loaded = load_inception(str(tmp_path / "old.pth"))
    assert not loaded.training and torch.equal(loaded.fc.weight, inception.fc.weight)
    torch.save({**state, "AuxLogits.fc.weight": torch.zeros(1000, 768)}, tmp_path / "aux.pth")
    with pytest.raises(CheckpointError, match="AuxLogits.fc.weight"):
        load_inception(str(tmp_path / "aux.pth"))
    with pytest.raises(FileNotFoundError, match=r"pt_inception-2015-12-05-6726825d\.pth.*pytorch-fid"):
        load_inception(str(tmp_path / "absent.pth"))


# ----------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------
def test_reference_statistics_prefers_precomputed_ones(tmp_path):
    stats = {key: np.full((2,) if key.startswith("mu") else (2, 2), float(i))
             for i, key in enumerate(evaluate.REFERENCE_STATISTICS_KEYS)}
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), **stats)
    (mu, sigma), (mu_s, sigma_s) = evaluate.reference_statistics(str(tmp_path / "ref.npz"), None)
    assert mu.tolist() == [0, 0] and sigma[0, 0] == 1 and mu_s[0] == 2 and sigma_s[0, 0] == 3
    np.savez(tmp_path / "partial.npz", mu=stats["mu"], sigma=stats["sigma"])
    with pytest.raises(ValueError, match=r"lacks \['mu_s', 'sigma_s'\]"):
        evaluate.reference_statistics(str(tmp_path / "partial.npz"), None)
    activations = {"pool": np.random.default_rng(0).normal(size=(6, 3)), "spatial": np.eye(4)}
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    (mu, sigma), _ = evaluate.reference_statistics(str(tmp_path / "images.npz"), activations)
    np.testing.assert_allclose(sigma, np.cov(activations["pool"], rowvar=False))


def test_evaluate_command_on_identical_sets(inception, inception_file, tmp_path, capsys):
    # 4 images = k + 1, the fewest precision / recall allows.
    images = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    np.savez_compressed(tmp_path / "reference.npz", arr_0=images)  # compressed members stream too
    argv = ["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "reference.npz"),
            "--inception", str(inception_file), "--batch-size", "4", "--device", "cpu",
            "--json", str(tmp_path / "metrics.json")]
    assert evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    for label in ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:"):
        assert label in printed
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert abs(metrics["fid"]) < 1e-3 and abs(metrics["sfid"]) < 1e-3
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    with torch.no_grad():
        logits = inception(torch.from_numpy(images).permute(0, 3, 1, 2).float())["logits"].numpy()
    assert metrics["inception_score"] == pytest.approx(inception_score(softmax(logits)), rel=1e-4)
    assert metrics["inception_score"] > 1.0


def test_evaluate_command_errors(tmp_path, capsys):
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(tmp_path / "ok.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert evaluate.main([str(tmp_path / "missing.npz"), str(tmp_path / "ok.npz")]) == 2
    assert "npz file not found" in capsys.readouterr().err
    absent = str(tmp_path / "pretrained" / "pt_inception-2015-12-05-6726825d.pth")
    assert evaluate.main(["--samples", str(tmp_path / "ok.npz"), "--ref", str(tmp_path / "ok.npz"),
                          "--inception", absent]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: Inception weights not found") and "releases/download/fid_weights" in error
    with pytest.raises(ValueError, match="must be uint8 images"):
        with evaluate.open_npz_images(str(tmp_path / "floats.npz")):
            pass


@pytest.mark.parametrize("damage, message", [
    ("nan", "(mu, sigma): sigma has 1 non-finite value(s)"),
    ("negative_definite", "(mu, sigma): sigma is not positive semi-definite (lowest eigenvalue -1)"),
    ("asymmetric", "(mu, sigma): sigma is not symmetric"),
])
def test_reference_statistics_that_are_not_a_covariance_are_an_error(inception_file, tmp_path, capsys, damage,
                                                                       message):
    sigma = np.eye(2048)
    if damage == "nan":
        sigma[3, 3] = np.nan
    elif damage == "negative_definite":
        sigma = -sigma
    else:
        sigma[0, 1] = 0.5
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=sigma, mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    images = np.random.default_rng(4).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=images)
    argv = [str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), "--inception", str(inception_file),
            "--batch-size", "4", "--device", "cpu"]
    assert evaluate.main(argv) == 2
    captured = capsys.readouterr()
    assert "FID" not in captured.out
    error = captured.err.strip().splitlines()[-1]
    assert error.startswith("error: ") and message in error and "ref.npz" in error


def test_frechet_distance_refuses_statistics_that_are_not_a_covariance():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(50, 6))
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match="second statistics: sigma is not positive semi-definite"):
        frechet_distance(mu, sigma, mu, -sigma)
    with pytest.raises(ValueError, match="first statistics: mu has 1 non-finite"):
        frechet_distance(np.r_[mu[:-1], np.inf], sigma, mu, sigma)
    # Singular but valid (fewer samples than dimensions): accepted.
    few = features[:3]
    frechet_distance(few.mean(0), np.cov(few, rowvar=False), mu, sigma)


# ----------------------------------------------------------------------------------------
# Which file is the reference: --ref / --samples, or detected (ADM's order works unchanged)
# ----------------------------------------------------------------------------------------
def test_reference_batch_is_detected_in_either_positional_order(tmp_path, capsys):
    statistics = {"mu": np.zeros(3), "sigma": np.eye(3), "mu_s": np.zeros(2), "sigma_s": np.eye(2)}
    ref, samples, other = (str(tmp_path / name) for name in ("ref.npz", "samples.npz", "other.npz"))
    np.savez(ref, arr_0=np.zeros((2, 8, 8, 3), np.uint8), **statistics)  # an ADM reference batch
    np.savez(samples, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    np.savez(other, arr_0=np.ones((2, 8, 8, 3), np.uint8))
    assert evaluate.resolve_inputs([ref, samples], None, None) == (samples, ref)  # ADM: REF SAMPLES
    assert evaluate.resolve_inputs([samples, ref], None, None) == (samples, ref)  # ours
    assert evaluate.resolve_inputs([], other, samples) == (samples, other)  # explicit roles: no detection
    assert "reference batch: " in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["samples.npz", "other.npz"], "neither carries reference statistics mu/sigma): name them with --ref"),
    (["ref.npz", "ref2.npz"], "both carry reference statistics"),
    (["samples.npz"], "expected two .npz files"),
    (["samples.npz", "--ref", "ref.npz"], "give both --ref REF.npz and --samples SAMPLES.npz"),
    (["--ref", "ref.npz", "--samples", "missing.npz"], "npz file not found"),
])
def test_ambiguous_or_incomplete_inputs_are_refused_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    statistics = {"mu": np.zeros(3), "sigma": np.eye(3), "mu_s": np.zeros(2), "sigma_s": np.eye(2)}
    for name in ("ref.npz", "ref2.npz"):
        np.savez(tmp_path / name, **statistics)
    for name in ("samples.npz", "other.npz"):
        np.savez(tmp_path / name, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluate, "load_inception", lambda *a, **k: pytest.fail("network built before the check"))
    assert evaluate.main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and message in error[0]
