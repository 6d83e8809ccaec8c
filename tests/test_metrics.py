"""distill.metrics: Fréchet distance against closed forms (commuting, low-rank, 2x2), its sampling behaviour,
torchmetrics agreement, statistics files, the shipped digits classifier and the extractors' errors."""

from __future__ import annotations

import hashlib
import json
import sys
import types
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from distill.data import iterate_split
from distill.errors import DistillError
from distill.metrics import (DIGITS_CLASSIFIER, INCEPTION_ENV, accuracy, build_extractor, compute_stats,
                             fid_against_stats, frechet_distance, load_digits_classifier, load_stats,
                             make_fid_metric, save_stats, train_digits_classifier)


def _rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return q


def _random_cov(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _nuclear(m: np.ndarray) -> float:
    return float(np.linalg.svd(m, compute_uv=False).sum())


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance: closed forms


def test_fd_commuting_covariances_closed_form():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: tr sqrt(S1 S2) = sum sqrt(a_i b_i).
    rng = np.random.default_rng(0)
    d = 6
    q = _rotation(d, rng)
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10)
    # Rank-deficient commuting case: zeros in a carry no sqrt(a_i b_i) term.
    a[:2] = 0.0
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-10)


def test_fd_identical_is_zero_and_tensors_accepted():
    rng = np.random.default_rng(1)
    d = 32
    mu = rng.standard_normal(d)
    sigma = _random_cov(d, rng)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-10 * np.trace(sigma))
    # Singular (rank 8 of 32): still 0, no NaN from sqrt of negative round-off eigenvalues.
    u = rng.standard_normal((d, 8))
    assert frechet_distance(mu, u @ u.T, mu, u @ u.T) == pytest.approx(0.0, abs=1e-10 * np.trace(u @ u.T))
    # float32 tensors go through the same float64 path.
    s2 = _random_cov(d, rng)
    expected = frechet_distance(mu, sigma, np.zeros(d), s2)
    got = frechet_distance(torch.tensor(mu), torch.tensor(sigma), torch.zeros(d), torch.tensor(s2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_fd_symmetric_and_matches_exact_2x2_and_sqrtm():
    rng = np.random.default_rng(2)
    # 2x2: eigenvalues l1, l2 >= 0 of S1 S2 give tr sqrt = sqrt(l1 + l2 + 2 sqrt(l1 l2)) = sqrt(tr + 2 sqrt(det)).
    s1, s2 = _random_cov(2, rng), _random_cov(2, rng)
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(expected, rel=1e-10)
    # d = 20, non-commuting, well conditioned: scipy's sqrtm of S1 S2 is accurate here.
    d = 20
    s1, s2 = _random_cov(d, rng), _random_cov(d, rng)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    reference = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                 - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
    forward = frechet_distance(mu1, s1, mu2, s2)
    assert forward == pytest.approx(reference, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(forward, rel=1e-10)


def test_fd_low_rank_non_commuting_exact():
    # S1 = U U^T, S2 = V V^T: the nonzero eigenvalues of sqrt(S1) S2 sqrt(S1) are the squared singular values of
    # U^T V, so tr sqrt(S1 S2) = ||U^T V||_* exactly, computed without any square root of a singular matrix.
    rng = np.random.default_rng(3)
    d = 30
    u, v = rng.standard_normal((d, 5)), rng.standard_normal((d, 12))
    s1, s2 = u @ u.T, v @ v.T  # rank 5 and 12 of 30
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * _nuclear(u.T @ v)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-10)
    # Near-singular: a 1e-12 ridge moves the answer by O(d * 1e-12 + sqrt of it along null directions) only.
    ridge = 1e-12 * np.eye(d)
    assert frechet_distance(mu1, s1 + ridge, mu2, s2 + ridge) == pytest.approx(expected, rel=1e-6)


def test_fd_duplicated_and_zero_feature_columns():
    # Features x -> T x = [x, x_0, 0] have covariances T S T^T (singular: duplicated and constant columns).
    # With S = L L^T (Cholesky of the full-rank d x d covariance), tr sqrt(T S1 T^T T S2 T^T) = ||L1^T T^T T L2||_*.
    rng = np.random.default_rng(4)
    d, n = 5, 4000
    x1 = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    x2 = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 0.3
    raw = build_extractor("raw", num_features=d + 2)
    t = np.vstack([np.eye(d), np.eye(d)[:1], np.zeros((1, d))])  # (d + 2, d)
    stats = [compute_stats(raw, [torch.tensor(x @ t.T)]) for x in (x1, x2)]
    l1, l2 = (np.linalg.cholesky(np.cov(x, rowvar=False)) for x in (x1, x2))
    mu1, mu2 = t @ x1.mean(0), t @ x2.mean(0)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(stats[0]["sigma"]) + np.trace(stats[1]["sigma"])
                - 2 * _nuclear(l1.T @ t.T @ t @ l2))
    got = frechet_distance(stats[0]["mu"], stats[0]["sigma"], stats[1]["mu"], stats[1]["sigma"])
    assert np.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-8)


