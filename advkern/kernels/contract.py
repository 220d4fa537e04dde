"""The backend contract: the primitives every backend implements, documented once.

A backend is a module registered in ``advkern.kernels`` exposing ``NAME``, ``xp`` (the array
module its arrays belong to: numpy, or cupy on a GPU backend) and every function in
:data:`PRIMITIVES`, with exactly these signatures, shapes and dtypes. The attack engine
(``advkern.engine``) is written once over them, so arrays stay on the backend's device for
the whole attack; only the inputs, the random draws (small: O(N * P) numbers a generation)
and the results cross.

Notation: N images, input shape S = (C, H, W) with D = C*H*W features, K logits, P DE
population members, ``dt`` the attack dtype (float32 or float64). "Device array" means an
array of ``xp``. Per-image scalars (eps, alpha) are device arrays of shape (N,) in dt.

Data movement
    to_device(a, dtype=None) -> device array (a copy; host arrays are never modified).
    to_host(a) -> numpy array.

Models
    prepare(model, dtype) -> net
        The backend's form of an ``advkern.nets.Sequential`` (weights cast to dtype, on the
        device, in whatever layout the kernels want). Opaque to the engine; read-only.

Network primitives
    logits(net, x) -> (N, K)
    loss_grad(net, x, labels, loss) -> (values (N,), dx (N, *S), logits (N, K))
        Per-image loss ('ce' softmax cross-entropy from logits by log-sum-exp, or 'cw' margin)
        and the gradient of their SUM with respect to x (so an image's gradient does not
        depend on the batch), plus the logits of the same forward pass (the engine's
        early-stop check reads them, so it costs no extra forward).
    jacobian(net, x, seeds=None) -> (J (N, R, D), logits (N, K))
        J[n, r] = seeds[n, r] . d z(x_n) / d x_n: one forward and one batched backward pass
        seeded with the R rows of seeds (N, R, K). seeds None: the K one-hot rows (R = K,
        the full logit Jacobian). JSMA needs only R = 2 rows (target, sum of the others).
    param_grads(net, x, labels, loss) -> (mean loss (float), grads)
        grads: a list with one dict per layer (the model's ``params`` layout), the gradient
        of the MEAN loss over the batch; used by adversarial training.

Steps and projections (fused, elementwise; x0 is the clean batch, active (N,) bool)
    linf_step(xa, g, x0, eps, alpha, lo, hi, active) -> xa'
        xa' = clip(clip(xa + alpha * sign(g), x0 - eps, x0 + eps), lo, hi) where active,
        xa where not. sign(0) = 0. Exact (no tolerance) against the reference.
    l2_step(xa, g, x0, eps, alpha, lo, hi, active) -> xa'
        xa + alpha * g / ||g||_2 (a zero gradient gives a zero step), then the L2 ball of
        radius eps around x0, then the box; per image.
    l1_step(xa, g, x0, eps, alpha, lo, hi, active, sparsity) -> xa'
        The sparse L1 steepest-ascent step of ``reference.projections.steepest_step`` (SLIDE,
        box-aware), then the exact L1-ball projection (Duchi et al. 2008), then the box.
    pgd_step(net, xa, labels, loss, flip, x0, eps, alpha, lo, hi, active, norm, sparsity)
        -> xa'
        One PGD iteration (the engine's loop without early stop): g = d(sum of losses)/dx at
        xa as loss_grad gives it, negated when flip (a targeted attack descends), then
        linf_step / l2_step / l1_step for norm 'linf' / 'l2' / 'l1' (sparsity: l1 only).
        Exactly :func:`composed_pgd_step`, which a backend may use as it is; a backend may
        fuse the step into the gradient pass instead (numba_cpu does for 'linf').
    momentum_step(xa, g, mom, decay, flip, x0, eps, alpha, lo, hi, active) -> (xa', mom')
        One MI-FGSM step after its gradient g (N, *S): for every image, d = g (-g when flip;
        a targeted attack descends) in float64, mom' = decay * mom + d / ||d||_1 (a zero d
        adds nothing; ``reference momentum_update``), then xa' = linf_step(xa, mom' cast to
        dt, x0, eps, alpha, lo, hi, active). mom, mom': (N, D) float64; decay: float >= 0.
        Exactly :func:`composed_momentum_step` (numba_cpu fuses the norm, the update and the
        cast into one pass).

JSMA search (streamed: no n x n table is ever built)
    jsma_best_pair(a, b, domain, theta) -> (p (N,) int64, q (N,) int64, found (N,) bool)
        a, b: (N, D) in dt; domain: (N, D) bool. The admissible pair {p < q} maximising
        -(a_p + a_q) (b_p + b_q) with alpha > 0, beta < 0 for theta > 0 (signs flipped for
        theta < 0); ties -> smallest p, then smallest q. As ``reference.jsma.best_pair``.
    jsma_best_feature(a, b, domain, theta) -> (i (N,) int64, found (N,) bool)

Differential evolution (the draws come from the engine; the arithmetic is the backend's)
    de_step(pop, draws, F, CR, lower, upper) -> trial
        pop (N, P, dim) in dt; draws a dict of device arrays: 'r1', 'r2', 'r3' (N, P) int64,
        and with CR also 'cross' (N, P, dim) and 'forced' (N, P); CR None (no crossover, Su
        et al.) or a float; lower, upper (dim,). DE/rand/1, optional binomial crossover, then
        clipping to the bounds, as ``reference.pixel.de_step``.
    de_score(net, x, labels, pop, targeted) -> (fitness (N, P), pred (N, P) int64)
        Writes each candidate's pixels into a copy of its image (floor of row/col, clamped;
        later pixels win) and scores all N*P candidates in one batched pass: fitness =
        log softmax_y (untargeted, minimised) or -log softmax_t (targeted). A backend may
        compute it incrementally (a changed pixel changes only its receptive field) but must
        equal full scoring to float tolerance.
"""

