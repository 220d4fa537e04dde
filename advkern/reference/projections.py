"""Norm-ball projections, box clipping and steepest-ascent steps (NumPy reference).

Every function works on a batch: ``x``/``delta``/``grad`` have shape (B, ...) and the
norms are taken per sample over all non-batch axes (D = prod of them). A radius ``eps``
(or step length ``alpha``) is a float or an array of shape (B,), one per sample; a float is
exactly the same as an array of B equal values. Radii must be finite and >= 0, and
``eps == 0`` is allowed (the projection then returns the center). Results are new arrays
in the input's dtype; inputs are never modified. Internal reductions (norms, the L1
threshold) run in float64 and only the result is cast back, so float32 inputs lose at
most one rounding.

Norm names: ``'inf'``, ``np.inf``, ``'linf'`` -> ``'linf'``; ``2``, ``'2'``, ``'l2'`` ->
``'l2'``; ``1``, ``'1'``, ``'l1'`` -> ``'l1'`` (see :func:`check_norm`).
"""

import numbers

import numpy as np

from .._validate import check_box, check_float_array, check_positive
from ..errors import AdvkernError, ShapeError

NORMS = ("linf", "l2", "l1")

_NORM_ALIASES = {"inf": "linf", "linf": "linf", "l_inf": "linf", "2": "l2", "l2": "l2",
                 "1": "l1", "l1": "l1"}


def check_norm(norm):
    """Canonical norm name 'linf', 'l2' or 'l1' for any accepted spelling, or raise.

    Accepted: 'inf' / np.inf / 'linf', 2 / '2' / 'l2', 1 / '1' / 'l1' (strings are
    case-insensitive). Anything else raises AdvkernError.
    """
    if isinstance(norm, str):
        key = norm.strip().lower()
        if key in _NORM_ALIASES:
            return _NORM_ALIASES[key]
    elif isinstance(norm, numbers.Real) and not isinstance(norm, bool):
        if norm == np.inf:
            return "linf"
        if norm == 2:
            return "l2"
        if norm == 1:
            return "l1"
    raise AdvkernError(f"unknown norm {norm!r}: use 'inf' (np.inf), 2 or 1")


def check_sparsity(q):
    """SLIDE's quantile q (``l1_sparsity``) as a float in [0, 1], or raise."""
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0.0 <= float(q) <= 1.0:
        raise AdvkernError(f"l1_sparsity must be a number in [0, 1], got {q!r}")
    return float(q)


def per_sample_eps(eps, n, name="eps", allow_zero=True):
    """A radius per sample: float64 array (n,), finite and >= 0 (> 0 without allow_zero).

    eps: a real number (broadcast to all n samples) or an array-like of shape (n,).
    """
    if np.ndim(eps) == 0:
        if isinstance(eps, np.ndarray):
            eps = eps.item()
        return np.full(n, check_positive(eps, name, allow_zero=allow_zero))
    e = np.asarray(eps)
    if e.dtype.kind not in "iuf":
        raise AdvkernError(f"{name} must hold real numbers, got dtype {e.dtype}")
    if e.shape != (n,):
        raise ShapeError(f"{name} must be a number or have shape ({n},), got {e.shape}")
    e = e.astype(np.float64)
    bad = ~np.isfinite(e) | (e < 0) | ((e == 0) & (not allow_zero))
    if bad.any():
        op = ">= 0" if allow_zero else "> 0"
        i = int(np.flatnonzero(bad)[0])
        raise AdvkernError(f"{name} must be finite and {op}, got {e[i]!r} at index {i}")
    return e


def _col(v, ndim):
    """(B,) -> (B, 1, ..., 1) so it broadcasts against a (B, ...) array of ndim dims."""
    return v.reshape((-1,) + (1,) * (ndim - 1))


def flat(a):
    """(B, ...) -> (B, D) view/copy with D = prod(...), also for B == 0."""
    return a.reshape(a.shape[0], int(np.prod(a.shape[1:], dtype=np.int64)))


def _batch(a, name):
    a = check_float_array(a, name)
    if a.ndim < 1:
        raise ShapeError(f"{name} must have a batch axis (B, ...), got a scalar")
    return a


def l2_norms(a):
    """Per-sample Euclidean norms (B,) float64 of a (B, ...) array, overflow/underflow-safe.

    Scaling each row by its largest magnitude first keeps the squares in range (a float32
    gradient of 1e-25 squares to 0 and would make a guarded normalisation return a zero
    step for a non-zero gradient).
    """
    f = flat(np.asarray(a, dtype=np.float64))
    m = np.abs(f).max(axis=1, initial=0.0)
    safe = np.where(m > 0, m, 1.0)
    return m * np.sqrt(np.sum((f / safe[:, None]) ** 2, axis=1))


