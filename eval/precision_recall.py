"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
Generative Models"), k = 3 nearest neighbours, in any feature space.

Each set's manifold is the union of balls around its feature vectors, each ball's radius the distance to that
vector's k-th nearest neighbour in the same set. Precision: the fraction of generated samples inside the real
manifold (are the samples realistic?). Recall: the fraction of real samples inside the generated manifold (does the
model cover the data?). A one-step student that drops modes keeps its precision and loses recall, which FID alone
mixes with everything else.

Both sets are used at equal size: the k-NN radii grow as a set shrinks, so unequal sizes would favour the smaller
set. The larger set is subsampled (a fixed seed) to the smaller's size; the size used is returned.
"""

from __future__ import annotations

import numpy as np
import torch

K = 3


# Rows of the distance matrix held at once (chunk x n float64), so 50k samples need ~0.4 GB, not 20 GB.
CHUNK = 1024


def knn_radii(feats: torch.Tensor, k: int = K) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row."""
    # kthvalue k + 1: the smallest distance (0) is the row itself
    return torch.cat([torch.cdist(feats[i: i + CHUNK], feats).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(feats), CHUNK)])


def coverage_fraction(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``queries`` inside at least one ball (``support`` row, ``radii`` entry)."""
    inside = [(torch.cdist(queries[i: i + CHUNK], support) <= radii[None, :]).any(dim=1)
              for i in range(0, len(queries), CHUNK)]
    return float(torch.cat(inside).double().mean())


def precision_recall(fake: np.ndarray, real: np.ndarray, k: int = K, seed: int = 0) -> tuple[float, float, int]:
    """(precision, recall, n) of generated features ``fake`` against real features ``real`` (rows), both at n =
    min of the two sizes (the larger set subsampled with ``seed``)."""
    n = min(len(fake), len(real))
    if n <= k:
        raise ValueError(f"precision/recall with k = {k} need more than {k} samples in each set, got {n}")
    rng = np.random.default_rng(seed)

    def take(x: np.ndarray) -> torch.Tensor:
        rows = np.sort(rng.choice(len(x), n, replace=False)) if len(x) > n else np.arange(n)
        return torch.from_numpy(np.asarray(x, dtype=np.float64)[rows])

    f, r = take(fake), take(real)
    precision = coverage_fraction(f, r, knn_radii(r, k))
    recall = coverage_fraction(r, f, knn_radii(f, k))
    return precision, recall, n