import numpy as np

from ..errors import AdvkernError, ShapeError

PRIMITIVES = (
    "to_device", "to_host", "prepare", "logits", "loss_grad", "jacobian", "param_grads",
    "linf_step", "l2_step", "l1_step", "pgd_step", "momentum_step", "jsma_best_pair",
    "jsma_best_feature", "de_step", "de_score",
)

_STEPS = {"linf": "linf_step", "l2": "l2_step", "l1": "l1_step"}


def composed_pgd_step(be, net, xa, labels, loss, flip, x0, eps, alpha, lo, hi, active, norm,
                      sparsity=0.95):
    """``pgd_step`` from backend be's own loss_grad and step primitives."""
    if norm not in _STEPS:
        raise AdvkernError(f"unknown norm {norm!r}: use one of {sorted(_STEPS)}")
    _, g, _ = be.loss_grad(net, xa, labels, loss)
    g = -g if flip else g
    step = getattr(be, _STEPS[norm])
    if norm == "l1":
        return step(xa, g, x0, eps, alpha, lo, hi, active, sparsity)
    return step(xa, g, x0, eps, alpha, lo, hi, active)


def check_momentum(mom, decay, n, d, asarray):
    """momentum_step's own arguments: mom an (n, d) float64 array, decay a finite float >= 0.
    Returns (mom converted by asarray(a, name), decay as a float)."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float, np.floating, np.integer)) \
            or not np.isfinite(decay) or decay < 0:
        raise AdvkernError(f"decay must be a finite number >= 0, got {decay!r}")
    mom = asarray(mom, "mom")
    if mom.dtype != np.float64:
        raise AdvkernError(f"mom must be float64, got dtype {mom.dtype}")
    if tuple(mom.shape) != (n, d):
        raise ShapeError(f"mom must have shape ({n}, {d}) (images, features), got "
                         f"{tuple(mom.shape)}")
    return mom, float(decay)


def composed_momentum_step(be, xa, g, mom, decay, flip, x0, eps, alpha, lo, hi, active):
    """``momentum_step`` from backend be's xp and its own linf_step."""
    xp = be.xp
    n = xa.shape[0]
    d = int(np.prod(xa.shape[1:], dtype=np.int64))
    if tuple(g.shape) != tuple(xa.shape):
        raise ShapeError(f"g must have xa's shape {tuple(xa.shape)}, got {tuple(g.shape)}")
    mom, decay = check_momentum(mom, decay, n, d, lambda a, name: a)
    dg = (-g if flip else g).reshape(n, d).astype(np.float64)
    l1 = xp.abs(dg).sum(axis=1)
    scale = xp.where(l1 > 0, 1.0 / xp.where(l1 > 0, l1, 1.0), 0.0)
    mom = decay * mom + dg * scale[:, None]
    step_dir = mom.reshape(xa.shape).astype(xa.dtype)
    return be.linf_step(xa, step_dir, x0, eps, alpha, lo, hi, active), mom


def check_step_arrays(xa, g, x0, active, asarray):
    """The step primitives' array checks, one wording for every backend: xa, g and x0 are
    float32/float64 arrays with a batch axis, of one shape and one dtype; active is (N,).
    g None: not given yet (it is then not checked). asarray(a, name): the backend's
    conversion of an argument to its array type. Returns (xa, g, x0, active) converted."""
    named = [(xa, "xa"), (x0, "x0")] + ([(g, "g")] if g is not None else [])
    arrays = []
    for a, name in named:
        a = asarray(a, name)
        if a.dtype not in (np.float32, np.float64):
            raise AdvkernError(f"{name} must be float32 or float64, got dtype {a.dtype}")
        if a.ndim < 1:
            raise ShapeError(f"{name} must have a batch axis (N, ...), got a scalar")
        arrays.append(a)
    xa, x0 = arrays[:2]
    g = arrays[2] if g is not None else None
    gg = xa if g is None else g
    if gg.shape != x0.shape or xa.shape != x0.shape:
        raise ShapeError(f"xa, g and x0 must have one shape, got {tuple(xa.shape)}, "
                         f"{tuple(gg.shape)} and {tuple(x0.shape)}")
    if xa.dtype != x0.dtype or gg.dtype != x0.dtype:
        raise AdvkernError(f"xa, g and x0 must share one dtype, got {xa.dtype}, {gg.dtype} "
                           f"and {x0.dtype}")
    act = asarray(active, "active")
    n = x0.shape[0]
    if act.shape != (n,):
        raise ShapeError(f"active must have shape ({n},), got {tuple(act.shape)}")
    return xa, g, x0, act


def missing_primitives(backend):
    """Names of the contract's primitives a backend module lacks (empty when complete)."""
    return [name for name in PRIMITIVES if not callable(getattr(backend, name, None))]
