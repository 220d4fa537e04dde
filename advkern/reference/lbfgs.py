"""Szegedy et al.'s box-constrained L-BFGS attack ("Intriguing properties of neural
networks", ICLR 2014), batched over images.

For a target class t and a constant c > 0 per image it minimises over the box

    c * ||x' - x||_2^2 + J(x', t),      lo <= x' <= hi,

J the softmax cross-entropy, with a projected L-BFGS written here (every image has its own
curvature history of ``memory`` pairs, two-loop recursion, projection onto the box and an
Armijo backtracking line search, all vectorised over the images; a non-descent direction
resets that image's history to steepest descent). Then, per image, a search over c (the
paper's "line search to find the minimum c > 0 for which the minimiser is adversarial",
written as the usual bracketing: c grows tenfold while the minimiser is adversarial and
shrinks tenfold while it is not, then bisects the bracket). The result per image is the
adversarial minimiser (classified t) of smallest ||x' - x||_2 over all c tried, or x where
none was found. Each objective evaluation is one forward and one backward
(``network.loss_and_input_grad``).
"""

import numpy as np

from .._validate import check_batch, check_int, check_positive, check_targets
from . import network
from .losses import predict


def check_lbfgs_args(model, x, y, target, initial_const, search_steps, max_iter, memory,
                     clip):
    """Validate the L-BFGS attack's arguments (shared with the engine: the same errors)."""
    x, y, box = check_batch(model, x, y, clip)
    t = check_targets(np.broadcast_to(np.asarray(target), y.shape)
                      if target is not None and np.ndim(target) == 0 else target,
                      y, model.num_classes)
    c0 = check_positive(initial_const, "initial_const")
    search_steps = check_int(search_steps, "search_steps")
    max_iter = check_int(max_iter, "max_iter")
    memory = check_int(memory, "memory")
    return x, y, box, t, c0, search_steps, max_iter, memory


def _two_loop(g, S, Yv, rho, count, xp):
    """d = -H g per image by the two-loop recursion over the stored pairs (newest last).
    S, Yv: (N, m, D); rho: (N, m) (0 for empty slots); count: (N,) pairs stored."""
    m = S.shape[1]
    q = g.copy()
    alpha = xp.zeros(rho.shape)
    for i in range(m - 1, -1, -1):
        a = rho[:, i] * (S[:, i] * q).sum(axis=1)
        alpha[:, i] = a
        q = q - a[:, None] * Yv[:, i]
    last = Yv[:, m - 1]
    yy = (last * last).sum(axis=1)
    gamma = xp.where((count > 0) & (yy > 0),
                     (S[:, m - 1] * last).sum(axis=1) / xp.where(yy > 0, yy, 1), 1.0)
    r = gamma[:, None] * q
    for i in range(m):
        b = rho[:, i] * (Yv[:, i] * r).sum(axis=1)
        r = r + (alpha[:, i] - b)[:, None] * S[:, i]
    return -r


def minimise(fg, x0, lo, hi, max_iter, memory, xp=np):
    """Projected L-BFGS on independent per-image objectives. fg(z) -> (f (N,), g (N, D));
    x0: (N, D) float64 start. Returns the final points (N, D)."""
    n, d = x0.shape
    z = xp.clip(x0, lo, hi)
    f, g = fg(z)
    S = xp.zeros((n, memory, d))
    Yv = xp.zeros((n, memory, d))
    rho = xp.zeros((n, memory))
    count = xp.zeros(n, dtype=np.int64)
    for _ in range(max_iter):
        # Coordinates on a face of the box whose gradient pushes outward are held (the
        # projected quasi-Newton step works on the free ones only).
        free = ~(((z <= lo) & (g > 0)) | ((z >= hi) & (g < 0)))
        gf = xp.where(free, g, 0.0)
        dirn = xp.where(free, _two_loop(gf, S, Yv, rho, count, xp), 0.0)
        # without curvature pairs, steepest descent scaled to a unit first step
        gnorm = xp.sqrt((gf * gf).sum(axis=1))
        first = -gf / xp.where(gnorm > 0, gnorm, 1)[:, None]
        dirn = xp.where((count == 0)[:, None], first, dirn)
        slope = (g * dirn).sum(axis=1)
        bad = ~(slope < 0)                                   # not a descent direction
        dirn = xp.where(bad[:, None], first, dirn)
        count = xp.where(bad, 0, count)
        rho = xp.where(bad[:, None], 0.0, rho)
        step = xp.ones(n)
        z_new, f_new, g_new = z, f, g
        todo = xp.ones(n, dtype=bool)
        for _ in range(12):                                  # Armijo backtracking
            trial = xp.clip(z + step[:, None] * dirn, lo, hi)
            ft, gt = fg(trial)
            ok = ft <= f + 1e-4 * (g * (trial - z)).sum(axis=1)
            take = todo & ok
            z_new = xp.where(take[:, None], trial, z_new)
            f_new = xp.where(take, ft, f_new)
            g_new = xp.where(take[:, None], gt, g_new)
            todo = todo & ~ok
            if not bool(todo.any()):
                break
            step = xp.where(todo, step * 0.5, step)
        s = z_new - z
        yv = g_new - g
        sy = (s * yv).sum(axis=1)
        keep = sy > 1e-12
        # shift the histories of the images that keep the pair; newest in the last slot
        S = xp.where(keep[:, None, None], xp.concatenate([S[:, 1:], s[:, None]], axis=1), S)
        Yv = xp.where(keep[:, None, None], xp.concatenate([Yv[:, 1:], yv[:, None]], axis=1),
                      Yv)
        rho = xp.where(keep[:, None],
                       xp.concatenate([rho[:, 1:], (1 / xp.where(keep, sy, 1))[:, None]],
                                      axis=1), rho)
        count = xp.where(keep, xp.minimum(count + 1, memory), count)
        z, f, g = z_new, f_new, g_new
    return z