def test_fd_rejects_bad_shapes_and_values():
    mu, sigma = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="mu2"):
        frechet_distance(mu, sigma, np.zeros(4), sigma)
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(mu, np.eye(2), mu, sigma)
    with pytest.raises(ValueError, match="mu1"):
        frechet_distance(np.zeros((3, 1)), sigma, mu, sigma)
    with pytest.raises(ValueError, match="sigma2.*non-finite"):
        frechet_distance(mu, sigma, mu, np.full((3, 3), np.nan))


# ----------------------------------------------------------------------------------------------------------------
# Statistics from samples


def test_sample_fd_converges_to_closed_form():
    # x ~ N(0, diag a), y ~ N(delta, diag b), n samples each. Exact FD = |delta|^2 + sum (sqrt a - sqrt b)^2.
    # Bias of the plug-in estimate: the mean term is exactly E|mu1_hat - mu2_hat|^2 - |delta|^2 = (tr a + tr b)/n;
    # the covariance term's bias is O(d^2 max(a, b) / n) (4.3e-4 here, measured over 400 seeds: 5e-4 +- 1.4e-3).
    # Standard error by the delta method: dFD/dmu_hat = 2 delta (variance (a + b)/n per coordinate),
    # dFD/da_hat_i = 1 - sqrt(b_i/a_i) with Var(a_hat_i) = 2 a_i^2/n (and symmetrically for b). It matches the
    # spread over 400 seeds (0.0282 vs 0.0281). Bound: 4 standard errors plus both bias bounds.
    a, b, delta = np.array([1.0, 2.0, 3.0]), np.array([2.0, 1.0, 0.5]), np.array([0.5, 0.0, -0.5])
    d, n = 3, 20000
    exact = delta @ delta + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    mean_bias = (a.sum() + b.sum()) / n
    cov_bias_bound = d * d * max(a.max(), b.max()) / n
    se = np.sqrt(np.sum(4 * delta**2 * (a + b) / n) + np.sum((1 - np.sqrt(b / a)) ** 2 * 2 * a**2 / n)
                 + np.sum((1 - np.sqrt(a / b)) ** 2 * 2 * b**2 / n))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.tensor(np.sqrt(a))
    y = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.tensor(np.sqrt(b)) + torch.tensor(delta)
    raw = build_extractor("raw", num_features=d)
    sx, sy = (compute_stats(raw, z.float().split(1000)) for z in (x, y))
    estimate = frechet_distance(sx["mu"], sx["sigma"], sy["mu"], sy["sigma"])
    assert abs(estimate - exact - mean_bias) < 4 * se + cov_bias_bound
    # A wrong cross term (e.g. tr sqrt counted once) would be off by sum sqrt(a b) = 3.6, about 130 se.
    assert 4 * se + cov_bias_bound < 0.2


