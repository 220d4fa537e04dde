"""Gradient attacks: FGSM, FGM-L2, PGD (L-inf, L2, L1) and BIM (NumPy reference).

Common contract. ``model`` is an ``advkern.nets.Sequential``; ``x`` is (N, *input_shape)
float32/float64 inside the box ``clip = (lo, hi)``; ``y`` is (N,) integer labels. Every
attack returns a NEW array x_adv of x's shape and dtype, inside the eps-ball around x and
inside the box, and never modifies x. ``eps`` is a float or an (N,) array (one radius per
image; a float equals N equal radii); eps == 0 is allowed and returns a copy of x, so a
sweep can start at 0.

Losses: ``loss='ce'`` (softmax cross-entropy) or ``'cw'`` (Carlini-Wagner margin
max_{j != y} z_j - z_y). An untargeted attack ascends J(x, y); a targeted one
(``targeted=True``, ``target`` (N,) or one int, each != y) descends J(x, t). Gradients
come from :func:`advkern.reference.network.loss_and_input_grad`, which differentiates the
SUM of per-image losses, so an image's step never depends on the batch it is in.

Randomness (PGD's random start) comes from ``per_sample_rngs(seed, N)``: image i draws
from its own generator (default_rng([seed, i]) for an int seed, default_rng(seed[i]) for a
sequence), so a batch result equals each image's own result.
"""

import numpy as np

from .._validate import (check_batch, check_box, check_int, check_targets, per_sample_rngs,
                         seed_entropy)
from ..errors import AdvkernError, ShapeError
from . import network
from .losses import LOSSES, get_loss, predict
from .projections import (_col, check_norm, check_sparsity, clip_box, per_sample_eps, project,
                          steepest_step)


def _check_loss(loss):
    if loss not in LOSSES:
        raise AdvkernError(f"unknown loss {loss!r}: use one of {sorted(LOSSES)}")
    return loss


def _labels_for_loss(model, y, targeted, target):
    """(labels the loss is taken on, ascent sign): (y, +1) untargeted, (t, -1) targeted."""
    if targeted:
        return check_targets(target, y, model.num_classes), -1.0
    if target is not None:
        raise AdvkernError("target given but targeted=False: pass targeted=True for a "
                           "targeted attack")
    return y, 1.0


def _objective_and_pred(model, x, labels, sign, loss):
    """Attack objective sign * J(x, labels) (N,) and predictions (N,), one forward pass."""
    logits, _ = network.forward(model, x)
    values, _ = get_loss(loss)(logits, labels)
    return sign * values, predict(logits)


def _success(pred, y, target, targeted):
    return pred == target if targeted else pred != y


# -- single-step attacks ----------------------------------------------------------------


def fgsm(model, x, y, eps, *, targeted=False, target=None, loss="ce", clip=(0.0, 1.0)):
    """Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy, ICLR 2015):

        untargeted: x' = clip(x + eps * sign(grad_x J(x, y)), lo, hi)
        targeted:   x' = clip(x - eps * sign(grad_x J(x, t)), lo, hi)

    x: (N, *input_shape) float32/64 in [lo, hi]; y: (N,) int; eps: float or (N,), finite,
    >= 0 (0 returns a copy of x). Returns x' (N, *input_shape) in x's dtype.
    """
    return _fast_gradient(model, x, y, eps, "linf", targeted, target, loss, clip)


def fgm_l2(model, x, y, eps, *, targeted=False, target=None, loss="ce", clip=(0.0, 1.0)):
    """Fast Gradient Method in L2 (Goodfellow et al. 2015; Miyato et al. 2016):

        untargeted: x' = clip(x + eps * g / ||g||_2, lo, hi),  g = grad_x J(x, y)
        targeted:   x' = clip(x - eps * g / ||g||_2, lo, hi),  g = grad_x J(x, t)

    The norm is per image; a zero gradient gives x' = x (never NaN).
    Shapes and dtypes as :func:`fgsm`.
    """
    return _fast_gradient(model, x, y, eps, "l2", targeted, target, loss, clip)


def _fast_gradient(model, x, y, eps, norm, targeted, target, loss, clip):
    """One steepest-ascent step of length eps in ``norm`` from x, then the box."""
    x, y, (lo, hi) = check_batch(model, x, y, clip)
    e = per_sample_eps(eps, len(x))
    labels, sign = _labels_for_loss(model, y, targeted, target)
    _check_loss(loss)
    if not e.any():
        return x.copy()
    _, g = network.loss_and_input_grad(model, x, labels, loss)
    return clip_box(x + steepest_step(sign * g, e, norm), lo, hi)


