"""Carlini & Wagner's L2 attack (IEEE S&P 2017, "Towards evaluating the robustness of neural
networks"), batched over images with per-image state.

Change of variables: x' = lo + (hi - lo) (tanh(w) + 1) / 2 keeps every iterate in the box
without clipping. For a constant c > 0 per image, Adam (lr, betas 0.9 / 0.999, eps 1e-8) on w
minimises

    ||x' - x||_2^2 + c * f6(x'),
    f6 = max(Z_y - max_{j != y} Z_j, -kappa)          (untargeted, y the true label)
    f6 = max(max_{j != t} Z_j - Z_t, -kappa)          (targeted, t the target)

with Z the logits. Both f6 are the C&W margin of ``reference.losses.margin`` (negated for
the untargeted case), whose gradient is +1 / -1 on two logits, so one forward and one
backward per step give the gradient (``network.loss_and_input_grad(..., 'cw')``), chained
through dx'/dw = (hi - lo) (1 - tanh(w)^2) / 2.

Binary search over c, per image, ``search_steps`` rounds starting from ``initial_const``:
after a round in which the image was fooled with margin kappa (Z_best_other - Z_y > kappa,
resp. Z_t - Z_best_other > kappa), c shrinks to the middle of [lower, c]; otherwise c grows
tenfold until an upper bound is known, then to the middle of [c, upper]. w restarts at
atanh of x each round (the paper's choice). The result per image is the successful x' of
smallest L2 distance over all rounds and steps, or x itself when none succeeded.

Defaults: 9 search rounds of 100 Adam steps, kappa 0, c from 1.0, lr 0.1. The paper's lr
of 1e-2 goes with 10,000 iterations: pixels on the box faces start at atanh(+-0.999999) =
+-7.25 in w, and 100 steps of 0.01 hardly move them (measured on the bundled mlp, first 30
test images: 60% success at lr 0.01 against 100% at lr 0.1).

Early abort (``abort_early``): a round ends for an image when its objective has not fallen
below 0.9999 times its value of ``steps // 10`` steps earlier; the round ends for the batch
when every image has stopped.
"""

import numpy as np

from .._validate import check_batch, check_int, check_positive
from ..errors import AdvkernError
from . import network


def check_cw_args(model, x, y, targeted, target, kappa, initial_const, search_steps, steps,
                  lr, abort_early, clip):
    """Validate C&W's arguments (shared with the engine: the same errors)."""
    from .gradient_attacks import _labels_for_loss
    x, y, box = check_batch(model, x, y, clip)
    kappa = check_positive(kappa, "kappa", allow_zero=True)
    c0 = check_positive(initial_const, "initial_const")
    search_steps = check_int(search_steps, "search_steps")
    steps = check_int(steps, "steps")
    lr = check_positive(lr, "lr")
    if not isinstance(abort_early, (bool, np.bool_)):
        raise AdvkernError(f"abort_early must be True or False, got {abort_early!r}")
    labels, sign = _labels_for_loss(model, y, targeted, target)
    return x, y, box, labels, sign, kappa, c0, search_steps, steps, lr, bool(abort_early)


def to_box(w, lo, hi, xp=np):
    """x' = lo + (hi - lo) (tanh(w) + 1) / 2 and dx'/dw = (hi - lo) (1 - tanh(w)^2) / 2."""
    t = xp.tanh(w)
    return lo + (hi - lo) * (t + 1) / 2, (hi - lo) * (1 - t * t) / 2


def from_box(x, lo, hi, xp=np):
    """atanh of x mapped to (-1, 1), pulled in by a hair so that the box faces stay finite."""
    u = (x - lo) / (hi - lo) * 2 - 1
    return xp.arctanh(xp.clip(u, -1 + 1e-6, 1 - 1e-6))


