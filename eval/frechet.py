"""Fréchet distance, KID and feature statistics files: the numeric core of every FID-style number in stepdistill.

Everything here is float64 NumPy, independent of the feature extractor: FID is :func:`frechet_distance` on Inception
pool3 statistics, ``fd_digits`` is the same function on the digits classifier's features.

The Fréchet distance between N(mu1, s1) and N(mu2, s2) is

    |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrt(s1 s2))

and tr(sqrt(s1 s2)) is computed as the sum of the real square roots of the eigenvalues of s1 @ s2 (the product of
two PSD matrices has real non-negative eigenvalues; numerical noise can make a few slightly negative or complex,
those real parts are clipped to 0). This avoids ``scipy.linalg.sqrtm``'s slow Schur iteration and its
"singular product" failure mode while giving the same value (tested).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from stepdistill.errors import UserError

# Above this many features per set the full Gram matrices (N^2 float64) get too large; KID then works per subset.
_KID_FULL_GRAM_MAX = 6000


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, unbiased, as pytorch-fid / torchmetrics) of (N, D) features.

    When N <= D the covariance is rank-deficient: a ``UserWarning`` says so (FID is then biased upward and depends
    strongly on N), and the statistics are still returned.
    """
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2:
        raise UserError(f"features must be a 2-D (N, D) array, got shape {f.shape}")
    n, d = f.shape
    if n < 2:
        raise UserError(f"need at least 2 samples to estimate a covariance, got N={n}")
    if n <= d:
        warnings.warn(rank_deficient_message(n, d), UserWarning, stacklevel=2)
    mu = f.mean(axis=0)
    sigma = np.cov(f, rowvar=False)
    return mu, sigma


def rank_deficient_message(n: int, d: int) -> str:
    """The one warning text for statistics estimated from too few samples."""
    return (f"covariance is rank-deficient at N={n} <= feature dim {d}: FID is biased upward and not comparable "
            f"across sample counts; prefer KID at this N (or use N >> {d} samples for FID)")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians, in float64 (see the module docstring for the formula)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]):
        raise UserError(f"statistics do not match (mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}): "
                        "both sides must come from the same feature extractor")
    diff = mu1 - mu2
    eig = np.linalg.eigvals(s1 @ s2)
    # Clip numerical noise: true eigenvalues are >= 0, tiny negative real parts would otherwise give NaN roots.
    eig = np.maximum(eig.real, 0.0) + 1j * eig.imag
    tr_covmean = np.sqrt(eig).real.sum()
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _poly_gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 between the rows of a and b."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 of one subset pair, as torch-fidelity / torchmetrics (k_xy keeps its diagonal)."""
    m = k_xx.shape[0]
    sum_xx = k_xx.sum() - np.trace(k_xx)
    sum_yy = k_yy.sum() - np.trace(k_yy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * k_xy.sum() / m**2)


def kid(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std over ``num_subsets`` random subsets of the unbiased polynomial MMD^2.

    Same estimator as torch-fidelity and torchmetrics' ``KernelInceptionDistance`` (kernel (x.y/d + 1)^3, subsets
    drawn without replacement, population std). ``subset_size`` is clipped to min(N1, N2); the subsets come from a
    seeded generator so the number is reproducible.
    """
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise UserError(f"KID needs two (N, D) feature arrays of the same D, got {f1.shape} and {f2.shape}")
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise UserError(f"KID needs at least 2 samples per set, got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    # With moderate N, the full Gram matrices are computed once and every subset just indexes them: identical
    # numbers, ~num_subsets times fewer matmuls.
    full = max(len(f1), len(f2)) <= _KID_FULL_GRAM_MAX
    if full:
        g11, g22, g12 = _poly_gram(f1, f1), _poly_gram(f2, f2), _poly_gram(f1, f2)
    scores = np.empty(num_subsets)
    for i in range(num_subsets):
        a = rng.choice(len(f1), m, replace=False)
        b = rng.choice(len(f2), m, replace=False)
        if full:
            k11, k22, k12 = g11[np.ix_(a, a)], g22[np.ix_(b, b)], g12[np.ix_(a, b)]
        else:
            x, y = f1[a], f2[b]
            k11, k22, k12 = _poly_gram(x, x), _poly_gram(y, y), _poly_gram(x, y)
        scores[i] = _mmd2_unbiased(k11, k12, k22)
    return float(scores.mean()), float(scores.std())


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, **meta) -> Path:
    """Write ``mu``/``sigma`` (float64) to an .npz (suffix added if missing); ``meta`` is stored as a JSON string."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        path = path.with_name(path.name + ".npz")  # what np.savez would do anyway; return the real name
    path.parent.mkdir(parents=True, exist_ok=True)
    # A JSON string keeps the file loadable without allow_pickle.
    np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             meta=np.array(json.dumps(meta, default=str)))
    return path


def _open_stats(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a stats file, or a UserError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"statistics file '{p}' does not exist (make one with `stepdistill stats IMAGE_FOLDER`)")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"statistics file '{p}' is not a readable .npz ({type(e).__name__})") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise UserError(f"statistics file '{p}' lacks 'mu'/'sigma' (keys: {', '.join(arrays) or 'none'})")
    return arrays


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as float64 from an .npz written by :func:`save_stats` (or pytorch-fid / clean-fid style)."""
    z = _open_stats(path)
    mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d):
        raise UserError(f"statistics file '{path}' has mu {mu.shape} and sigma {sigma.shape}; "
                        "expected (D,) and (D, D)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"statistics file '{path}' holds non-finite values")
    return mu, sigma


def load_stats_meta(path: str | Path) -> dict:
    """The metadata saved with a stats file ({} if it has none)."""
    z = _open_stats(path)
    if "meta" not in z:
        return {}
    try:
        return dict(json.loads(str(z["meta"])))
    except (ValueError, TypeError):
        return {}