# -- projected gradient descent ---------------------------------------------------------


def random_init(x, eps, norm, rngs, clip=(0.0, 1.0)):
    """PGD's random start: clip(x + u, lo, hi) with u uniform in the ``norm`` ball of
    radius eps around 0, drawn image by image (image i from rngs[i]) in float64.

    - 'linf': u_j ~ U(-eps, eps) independently.
    - 'l2':   u = eps * U^(1/D) * n / ||n||_2, n ~ N(0, I_D), U ~ U(0, 1) (a uniform
      direction and the radius law of a uniform point in a D-ball).
    - 'l1':   u = eps * l / (||l||_1 + w), l_j ~ Laplace(0, 1) i.i.d., w ~ Exp(1) (Barthe,
      Guedon, Mendelson & Naor, Ann. Probab. 2005: this is uniform in the unit L1 ball).

    x: (N, *shape) float32/64; eps: float or (N,); rngs: N numpy Generators (each one
    advanced by exactly one draw) -> (N, *shape) in x's dtype.
    """
    norm = check_norm(norm)
    e = per_sample_eps(eps, len(x))
    if len(rngs) != len(x):
        raise ShapeError(f"random_init needs one generator per image: {len(x)} images, "
                         f"{len(rngs)} generators")
    shape = x.shape[1:]
    d = int(np.prod(shape))
    u = np.empty((len(x), d))
    for i, rng in enumerate(rngs):
        if norm == "linf":
            u[i] = rng.uniform(-1.0, 1.0, size=d)
        elif norm == "l2":
            n = rng.standard_normal(d)
            nn = np.linalg.norm(n)
            r = rng.uniform() ** (1.0 / d) if d else 0.0
            u[i] = n * (r / nn) if nn > 0 else 0.0
        else:
            lap = rng.laplace(size=d)
            w = rng.exponential()
            u[i] = lap / (np.abs(lap).sum() + w)
    u *= e[:, None]
    return project(x + u.reshape(x.shape).astype(x.dtype), x, e, norm, clip)


def check_pgd_args(model, x, y, eps, alpha, steps, norm, loss, restarts, targeted, target,
                   clip, seed, l1_sparsity, random_start=True):
    """Validate PGD's arguments (shared with the engine, so both raise the same errors).

    Returns (x, y, (lo, hi), eps (N,), norm, alpha (N,), steps, restarts, labels, sign,
    rngs): labels the loss is taken on, sign +1 (ascend) or -1 (targeted: descend).
    """
    x, y, box = check_batch(model, x, y, clip)
    e = per_sample_eps(eps, len(x))
    norm = check_norm(norm)
    _check_loss(loss)
    alpha = per_sample_eps(alpha, len(x), name="alpha", allow_zero=False)
    steps = check_int(steps, "steps", minimum=1)
    restarts = check_int(restarts, "restarts", minimum=1)
    check_sparsity(l1_sparsity)
    labels, sign = _labels_for_loss(model, y, targeted, target)
    # The generators are built only when a random start draws from them (1000 cost ~20 ms).
    rngs = per_sample_rngs(seed, len(x)) if random_start else seed_entropy(seed, len(x))
    return x, y, box, e, norm, alpha, steps, restarts, labels, sign, rngs


