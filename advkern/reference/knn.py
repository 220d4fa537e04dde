"""k-nearest-neighbour classification in NumPy (the transfer experiment's non-differentiable,
lazy target, as in Papernot, McDaniel & Goodfellow 2016).

For a query a (D,) and training points b_j (D,) with labels y_j, the squared Euclidean
distance is expanded as

    d_j = ||a||^2 + ||b_j||^2 - 2 a . b_j

so a block of C queries against N training points is one (C, D) x (D, N) GEMM
(2 C N D FLOPs) instead of a (C, N, D) difference tensor (C N D * 8 bytes). It is computed
in float64 and clamped at 0 (the expansion can round a zero distance to -1e-12).
Queries are taken in chunks of C rows so the (C, N) distance block and its (C, N) sort
order stay under ``max_bytes`` (default 64 MiB: C = 1,000 queries for N = 4,000).

Tie-breaking (documented, deterministic, and what the brute-force test checks):

- equal distances: the training point with the lower index comes first (a stable sort of
  the computed distances), so the k neighbours are the first k in (distance, index) order;
- equal vote counts: among the classes with the most votes, the one whose nearest member
  among the k neighbours comes first in that order wins (for k = 1, or a clear majority,
  this is the plain nearest neighbour / majority vote).

Ties are decided on the computed float64 distances: points at exactly equal true distance
whose expansions round differently are ordered by the rounded values.
"""

import numpy as np

from .._validate import check_float_array, check_int, check_labels
from ..errors import AdvkernError, ShapeError


class KNN:
    """k-NN classifier: ``KNN(k).fit(x, y)`` then ``predict(x)``.

    x: (N, ...) float32/float64 (flattened to (N, D)); y: (N,) int labels in [0, K).
    """

    def __init__(self, k=3, max_bytes=64 * 2**20):
        self.k = check_int(k, "k")
        self.max_bytes = check_int(max_bytes, "max_bytes")
        self.x = None

    def fit(self, x, y):
        x = check_float_array(x, "x")
        if x.ndim < 2 or len(x) == 0:
            raise ShapeError(f"x must be (N, ...) with N >= 1 training points, got {x.shape}")
        y = np.asarray(y)
        self.num_classes = int(y.max()) + 1 if y.size else 0
        self.y = check_labels(y, len(x), max(self.num_classes, 1))
        if self.k > len(x):
            raise AdvkernError(f"k = {self.k} is more than the {len(x)} training points")
        self.x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        self.sq = np.einsum("ij,ij->i", self.x, self.x)
        return self

    def _check(self, x):
        if self.x is None:
            raise AdvkernError("KNN: call fit(x, y) before predict")
        x = check_float_array(x, "x")
        if x.ndim < 1 or int(np.prod(x.shape[1:])) != self.x.shape[1]:
            raise ShapeError(f"x must have {self.x.shape[1]} features per row (as the "
                             f"training points), got shape {x.shape}")
        return np.asarray(x, dtype=np.float64).reshape(len(x), -1)

    def chunk_rows(self):
        """Queries per chunk: the (C, N) float64 distances and (C, N) int64 order <= max_bytes."""
        return max(1, self.max_bytes // (16 * len(self.x)))

    def distances(self, q):
        """Squared distances (C, N) float64 of query rows q (C, D) to the training points."""
        d = q @ self.x.T
        # in place: one (C, N) block alive, not four temporaries
        d *= -2.0
        d += np.einsum("ij,ij->i", q, q)[:, None]
        d += self.sq[None, :]
        return np.maximum(d, 0.0, out=d)

    def neighbours(self, x):
        """Indices (M, k) of each query's k nearest training points, in (distance, index)
        order. x: (M, ...) -> (M, k) int64."""
        q = self._check(x)
        out = np.empty((len(q), self.k), np.int64)
        c = self.chunk_rows()
        for a in range(0, len(q), c):
            d = self.distances(q[a:a + c])
            out[a:a + c] = np.argsort(d, axis=1, kind="stable")[:, :self.k]
        return out

    def predict(self, x):
        """Predicted labels (M,) int64 by majority vote of the k neighbours (ties: see the
        module docstring)."""
        nb = self.neighbours(x)
        lab = self.y[nb]                                              # (M, k)
        rows = np.arange(len(lab))
        counts = np.zeros((len(lab), max(self.num_classes, 1)), np.int64)
        np.add.at(counts, (np.repeat(rows, self.k), lab.ravel()), 1)
        best = counts.max(axis=1)
        # the first neighbour (nearest first) whose class has the top count
        first = np.argmax(counts[rows[:, None], lab] == best[:, None], axis=1)
        return lab[rows, first].astype(np.int64)

    def accuracy(self, x, y):
        return float(np.mean(self.predict(x) == np.asarray(y))) if len(x) else float("nan")
