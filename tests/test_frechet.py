"""Fréchet distance, KID and stats files against scipy / torchmetrics on identical features."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from stepdistill.errors import UserError
from stepdistill.eval.frechet import feature_stats, frechet_distance, kid, load_stats, load_stats_meta, save_stats


def _feats(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """Correlated Gaussian features: a random linear mix, so covariances are non-diagonal."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(123).normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) * scale) @ mix + shift


def _sqrtm_fid(mu1, s1, mu2, s2) -> float:
    """Textbook formula with scipy's matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d", [2, 16, 64])
def test_frechet_matches_scipy_sqrtm(d):
    mu1, s1 = feature_stats(_feats(500, d, 0))
    mu2, s2 = feature_stats(_feats(400, d, 1, shift=0.3, scale=1.5))
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours > 0
    np.testing.assert_allclose(ours, _sqrtm_fid(mu1, s1, mu2, s2), rtol=1e-7, atol=1e-9)


def test_frechet_matches_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    mu1, s1 = feature_stats(_feats(300, 32, 0))
    mu2, s2 = feature_stats(_feats(300, 32, 1, shift=0.5))
    t = lambda a: torch.from_numpy(a)  # float64 tensors, the dtype torchmetrics computes in
    ref = _compute_fid(t(mu1), t(s1), t(mu2), t(s2)).item()
    np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-9)


def test_feature_stats_float64_unbiased():
    f = _feats(50, 4, 0).astype(np.float32)
    mu, sigma = feature_stats(f)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False))


def test_identical_stats_give_zero():
    mu, s = feature_stats(_feats(400, 32, 0))
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8


def test_rank_deficient_warns_and_matches_scipy_sqrtm():
    a, b = _feats(20, 64, 0), _feats(20, 64, 1, shift=1.0)
    with pytest.warns(UserWarning, match=r"rank-deficient at N=20.*KID"):
        mu1, s1 = feature_stats(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mu2, s2 = feature_stats(b)
    val = frechet_distance(mu1, s1, mu2, s2)
    # s1 s2 has rank <= 19 of 64: the square root of its ~1e-16 null eigenvalues is ~1e-8 each, so sqrtm (and the
    # code's eigenvalue route) carry ~1e-6 absolute noise on a value of ~119; rtol 1e-6 allows 1.2e-4 (seen: 4e-7
    # against sqrtm, 3e-6 against the exact route below).
    np.testing.assert_allclose(val, _sqrtm_fid(mu1, s1, mu2, s2), rtol=1e-6)
    # Exact low-rank route, no matrix function of the singular product: with s1 = A^T A and s2 = B^T B (A, B the
    # centred features / sqrt(N - 1)), tr sqrt(s1 s2) is the sum of the singular values of the 20x20 matrix A B^T.
    ca, cb = (a - a.mean(0)) / np.sqrt(19), (b - b.mean(0)) / np.sqrt(19)
    tr_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    exact = np.sum((mu1 - mu2) ** 2) + np.sum(ca**2) + np.sum(cb**2) - 2 * tr_sqrt
    np.testing.assert_allclose(val, exact, rtol=1e-6)
    assert val > 50  # a mean shift of 1.0 in each of 64 dims alone gives |mu1 - mu2|^2 ~ 64 (the rest is >= 0)


def test_mismatched_dims_is_user_error():
    with pytest.raises(UserError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kid_same_vs_shifted():
    a, b = _feats(300, 32, 0), _feats(300, 32, 1)
    same, same_std = kid(a, b, num_subsets=20, subset_size=200)
    shifted, _ = kid(a, _feats(300, 32, 2, shift=1.0), num_subsets=20, subset_size=200)
    assert abs(same) < 0.02 and same_std >= 0
    assert shifted > 0.5 and shifted > 20 * abs(same)


def test_kid_matches_torchmetrics_poly_mmd():
    from torchmetrics.image.kid import poly_mmd

    a, b = _feats(60, 16, 0), _feats(60, 16, 1, shift=0.3)
    # subset_size = N: each subset is a permutation of the full set, and MMD^2 is permutation invariant.
    mean, std = kid(a, b, num_subsets=3, subset_size=60)
    ref = poly_mmd(torch.from_numpy(a), torch.from_numpy(b)).item()
    np.testing.assert_allclose(mean, ref, rtol=1e-9)
    assert std < 1e-9


def test_kid_subset_size_clipped_and_seeded():
    a, b = _feats(30, 8, 0), _feats(40, 8, 1)
    r1 = kid(a, b, num_subsets=10, subset_size=1000, seed=3)
    assert r1 == kid(a, b, num_subsets=10, subset_size=1000, seed=3)
    assert np.isfinite(r1[0])
    with pytest.raises(UserError):
        kid(a[:1], b)


def test_kid_per_subset_path_equals_full_gram(monkeypatch):
    import stepdistill.eval.frechet as fr

    a, b = _feats(50, 8, 0), _feats(50, 8, 1, shift=0.2)
    full = kid(a, b, num_subsets=5, subset_size=30, seed=1)
    monkeypatch.setattr(fr, "_KID_FULL_GRAM_MAX", 10)
    np.testing.assert_allclose(kid(a, b, num_subsets=5, subset_size=30, seed=1), full, rtol=1e-10)


def test_stats_round_trip(tmp_path):
    mu, sigma = feature_stats(_feats(100, 8, 0))
    p = tmp_path / "ref_stats.npz"
    save_stats(p, mu, sigma, ref="digits16", num_images=100)
    mu2, sigma2 = load_stats(p)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    assert load_stats_meta(p) == {"ref": "digits16", "num_images": 100}
    assert mu2.dtype == np.float64


def test_bad_stats_files(tmp_path):
    with pytest.raises(UserError, match="missing.npz"):
        load_stats(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="junk.npz"):
        load_stats(junk)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, mean=np.zeros(3))
    with pytest.raises(UserError, match="lacks 'mu'/'sigma'"):
        load_stats(wrong)
    shapes = tmp_path / "shapes.npz"
    np.savez(shapes, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(UserError, match="shapes.npz"):
        load_stats(shapes)