# -- projections onto norm balls centred at 0 -------------------------------------------


def project_linf(delta, eps):
    """Euclidean projection onto the L-inf ball: P(d)_i = clip(d_i, -eps, eps).

    delta: (B, ...) float32/64; eps: float or (B,) -> (B, ...) in delta's dtype.
    """
    delta = _batch(delta, "delta")
    e = _col(per_sample_eps(eps, len(delta)).astype(delta.dtype), delta.ndim)
    return np.clip(delta, -e, e)


def project_l2(delta, eps):
    """Euclidean projection onto the L2 ball: P(d) = d * min(1, eps / ||d||_2).

    Only a delta outside the ball (||d||_2 > eps) is scaled, so the division never sees a
    zero norm: a zero delta stays zero (never NaN), and eps == 0 maps everything to 0.
    delta: (B, ...) float32/64; eps: float or (B,) -> (B, ...) in delta's dtype.
    """
    delta = _batch(delta, "delta")
    e = per_sample_eps(eps, len(delta))
    norms = l2_norms(delta)
    outside = norms > e
    factor = np.ones(len(delta))
    np.divide(e, norms, out=factor, where=outside)
    return (delta * _col(factor, delta.ndim)).astype(delta.dtype, copy=False)


def project_l1(delta, eps):
    """Exact Euclidean projection onto the L1 ball (Duchi, Shalev-Shwartz, Singer & Chandra,
    ICML 2008, "Efficient projections onto the l1-ball", Fig. 1), vectorised over the batch.

    For ||v||_1 <= eps, P(v) = v. Otherwise, with u = |v| sorted in decreasing order and
    c_j = sum_{i<=j} u_i,

        rho   = max{ j in 1..D : u_j - (c_j - eps) / j > 0 },
        theta = (c_rho - eps) / rho,
        P(v)_i = sign(v_i) * max(|v_i| - theta, 0),

    the soft-threshold at theta > 0 for which ||P(v)||_1 = eps. O(D log D) per sample.
    eps == 0 gives 0. delta: (B, ...) float32/64; eps: float or (B,) -> (B, ...), delta's
    dtype.
    """
    delta = _batch(delta, "delta")
    e = per_sample_eps(eps, len(delta))
    v = flat(delta.astype(np.float64))
    a = np.abs(v)
    outside = a.sum(axis=1) > e
    theta = np.zeros(len(v))
    if v.shape[1] and outside.any():
        u = -np.sort(-a[outside], axis=1)
        c = np.cumsum(u, axis=1)
        j = np.arange(1, u.shape[1] + 1)
        eo = e[outside][:, None]
        # j = 1 always satisfies the condition when eps > 0 (u_1 > u_1 - eps); the last
        # index where it holds is rho (the condition holds on a prefix in exact arithmetic).
        cond = u * j > c - eo
        rho = u.shape[1] - np.argmax(cond[:, ::-1], axis=1)  # 1-based
        t = (c[np.arange(len(u)), rho - 1] - eo[:, 0]) / rho
        # eps == 0: no index qualifies (argmax of all-False is 0 -> rho = D); the
        # threshold must then be max|v| so that everything becomes 0.
        t = np.where(cond.any(axis=1), t, u[:, 0])
        theta[outside] = t
    w = np.sign(v) * np.maximum(a - theta[:, None], 0.0)
    return w.reshape(delta.shape).astype(delta.dtype, copy=False)


_PROJECT = {"linf": project_linf, "l2": project_l2, "l1": project_l1}


def project_ball(delta, eps, norm):
    """Projection of delta (B, ...) onto the ``norm`` ball of radius eps centred at 0."""
    return _PROJECT[check_norm(norm)](delta, eps)


# -- box and ball-then-box --------------------------------------------------------------


def clip_box(x, lo, hi):
    """Clip x (any shape, float32/64) to the box [lo, hi] (lo < hi, finite); x's dtype."""
    x = check_float_array(x, "x", finite=False)
    lo, hi = check_box((lo, hi))
    return np.clip(x, x.dtype.type(lo), x.dtype.type(hi))