def test_compute_stats_matches_numpy_and_handles_offsets_and_limits():
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((1000, 4)) * [1.0, 2.0, 0.5, 1e-2] + 1e4).astype(np.float32)  # mean >> std
    x64 = x.astype(np.float64)
    raw = build_extractor("raw", num_features=4)
    batches = [(torch.tensor(x[i:i + 128]), torch.zeros(len(x[i:i + 128]))) for i in range(0, len(x), 128)]
    stats = compute_stats(raw, batches)
    assert stats["n"] == 1000 and stats["extractor_id"] == "raw-4"
    assert stats["mu"].dtype == np.float64 and stats["sigma"].dtype == np.float64
    np.testing.assert_allclose(stats["mu"], x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["sigma"], np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-12)
    limited = compute_stats(raw, [torch.tensor(x[i:i + 128]) for i in range(0, len(x), 128)], max_samples=300)
    assert limited["n"] == 300
    np.testing.assert_allclose(limited["sigma"], np.cov(x64[:300], rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(DistillError, match="at least 2 samples"):
        compute_stats(raw, [torch.tensor(x[:1])])
    with pytest.raises(DistillError, match="expected 4"):
        compute_stats(raw, [torch.zeros(8, 3)])


def test_torchmetrics_agrees_with_frechet_distance():
    rng = np.random.default_rng(7)
    d = 4
    real = torch.tensor(rng.standard_normal((3000, d)) @ rng.standard_normal((d, d)), dtype=torch.float32)
    fake = torch.tensor(rng.standard_normal((2000, d)) @ rng.standard_normal((d, d)) + 0.5, dtype=torch.float32)
    raw = build_extractor("raw", num_features=d)
    metric = make_fid_metric(raw)
    assert metric.real_features_cov_sum.dtype == torch.float64  # float64 states without set_dtype (1.9.0)
    for batch in real.split(500):
        metric.update(batch, real=True)
    for batch in fake.split(500):
        metric.update(batch, real=False)
    value = metric.compute()
    sr, sf = compute_stats(raw, real.split(500)), compute_stats(raw, fake.split(500))
    expected = frechet_distance(sf["mu"], sf["sigma"], sr["mu"], sr["sigma"])
    assert value.dtype == torch.float32  # cast back to the features' dtype: about 1e-7 relative
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # reset_real_features=False: after reset() the real statistics remain and the same fakes give the same value.
    metric.reset()
    for batch in fake.split(500):
        metric.update(batch, real=False)
    assert metric.compute().item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Statistics files


def _stats(d: int = 3, extractor_id: str = "raw-3") -> dict:
    rng = np.random.default_rng(8)
    return {"mu": rng.standard_normal(d), "sigma": _random_cov(d, rng), "n": 123, "extractor_id": extractor_id}


def test_stats_round_trip(tmp_path):
    stats = _stats()
    path = tmp_path / "sub" / "ref.npz"
    save_stats(path, stats)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ref.npz"]  # no temporary file left behind
    loaded = load_stats(path, expected_extractor_id="raw-3", num_features=3)
    np.testing.assert_array_equal(loaded["mu"], stats["mu"])
    np.testing.assert_array_equal(loaded["sigma"], stats["sigma"])
    assert loaded["n"] == 123 and loaded["extractor_id"] == "raw-3"
    with np.load(path, allow_pickle=False) as data:  # plain arrays, readable by EDM-style code
        assert set(data.files) == {"mu", "sigma", "n", "extractor_id"}


def test_edm_style_stats_accepted_with_warning(tmp_path):
    stats = _stats()
    path = tmp_path / "edm.npz"
    np.savez(path, mu=stats["mu"], sigma=stats["sigma"])
    loaded = load_stats(path)
    assert loaded["extractor_id"] == "unknown" and loaded["n"] == 0
    with pytest.warns(UserWarning, match="do not say which extractor"):
        load_stats(path, expected_extractor_id="raw-3", num_features=3)
    with pytest.raises(DistillError, match="3 features.*gives 5"):
        load_stats(path, expected_extractor_id="raw-5", num_features=5)


def test_mismatched_extractor_refused(tmp_path):
    path = tmp_path / "ref.npz"
    save_stats(path, _stats(extractor_id="digits-cnn:000000000000"))
    with pytest.raises(DistillError) as info:
        load_stats(path, expected_extractor_id="digits-cnn:e93ff327ea53")
    message = str(info.value)
    assert "made with digits-cnn:000000000000" in message and "features are digits-cnn:e93ff327ea53" in message
    raw = build_extractor("raw", num_features=3)
    with pytest.raises(DistillError, match="made with digits-cnn:000000000000, features are raw-3"):
        fid_against_stats(raw, [torch.zeros(4, 3)], path)


def test_bad_stats_files(tmp_path):
    with pytest.raises(DistillError, match="missing.npz do not exist"):
        load_stats(tmp_path / "missing.npz")
    np.savez(tmp_path / "nosigma.npz", mu=np.zeros(3))
    with pytest.raises(DistillError, match="lack sigma"):
        load_stats(tmp_path / "nosigma.npz")
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(DistillError, match=r"shape \(3,\).*\(4, 4\)"):
        load_stats(tmp_path / "shapes.npz")
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(DistillError, match="cannot read"):
        load_stats(tmp_path / "junk.npz")


def test_fid_against_stats_records_extractor_and_counts(tmp_path):
    rng = np.random.default_rng(9)
    raw = build_extractor("raw", num_features=2)
    ref = compute_stats(raw, [torch.tensor(rng.standard_normal((500, 2)), dtype=torch.float32)])
    save_stats(tmp_path / "ref.npz", ref)
    fake = torch.tensor(rng.standard_normal((400, 2)) + 1.0, dtype=torch.float32)
    result = fid_against_stats(raw, fake.split(100), tmp_path / "ref.npz", max_samples=300)
    assert result["n"] == 300 and result["ref_n"] == 500 and result["extractor_id"] == "raw-2"
    fs = compute_stats(raw, [fake[:300]])
    assert result["fid"] == pytest.approx(frechet_distance(fs["mu"], fs["sigma"], ref["mu"], ref["sigma"]), rel=1e-12)
    assert fid_against_stats(raw, fake.split(100), ref, max_samples=300)["fid"] == pytest.approx(result["fid"])


# ----------------------------------------------------------------------------------------------------------------
# Extractors


def test_shipped_digits_classifier(digits_shards):
    info = json.loads(DIGITS_CLASSIFIER.with_name("classifier.json").read_text())
    sha12 = hashlib.sha256(DIGITS_CLASSIFIER.read_bytes()).hexdigest()[:12]
    extractor = build_extractor("digits")
    assert extractor.extractor_id == f"digits-cnn:{sha12}" == info["extractor_id"]
    assert extractor.extractor_id == build_extractor("digits", path=DIGITS_CLASSIFIER).extractor_id
    assert extractor.num_features == info["num_features"] == 64
    assert DIGITS_CLASSIFIER.stat().st_size < 1_000_000
    images, labels = (torch.cat(parts) for parts in zip(*iterate_split(digits_shards, "val", 256)))
    assert len(labels) == 180
    features = extractor(images)
    assert features.shape == (180, 64) and features.dtype == torch.float32 and not features.requires_grad
    assert accuracy(load_digits_classifier(), images, labels) >= 0.95  # committed weights: 0.989 when shipped
    extractor.train()
    assert not extractor.training  # a parent's .train() must not switch a feature network to training mode
    with pytest.raises(DistillError, match=r"expected \(1, 8, 8\)"):
        extractor(torch.zeros(2, 1, 16, 16))


def test_digits_features_separate_real_from_noise(digits_shards):
    # FD(val, train) is dominated by the small-sample bias of 180 val images (about 28 when shipped; 180 train
    # images against all train give 22-26), noise images sit near 1000: an order of magnitude is a safe margin.
    extractor = build_extractor("digits")
    val = compute_stats(extractor, iterate_split(digits_shards, "val", 256))
    train = compute_stats(extractor, iterate_split(digits_shards, "train", 256))
    noise = torch.rand(180, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real_fd = frechet_distance(val["mu"], val["sigma"], train["mu"], train["sigma"])
    noise_fd = fid_against_stats(extractor, [noise], val)["fid"]
    assert real_fd < 0.1 * noise_fd
    # Dead ReLU units make these covariances singular; torchmetrics (eigvals of S1 S2) still agrees here.
    metric = make_fid_metric(extractor)
    for images, _ in iterate_split(digits_shards, "train", 256):
        metric.update(images, real=True)
    for images, _ in iterate_split(digits_shards, "val", 256):
        metric.update(images, real=False)
    assert metric.compute().item() == pytest.approx(real_fd, rel=1e-4)


def test_train_digits_classifier_writes_loadable_files(digits_shards, tmp_path):
    """100 steps at batch 32 (about 1.5 s) train the classifier well above chance, and the accuracy recorded in
    classifier.json is that of the weights written. Chance is 0.1 on the 180 val images (10 classes), with a
    standard error of sqrt(0.1 * 0.9 / 180) = 0.022: a bound of 0.5 is 18 standard errors above it, and seeds 1-5
    reach 0.79-0.86 (seeded: the test sees 0.84)."""
    info = train_digits_classifier(digits_shards, tmp_path / "cls", steps=100, batch_size=32, seed=1, command="cmd")
    on_disk = json.loads((tmp_path / "cls" / "classifier.json").read_text())
    assert on_disk == info
    assert {"val_accuracy", "train_steps", "seed", "command", "extractor_id", "num_features"} <= set(info)
    assert info["train_steps"] == 100 and info["seed"] == 1 and info["command"] == "cmd"
    extractor = build_extractor("digits", path=tmp_path / "cls" / "classifier.pt")
    assert extractor.extractor_id == info["extractor_id"] != build_extractor("digits").extractor_id
    assert info["val_samples"] == 180 and info["val_accuracy"] > 0.5 and info["train_accuracy"] > 0.5
    images, labels = map(torch.cat, zip(*iterate_split(digits_shards, "val", 256)))
    saved = load_digits_classifier(tmp_path / "cls" / "classifier.pt")
    assert accuracy(saved, images, labels) == info["val_accuracy"]


def test_extractor_errors(tmp_path):
    with pytest.raises(DistillError, match="unknown feature extractor 'clip'.*raw, digits, inception"):
        build_extractor("clip")
    with pytest.raises(DistillError, match="num_features"):
        build_extractor("raw")
    with pytest.raises(DistillError, match="nope.pt does not exist"):
        build_extractor("digits", path=tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(DistillError, match="cannot load digits classifier"):
        build_extractor("digits", path=tmp_path / "bad.pt")


def test_inception_without_torch_fidelity(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails whether or not it is installed
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(DistillError) as info:
        build_extractor("inception")
    message = str(info.value)
    assert "pip install torch-fidelity" in message and "distill[inception]" in message and "torchvision" in message


class _FakeInception(torch.nn.Module):
    """Stands in for torch-fidelity's FeatureExtractorInceptionV3: records its input, returns (B, 2048)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None):
        super().__init__()
        assert features_list == ["2048"]
        self.weights = feature_extractor_weights_path
        self.seen = None

    def forward(self, x):
        self.seen = x
        return (x.float().mean((1, 2, 3))[:, None].expand(-1, 2048),)


def test_inception_weights_missing_or_given(monkeypatch, tmp_path):
    fake = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    fake.FeatureExtractorInceptionV3 = _FakeInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", fake)

    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    with pytest.raises(DistillError) as info:
        build_extractor("inception")
    message = str(info.value)
    assert "eval.inception_weights" in message and INCEPTION_ENV in message and "nothing is downloaded" in message
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "absent.pth"))
    with pytest.raises(DistillError, match=f"absent.pth does not exist.*eval.inception_weights.*{INCEPTION_ENV}"):
        build_extractor("inception")

    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"weights")
    monkeypatch.setenv(INCEPTION_ENV, str(weights))
    extractor = build_extractor("inception")
    assert extractor.num_features == 2048
    assert extractor.extractor_id == f"inception-2048:{hashlib.sha256(b'weights').hexdigest()[:12]}"
    assert extractor.network.weights == str(weights)
    images = torch.tensor([-1.0, 0.0, 1.0, 0.5]).reshape(1, 1, 2, 2)
    features = extractor(images)
    assert features.shape == (1, 2048)
    seen = extractor.network.seen  # quantised like a saved PNG, grey repeated to RGB
    assert seen.dtype == torch.uint8 and seen.shape == (1, 3, 2, 2)
    assert seen[0, 0].flatten().tolist() == [0, 128, 255, 191] and torch.equal(seen[0, 0], seen[0, 2])
    # An explicit path wins over the environment variable.
    assert build_extractor("inception", path=weights).extractor_id == extractor.extractor_id


def test_load_stats_warning_is_silent_for_known_ids(tmp_path):
    save_stats(tmp_path / "ref.npz", _stats())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_stats(tmp_path / "ref.npz", expected_extractor_id="raw-3", num_features=3)