def pgd(model, x, y, eps, alpha, steps, *, norm="inf", loss="ce", random_start=False,
        restarts=1, targeted=False, target=None, early_stop=False, clip=(0.0, 1.0), seed=0,
        l1_sparsity=0.95):
    """Projected gradient descent (Madry et al., ICLR 2018; Kurakin, Goodfellow & Bengio's
    BIM, 2017, is the L-inf case without random start):

        x_0     = x, or a uniform draw from B_norm(x, eps) ∩ box (random_start),
        x_{t+1} = Proj_{B_norm(x, eps) ∩ box}( x_t + steepest_step(+-grad_x J(x_t, .), alpha) )

    with + grad J(x_t, y) untargeted and - grad J(x_t, t) targeted; the step is
    :func:`~advkern.reference.projections.steepest_step` in the chosen norm (sign step for
    L-inf, normalised gradient for L2, SLIDE sparse step for L1, box-aware) and the
    projection is :func:`~advkern.reference.projections.project` (ball then box; exact for
    L-inf, feasible but not the exact projection for L2/L1).

    norm: 'inf' / np.inf, 2, 1 (or their string spellings); loss: 'ce' or 'cw';
    alpha: step length in that norm, float or (N,), > 0; steps: int >= 1.
    random_start: draw x_0 as in :func:`random_init` from image i's own generator.
    restarts: run the whole attack this many times, image i's random starts being
        successive draws from its generator, and keep per image the most adversarial
        run, ranked by (success, objective) with objective J(x_adv, y) untargeted and
        -J(x_adv, t) targeted: any successful run beats any failed one, and among equals
        the higher objective wins (ties keep the earlier run). Restart 1 is exactly the
        restarts=1 run. Without random_start the runs would be identical, so one is run.
    early_stop: before each step, an image that is already adversarial (prediction != y
        untargeted, == target targeted) is frozen: it is not updated again, so its result
        is the first iterate x_t (t >= 0) at which it succeeded. Without early_stop every
        image takes all ``steps`` steps (and may drift back across the boundary).
    seed: int, or (N,) ints (see ``per_sample_rngs``).
    x: (N, *input_shape) float32/64 in [lo, hi]; y: (N,); eps: float or (N,) >= 0.
    Returns x_adv (N, *input_shape) in x's dtype.
    """
    x, y, (lo, hi), e, norm, alpha, steps, restarts, labels, sign, rngs = check_pgd_args(
        model, x, y, eps, alpha, steps, norm, loss, restarts, targeted, target, clip, seed,
        l1_sparsity, random_start)
    tgt = labels if targeted else None
    if not e.any():
        return x.copy()

    best = x.copy()
    best_obj = np.full(len(x), -np.inf)
    best_ok = np.zeros(len(x), dtype=bool)
    for _ in range(restarts if random_start else 1):
        xa = random_init(x, e, norm, rngs, (lo, hi)) if random_start else x.copy()
        active = np.ones(len(x), dtype=bool)
        for _ in range(steps):
            if early_stop:
                # One extra forward per step: loss_and_input_grad returns no logits.
                _, pred = _objective_and_pred(model, xa, labels, sign, loss)
                active &= ~_success(pred, y, tgt, targeted)
                if not active.any():
                    break
            _, g = network.loss_and_input_grad(model, xa, labels, loss)
            step = steepest_step(sign * g, alpha, norm, x=xa, clip=(lo, hi),
                                 l1_sparsity=l1_sparsity)
            xn = project(xa + step, x, e, norm, (lo, hi))
            xa = np.where(_col(active, x.ndim), xn, xa)
        obj, pred = _objective_and_pred(model, xa, labels, sign, loss)
        ok = _success(pred, y, tgt, targeted)
        better = (ok & ~best_ok) | ((ok == best_ok) & (obj > best_obj))
        best[better] = xa[better]
        best_obj[better] = obj[better]
        best_ok |= ok
    return best


def bim_defaults(eps, clip=(0.0, 1.0)):
    """Kurakin, Goodfellow & Bengio (ICLR 2017 workshop, "Adversarial examples in the
    physical world") defaults for BIM, stated in 0..255 pixel units:

        alpha = 1 pixel,   steps = min(eps_px + 4, 1.25 * eps_px),

    with eps_px = 255 * eps / (hi - lo) the radius in pixel units of the box. Returns
    (alpha, steps) with alpha = (hi - lo) / 255 in box units and steps rounded to the
    nearest integer (halves up), at least 1. eps: one float (for per-image radii pass the
    largest, so one iteration count serves the batch). E.g. eps = 8/255 on [0, 1]:
    alpha = 1/255, steps = min(12, 10) = 10.
    """
    lo, hi = check_box(clip)
    px = 255.0 * float(per_sample_eps(eps, 1)[0]) / (hi - lo)
    steps = max(1, int(np.floor(min(px + 4.0, 1.25 * px) + 0.5)))
    return (hi - lo) / 255.0, steps