def run_lbfgs_attack(loss_grad_fn, predict_fn, x, c0, search_steps, max_iter, memory, lo, hi,
                     xp=np):
    """The search over c around ``minimise``. loss_grad_fn(z) -> (J (N,), dJ/dz (N, D)) for
    the target class; predict_fn(z) -> success (N,) bool. x: (N, D) float64.
    Returns (best (N, D), found (N,), best squared distance (N,), c (N,))."""
    n = len(x)
    const = xp.full(n, c0)
    ok_c = xp.zeros(n)               # largest c known to succeed (0: none yet)
    fail_c = xp.full(n, np.inf)      # smallest c known to fail
    best = x.copy()
    best_d = xp.full(n, np.inf)
    found = xp.zeros(n, dtype=bool)
    for _ in range(search_steps):
        def fg(z, c=const):
            j, dj = loss_grad_fn(z)
            diff = z - x
            return c * (diff * diff).sum(axis=1) + j, 2 * c[:, None] * diff + dj

        z = minimise(fg, x, lo, hi, max_iter, memory, xp)
        success = predict_fn(z)
        dist = ((z - x) ** 2).sum(axis=1)
        better = success & (dist < best_d)
        best = xp.where(better[:, None], z, best)
        best_d = xp.where(better, dist, best_d)
        found |= success
        # bracket the largest successful c: grow on success, shrink on failure, then bisect
        ok_c = xp.where(success, xp.maximum(ok_c, const), ok_c)
        fail_c = xp.where(success, fail_c, xp.minimum(fail_c, const))
        bracketed = (ok_c > 0) & xp.isfinite(fail_c)
        const = xp.where(bracketed, (ok_c + xp.where(xp.isfinite(fail_c), fail_c, 0)) / 2,
                         xp.where(success, const * 10, const / 10))
    return best, found, best_d, const


def lbfgs_attack(model, x, y, target, *, initial_const=0.1, search_steps=5, max_iter=30,
                 memory=8, clip=(0.0, 1.0)):
    """Szegedy et al.'s L-BFGS attack (targeted; see the module docstring).
    x: (N, *input_shape) in [lo, hi]; target: (N,) or one int, != y. Returns (x_adv in x's
    dtype, info) with info = {'success', 'l2' (NaN where none), 'const'}."""
    x, y, (lo, hi), t, c0, search_steps, max_iter, memory = check_lbfgs_args(
        model, x, y, target, initial_const, search_steps, max_iter, memory, clip)
    n = len(x)
    if n == 0:
        return x.copy(), {"success": np.zeros(0, bool), "l2": np.zeros(0),
                          "const": np.zeros(0)}
    shape = x.shape
    m64 = model.astype(np.float64) if model.dtype != np.float64 else model

    def loss_grad_fn(z):
        j, dj = network.loss_and_input_grad(m64, z.reshape(shape), t, "ce")
        return j, dj.reshape(n, -1)

    def predict_fn(z):
        return predict(network.forward(m64, z.reshape(shape))[0]) == t

    best, found, best_d, const = run_lbfgs_attack(
        loss_grad_fn, predict_fn, x.reshape(n, -1).astype(np.float64), c0, search_steps,
        max_iter, memory, lo, hi)
    return best.reshape(shape).astype(x.dtype), {
        "success": found, "l2": np.where(found, np.sqrt(best_d), np.nan), "const": const}
