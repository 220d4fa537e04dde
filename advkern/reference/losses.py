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


def soft_cross_entropy(logits, q, temperature=1.0):
    """Cross-entropy against soft labels at a temperature (Hinton et al. 2015; Papernot et al.
    2016, defensive distillation): J(z, q) = -sum_k q_k log softmax(z / T)_k.

    logits: (N, K); q: (N, max(K, 2)) non-negative target distributions (rows of a teacher's
    softmax(z_teacher / T), or one-hot rows for hard labels); temperature: T > 0.
    -> loss (N,), dlogits (N, K) with dJ/dz = (sum_k q_k * softmax(z / T) - q) / T, which
    is (softmax(z / T) - q) / T when the rows of q sum to 1.

    log softmax is the log-sum-exp form of :func:`log_softmax`, so a confident row never
    takes the log of an underflowed probability. No T^2 factor (Hinton's, which keeps the
    soft-target gradient's scale when mixing it with a hard-label term): there is no mixing
    here, and Adam's update is invariant to a constant gradient scale. At T = 1 with one-hot
    q this is :func:`cross_entropy`, operation for operation (same loss and gradient bits).
    """
    k = logits.shape[1]
    t = logits.dtype.type(temperature)
    z = logits / t if temperature != 1 else logits
    logp = log_softmax(z)
    q = np.asarray(q, dtype=logits.dtype)
    if q.shape != logp.shape:
        from ..errors import ShapeError
        raise ShapeError(f"soft labels must have shape {logp.shape} (one distribution per "
                         f"sample over {logp.shape[1]} classes), got {q.shape}")
    # q_k = 0 where log p_k is very negative contributes exactly 0 (log p is always finite).
    loss = -(q * logp).sum(axis=1)
    d = np.exp(logp)
    mass = q.sum(axis=1, keepdims=True)
    if not np.all(mass == 1):
        d *= mass
    d -= q
    if temperature != 1:
        d /= t
    return loss, _from_two_class(d, k).astype(logits.dtype, copy=False)
