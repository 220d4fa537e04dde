"""Losses from logits and their gradients, per sample.

Every loss returns ``(loss, dlogits)`` with ``loss`` of shape (N,) (one value per sample)
and ``dlogits`` (N, K) = d(sum_n loss_n) / d logits. Returning the gradient of the SUM
means a sample's gradient never depends on the batch size; divide by N for the mean.

A binary model has one logit z per sample (K = 1); it is read as the two-class logits
(0, z), so softmax cross-entropy becomes the logistic loss log(1 + exp(-(2y - 1) z)) and
class 1 is predicted when z > 0.
"""

import numpy as np


def as_two_class(logits):
    """(N, 1) binary logits -> (N, 2) logits (0, z); (N, K >= 2) unchanged."""
    if logits.shape[1] == 1:
        return np.concatenate([np.zeros_like(logits), logits], axis=1)
    return logits


def _from_two_class(dlogits, k):
    # d/dz of f(0, z) is the derivative with respect to the second column.
    return dlogits[:, 1:] if k == 1 else dlogits


def log_softmax(logits):
    """log softmax(z)_k = z_k - logsumexp(z), stable for any logits. (N, K) -> (N, K)."""
    z = as_two_class(logits)
    rows = np.arange(len(z))
    top = z.argmax(axis=1)
    # Shift by the max first: (z - m) is exact near the max, whereas z - (m + log(...)) loses
    # ~|m| * eps. Then log(sum exp(s)) = log1p(sum over the others), so a confident model's
    # log p_max = -log1p(tiny) keeps its tiny value instead of rounding log(1 + tiny) to 0.
    s = z - z[rows, top][:, None]
    e = np.exp(s)
    e[rows, top] = 0
    return s - np.log1p(e.sum(axis=1, keepdims=True))


def softmax(logits):
    """Class probabilities, (N, K) -> (N, max(K, 2))."""
    return np.exp(log_softmax(logits))


def predict(logits):
    """Predicted class per sample, (N, K) -> (N,) int64 (z > 0 for a binary model)."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).astype(np.int64)
    return logits.argmax(axis=1)


def cross_entropy(logits, y):
    """Softmax cross-entropy J(z, y) = logsumexp(z) - z_y, computed with log-sum-exp.

    logits: (N, K), y: (N,) int in [0, max(K, 2)) -> loss (N,), dlogits (N, K)
    with dJ/dz = softmax(z) - onehot(y).
    """
    k = logits.shape[1]
    logp = log_softmax(logits)
    rows = np.arange(len(y))
    loss = -logp[rows, y]
    d = np.exp(logp)
    d[rows, y] -= 1
    return loss, _from_two_class(d, k).astype(logits.dtype, copy=False)


def margin(logits, y, kappa=None):
    """Carlini-Wagner margin f(z, y) = max_{j != y} z_j - z_y (positive iff y is not predicted).

    Untargeted attacks ascend f(z, y_true); targeted attacks descend f(z, t) — the same rule
    as for cross-entropy. With ``kappa`` the loss is clipped below at -kappa (C&W's f6 with
    confidence kappa); the gradient is zero where the clip is active.
    logits: (N, K), y: (N,) -> loss (N,), dlogits (N, K): +1 at the best other class
    (the first on ties), -1 at y.
    """
    k = logits.shape[1]
    z = as_two_class(logits)
    rows = np.arange(len(y))
    others = z.copy()
    others[rows, y] = -np.inf
    j = others.argmax(axis=1)
    loss = z[rows, j] - z[rows, y]
    d = np.zeros_like(z)
    d[rows, j] = 1
    d[rows, y] = -1
    if kappa is not None:
        clipped = loss < -kappa
        loss = np.maximum(loss, loss.dtype.type(-kappa))
        d[clipped] = 0
    return loss, _from_two_class(d, k)


LOSSES = {"ce": cross_entropy, "cw": margin}


def get_loss(name):
    """Loss function by name: 'ce' (cross-entropy) or 'cw' (Carlini-Wagner margin)."""
    try:
        return LOSSES[name]
    except KeyError:
        from ..errors import AdvkernError  # a ValueError subclass
        raise AdvkernError(f"unknown loss {name!r}: use one of {sorted(LOSSES)}") from None