def project(x_adv, x, eps, norm="inf", clip=(0.0, 1.0)):
    """Ball-then-box: clip(x + P_ball(x_adv - x), lo, hi), with P_ball the Euclidean
    projection onto the ``norm`` ball of radius eps (per sample) centred at 0.

    This is what PGD implementations do (Madry et al. 2018 and its descendants). For L-inf
    it is the exact Euclidean projection onto the intersection B_inf(x, eps) ∩ [lo, hi]^D
    (both sets are boxes, so the projection separates per coordinate into
    clip(x_adv_i, max(x_i - eps, lo), min(x_i + eps, hi))). For L2 and L1 it is NOT the
    exact projection onto the intersection in general (the nearest point of the
    intersection can lie strictly inside the ball after the box has cut it), but the
    result always lies in both sets: for x in the box, clipping moves each coordinate
    toward x_i, so |delta_i| only shrinks and the point stays in the ball.

    L-inf is computed as clip(clip(x_adv, x - eps, x + eps), lo, hi) in x's dtype, so the
    result is inside the ball exactly as the float bounds x +- eps are.
    x_adv, x: (B, ...) same shape; eps: float or (B,); clip: (lo, hi) -> (B, ...), x's dtype.
    """
    x_adv = _batch(x_adv, "x_adv")
    x = _batch(x, "x")
    if x_adv.shape != x.shape:
        raise ShapeError(f"x_adv must have the shape of x {x.shape}, got {x_adv.shape}")
    lo, hi = check_box(clip)
    norm = check_norm(norm)
    x_adv = x_adv.astype(x.dtype, copy=False)
    if norm == "linf":
        e = _col(per_sample_eps(eps, len(x)).astype(x.dtype), x.ndim)
        inside = np.clip(x_adv, x - e, x + e)
    else:
        inside = x + _PROJECT[norm](x_adv - x, eps)
    return np.clip(inside, x.dtype.type(lo), x.dtype.type(hi))


# -- steepest-ascent steps --------------------------------------------------------------


def steepest_step(grad, alpha, norm, x=None, clip=None, l1_sparsity=0.95):
    """The steepest-ascent step of length alpha in the given norm:
    argmax_{||s|| <= alpha} <grad, s> (or a sparse approximation of it for L1).

    - 'linf': s = alpha * sign(g)  (FGSM / BIM / PGD-inf).
    - 'l2':   s = alpha * g / ||g||_2; a zero gradient gives a zero step (never NaN; an
      unguarded division, as in some libraries, turns a saturated image into NaN).
    - 'l1':   sparse L1 descent, SLIDE (Tramer & Boneh, NeurIPS 2019, "Adversarial training
      and robustness for multiple perturbations", Alg. 1). The exact L1 steepest step moves
      only the single largest |g_i|, which makes PGD crawl; SLIDE moves the top
      (1 - q) fraction instead:
          m_i   = |g_i|, set to 0 where x_i sits at a box bound and g_i pushes outward
                  (x_i <= lo and g_i < 0, or x_i >= hi and g_i > 0), when x and clip are
                  given;
          r     = the per-sample q-quantile of m (q = l1_sparsity, np.quantile 'linear'),
          e_i   = sign(g_i) * [m_i >= r and m_i > 0],
          s     = alpha * e / ||e||_1,
      so ||s||_1 = alpha. The quantile is taken over the masked |g| (blocked coordinates
      count as 0), as in the paper's code; requiring m_i > 0 keeps zero-gradient and
      blocked coordinates out when the quantile is 0. No coordinate left -> zero step.

    grad: (B, ...) float32/64 (the ascent direction: pass -grad to descend);
    alpha: float or (B,), >= 0; x: (B, ...) current point (for L1 box masking), clip:
    (lo, hi); l1_sparsity: q in [0, 1]. Returns (B, ...) in grad's dtype.
    """
    grad = _batch(grad, "grad")
    norm = check_norm(norm)
    a = per_sample_eps(alpha, len(grad), name="alpha")
    if norm == "linf":
        return (_col(a, grad.ndim) * np.sign(grad)).astype(grad.dtype)
    if norm == "l2":
        norms = l2_norms(grad)
        scale = np.zeros(len(grad))
        np.divide(a, norms, out=scale, where=norms > 0)
        return (grad * _col(scale, grad.ndim)).astype(grad.dtype, copy=False)
    q = check_sparsity(l1_sparsity)
    g = flat(grad.astype(np.float64))
    m = np.abs(g)
    if x is not None and clip is not None:
        x = _batch(x, "x")
        if x.shape != grad.shape:
            raise ShapeError(f"x must have the shape of grad {grad.shape}, got {x.shape}")
        lo, hi = check_box(clip)
        xf = flat(x)
        m[((xf <= lo) & (g < 0)) | ((xf >= hi) & (g > 0))] = 0.0
    if g.shape[1] == 0:
        return np.zeros_like(grad)
    r = np.quantile(m, q, axis=1)
    keep = (m >= r[:, None]) & (m > 0)
    count = keep.sum(axis=1)
    scale = np.zeros(len(g))
    np.divide(a, count, out=scale, where=count > 0)
    step = np.sign(g) * keep * scale[:, None]
    return step.reshape(grad.shape).astype(grad.dtype)