def bim(model, x, y, eps, alpha=None, steps=None, **kw):
    """Basic Iterative Method (Kurakin et al. 2017): :func:`pgd` with norm L-inf and no
    random start,

        x_{t+1} = clip_[lo, hi]( clip_[x - eps, x + eps]( x_t + alpha * sign(grad_x J(x_t, y)) ) ).

    alpha / steps default to :func:`bim_defaults` (1 pixel = (hi - lo) / 255 per step,
    round(min(eps_px + 4, 1.25 eps_px)) steps); with per-image eps (N,) the largest one
    sets the default steps. Other keyword arguments go to :func:`pgd` (loss, targeted,
    target, early_stop, clip). Shapes and dtypes as :func:`pgd`.
    """
    for k in ("norm", "random_start", "restarts"):
        if k in kw:
            raise AdvkernError(f"bim does not take {k}= (it is L-inf PGD without random "
                               "start; call pgd for other settings)")
    if alpha is None or steps is None:
        x_chk, _, box = check_batch(model, x, y, kw.get("clip", (0.0, 1.0)))
        e = per_sample_eps(eps, len(x_chk))
        d_alpha, d_steps = bim_defaults(float(e.max(initial=0.0)), box)
        alpha = d_alpha if alpha is None else alpha
        steps = d_steps if steps is None else steps
    return pgd(model, x, y, eps, alpha, steps, norm="inf", random_start=False, **kw)


# -- momentum iterative FGSM ---------------------------------------------------------------


def check_mi_args(model, x, y, eps, alpha, steps, decay, loss, targeted, target, clip):
    """Validate MI-FGSM's arguments (shared with the engine: the same errors).

    Returns (x, y, (lo, hi), eps (N,), alpha (N,), steps, decay, labels, sign).
    """
    x, y, box = check_batch(model, x, y, clip)
    e = per_sample_eps(eps, len(x))
    steps = check_int(steps, "steps", minimum=1)
    alpha = e / steps if alpha is None else \
        per_sample_eps(alpha, len(x), name="alpha", allow_zero=False)
    if isinstance(decay, bool) or not isinstance(decay, (int, float, np.floating, np.integer)) \
            or not np.isfinite(decay) or decay < 0:
        raise AdvkernError(f"decay must be a finite number >= 0, got {decay!r}")
    _check_loss(loss)
    labels, sign = _labels_for_loss(model, y, targeted, target)
    return x, y, box, e, alpha, steps, float(decay), labels, sign


def momentum_update(g, mom, decay):
    """One MI-FGSM momentum step: mom' = decay * mom + g / ||g||_1 per image.

    g: (N, D) ascent direction in any float dtype; mom: (N, D) float64. The L1 norm and the
    update run in float64; a zero gradient adds nothing (never NaN). Returns mom' (N, D)
    float64.
    """
    g64 = g.astype(np.float64)
    l1 = np.abs(g64).sum(axis=1)
    scale = np.zeros(len(g64))
    np.divide(1.0, l1, out=scale, where=l1 > 0)
    return decay * mom + g64 * scale[:, None]


def mi_fgsm(model, x, y, eps, alpha=None, steps=10, *, decay=1.0, targeted=False,
            target=None, loss="ce", clip=(0.0, 1.0)):
    """Momentum Iterative FGSM (Dong et al., "Boosting adversarial attacks with momentum",
    CVPR 2018, Algorithm 1), L-inf:

        g_0 = 0,
        g_{t+1} = mu * g_t + grad_x J(x_t, y) / ||grad_x J(x_t, y)||_1,
        x_{t+1} = clip_[lo, hi]( clip_[x - eps, x + eps]( x_t + alpha * sign(g_{t+1}) ) ),

    with the paper's defaults mu = decay = 1.0, T = steps = 10 and alpha = eps / T. Targeted
    (target, (N,) or one int): the momentum accumulates -grad J(x_t, t), i.e. it descends the
    target's loss. The L1 norm is per image and guarded (a zero gradient adds nothing); the
    momentum is kept in float64 (``momentum_update``), the image in x's dtype. The ball and
    box step is exactly PGD's L-inf step with sign(g_{t+1}) in place of sign(grad).
    x: (N, *input_shape) float32/64 in [lo, hi]; eps, alpha: floats or (N,). Returns x'.
    """
    x, y, (lo, hi), e, a, steps, decay, labels, sign = check_mi_args(
        model, x, y, eps, alpha, steps, decay, loss, targeted, target, clip)
    if not e.any():
        return x.copy()
    n = len(x)
    mom = np.zeros((n, x[0].size))
    xa = x
    for _ in range(steps):
        _, g = network.loss_and_input_grad(model, xa, labels, loss)
        mom = momentum_update(sign * g.reshape(n, -1), mom, decay)
        step = steepest_step(mom.reshape(x.shape).astype(x.dtype), a, "linf")
        xa = project(xa + step, x, e, "inf", (lo, hi))
    return xa