def run_cw(grad_fn, x, sign, lo, hi, kappa, c0, search_steps, steps, lr, abort_early, xp=np):
    """The C&W L2 loop over any ``grad_fn(x') -> (margin (N,), d sum(margin)/dx' (N, D),
    logits (N, K))`` on float64 arrays of the module ``xp`` (numpy here; the engine passes a
    backend's). x: (N, D) float64; sign +1 untargeted / -1 targeted (the margin is taken on
    the labels grad_fn closes over: y, or the targets).
    Returns (best x' (N, D), success (N,) bool, best L2^2 (N,), final c (N,))."""
    n, d = x.shape
    const = xp.full(n, c0)
    lower = xp.zeros(n)
    upper = xp.full(n, np.inf)
    best = x.copy()
    best_l2 = xp.full(n, np.inf)
    found = xp.zeros(n, dtype=bool)
    w0 = from_box(x, lo, hi, xp)
    check_every = max(steps // 10, 1)
    for _ in range(search_steps):
        w = w0.copy()
        m = xp.zeros_like(w)
        v = xp.zeros_like(w)
        fooled = xp.zeros(n, dtype=bool)
        live = xp.ones(n, dtype=bool)
        prev = xp.full(n, np.inf)
        for t in range(1, steps + 1):
            xp_, dxdw = to_box(w, lo, hi, xp)
            margin, dmargin, _ = grad_fn(xp_)
            # f6 = max(-sign * margin, -kappa): untargeted -margin(z, y), targeted margin(z, t)
            f = -sign * margin
            active = f > -kappa
            f6 = xp.where(active, f, -kappa)
            diff = xp_ - x
            l2 = (diff * diff).sum(axis=1)
            loss = l2 + const * f6
            # success with margin kappa at this iterate (before the step)
            ok = f < -kappa
            better = ok & (l2 < best_l2)
            best = xp.where(better[:, None], xp_, best)
            best_l2 = xp.where(better, l2, best_l2)
            fooled |= ok
            found |= ok
            grad_x = 2 * diff + (const * xp.where(active, -sign, 0.0))[:, None] * dmargin
            g = grad_x * dxdw
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            mhat = m / (1 - 0.9 ** t)
            vhat = v / (1 - 0.999 ** t)
            step = lr * mhat / (xp.sqrt(vhat) + 1e-8)
            w = w - xp.where(live[:, None], step, 0.0)
            if abort_early and t % check_every == 0:
                live &= ~(loss > 0.9999 * prev)
                prev = xp.where(live, loss, prev)
                if not bool(live.any()):
                    break
        # binary search on c, per image
        upper = xp.where(fooled, xp.minimum(upper, const), upper)
        lower = xp.where(fooled, lower, xp.maximum(lower, const))
        bounded = xp.isfinite(upper)
        const = xp.where(bounded, (lower + xp.where(bounded, upper, 0)) / 2, const * 10)
    return best, found, best_l2, const


def cw_l2(model, x, y, *, targeted=False, target=None, kappa=0.0, initial_const=1.0,
          search_steps=9, steps=100, lr=0.1, abort_early=True, clip=(0.0, 1.0)):
    """Carlini-Wagner L2 (see the module docstring). x: (N, *input_shape) in [lo, hi].
    Returns (x_adv in x's dtype, info) with info = {'success', 'l2' (the distance, NaN where
    none succeeded), 'const' (each image's last c)}."""
    x, y, (lo, hi), labels, sign, kappa, c0, search_steps, steps, lr, abort_early = \
        check_cw_args(model, x, y, targeted, target, kappa, initial_const, search_steps,
                      steps, lr, abort_early, clip)
    n = len(x)
    shape = x.shape
    m64 = model.astype(np.float64) if model.dtype != np.float64 else model

    def grad_fn(xprime):
        xi = xprime.reshape(shape)
        values, dx = network.loss_and_input_grad(m64, xi, labels, "cw")
        return values, dx.reshape(n, -1), None

    if n == 0:
        return x.copy(), {"success": np.zeros(0, bool), "l2": np.zeros(0), "const": np.zeros(0)}
    best, found, best_l2, const = run_cw(grad_fn, x.reshape(n, -1).astype(np.float64), sign,
                                         lo, hi, kappa, c0, search_steps, steps, lr,
                                         abort_early)
    x_adv = best.reshape(shape).astype(x.dtype)
    return x_adv, {"success": found, "l2": np.where(found, np.sqrt(best_l2), np.nan),
                   "const": const}
