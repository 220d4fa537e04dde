"""One-/few-pixel attack by differential evolution (Su, Vargas & Sakurai 2019; Storn & Price 1997).

The attack searches, without gradients, for ``k`` pixels whose values, written into the image,
change the model's decision. A candidate is a real vector of length ``dim = k (2 + C)``::

    z = (r_1, c_1, v_1^1 .. v_1^C,  r_2, c_2, v_2^1 .. v_2^C,  ...,  r_k, c_k, v_k^1 .. v_k^C)

with bounds r in [0, H], c in [0, W], v in [lo, hi]. It is applied to a copy of its image by
writing x[:, floor(r_j), floor(c_j)] = (v_j^1 .. v_j^C) for j = 1 .. k in that order, the
floors clamped to [0, H-1] x [0, W-1] (the upper bound H itself maps to row H-1). When two
pixels of one candidate land on the same (row, col) the LATER one wins.

Fitness (minimised):   untargeted  f(z) = log softmax(logits(x'))_y    (true class)
                       targeted    f(z) = -log softmax(logits(x'))_t   (target class)
(Su et al. use the probabilities; the log ranks candidates identically but does not round
to exactly 1.0 for a confident model — see score_candidates.)
Success:               untargeted  argmax != y;   targeted  argmax == t.

Differential evolution, DE/rand/1 as written in Su et al. (their Eq. 2), population P::

    x_i(g+1) = x_r1(g) + F (x_r2(g) - x_r3(g)),   r1, r2, r3 distinct and all != i

then (only when CR is given) Storn & Price's binomial crossover

    u_ij = mutant_ij  if U_ij < CR or j == j_rand(i)  else  x_ij(g)

then clipping to the bounds, then greedy selection: the child replaces its parent when
f(child) <= f(parent) (Storn & Price's <=; SciPy's _accept_trial also uses <=). Every child of
a generation is built from the previous generation's population (synchronous, "deferred"
updating), so one generation of ALL still-active images is one batched forward pass of shape
(n_active * P, C, H, W) (split into groups of ``batch_images`` images when given).

Randomness. Image i uses only generator i of ``advkern._validate.per_sample_rngs(seed, N)``,
so a batch result equals each image's own result with seed=[seed_i]. Generator i is consumed
in this order (and only while image i is still being attacked):

1. initial population: ``rng.random((P, dim))``, mapped to lower + U (upper - lower);
2. each generation, ``de_draws`` (``generation_draws`` for a batch): r1 = rng.integers(0, P-1, P), r2 = rng.integers(0, P-2, P),
   r3 = rng.integers(0, P-3, P) (each then shifted past the already-excluded indices in
   ascending order, which maps it uniformly onto the allowed set); then, only with CR,
   U = rng.random((P, dim)) and j_rand = rng.integers(0, dim, P).

The arithmetic (``de_step``, ``de_select``, ``apply_candidates``, ``score_candidates``) is pure
and takes the draws as arrays, so a fast backend fed the same draws follows the same
trajectory (the population lives in x's dtype; F is cast to it).

Deviations from Su et al. (2019):

* Initialisation: they draw coordinates from U(1, 32) / U(1, 227) and RGB values from
  N(128, 127) on [0, 255] images. We draw rows/cols uniformly over the whole image and values
  uniformly in [lo, hi]; on [0, 1] single-channel MNIST a Gaussian around mid-grey has no
  natural analogue and uniform is the neutral choice.
* Early stop: they stop untargeted ImageNet attacks when the true-class probability falls
  below 5% and targeted CIFAR attacks when the target probability exceeds 50%. We stop an
  image as soon as ANY candidate scored in a generation (initial member or child, even a
  child that loses selection) succeeds, i.e. at misclassification / prediction == target.
  A stopped image is no longer scored (saves queries); ``early_stop=False`` runs the whole
  budget for every image.
* The defaults P = 400, 100 generations, F = 0.5 and no crossover are the paper's. Peer
  libraries default to far smaller searches (e.g. torchattacks' OnePixel: popsize=10 as a
  SciPy-style multiplier and 10 steps).
* They treat the search space as integer pixel coordinates and 8-bit values; we search reals
  and floor() the coordinates (the seed blog's and Keras ports' ``astype(int)`` truncation is
  the same for non-negative values), values are written unquantised.

Deviations from SciPy's ``differential_evolution`` (which Su et al.'s and most peer code
wrap):

* ``popsize`` here is the number of members; SciPy's is a multiplier (popsize * dim members).
* SciPy's default strategy is best1bin with a per-generation dithered F ~ U(0.5, 1) and
  recombination 0.7; ours is rand/1, fixed F, and no crossover unless CR is given.
* SciPy's default init is a Latin hypercube; ours is plain uniform.
* Out-of-bounds coordinates: SciPy re-draws them uniformly inside the bounds
  (``_ensure_constraint``); we clip them to the bounds (deterministic given the draws, so the
  draws stay separable from the arithmetic).
* SciPy's default updating is 'immediate' (a member is replaced as soon as its child is
  scored, and later children of the same generation see it); ours is 'deferred'.
* SciPy picks r1, r2, r3 by shuffling all other indices; ours by the skip method above
  (same distribution, different stream).
* SciPy stops at a convergence tolerance on the population's energies and then polishes the
  best member with L-BFGS-B; we do neither (gradient polishing is meaningless through floor()
  and contrary to the black-box setting): only success or the generation budget stop us.

Returned image: ``x_adv`` is x with the returned candidate applied, for EVERY image (the best
effort also where the attack failed; use ``np.where(info['success'], x_adv, x)`` to keep
failures clean). The returned candidate is the best one scored so far by the key
(successful first, then lower fitness).
"""

import numpy as np

from .._validate import (check_batch, check_float_array, check_int, check_positive,
                         check_targets, per_sample_rngs)
from ..errors import AdvkernError, ShapeError
from .losses import log_softmax, predict
from .network import forward

__all__ = ["pixel_attack", "candidate_bounds", "init_population", "de_draws",
           "generation_draws", "de_step", "de_select", "stack_draws", "apply_candidates",
           "score_candidates"]


# -- primitives -------------------------------------------------------------------------------

def candidate_bounds(input_shape, pixels, clip=(0.0, 1.0), dtype=np.float64):
    """Per-coordinate bounds of a k-pixel candidate for images of shape (C, H, W).

    Returns (lower, upper), each (k (2 + C),) in ``dtype``: per pixel (0, 0, lo, .., lo) and
    (H, W, hi, .., hi). For float32 the value bounds are rounded inwards, so a clipped value
    never leaves [lo, hi] when compared in float64.
    """
    c, h, w = input_shape
    dtype = np.dtype(dtype)
    lo, hi = float(clip[0]), float(clip[1])
    lo_d, hi_d = dtype.type(lo), dtype.type(hi)
    if float(lo_d) < lo:
        lo_d = np.nextafter(lo_d, dtype.type(np.inf))
    if float(hi_d) > hi:
        hi_d = np.nextafter(hi_d, dtype.type(-np.inf))
    lower = np.tile(np.array([0, 0] + [lo_d] * c, dtype=dtype), pixels)
    upper = np.tile(np.array([h, w] + [hi_d] * c, dtype=dtype), pixels)
    return lower, upper


def init_population(rng, popsize, lower, upper):
    """Initial population (popsize, dim): lower + U (upper - lower), U = rng.random((P, dim)).

    Computed in float64, then cast to lower's dtype and clipped (the cast may round up).
    """
    u = rng.random((popsize, len(lower)))
    lo64, up64 = lower.astype(np.float64), upper.astype(np.float64)
    return np.clip((lo64 + u * (up64 - lo64)).astype(lower.dtype), lower, upper)


def _ascending(excluded):
    """The excluded index arrays in ascending order, elementwise (a sorting network for the
    one to three of DE/rand/1: np.sort over a stacked axis of length 2-3 costs ~10x more)."""
    ex = np.broadcast_arrays(*excluded)
    if len(ex) == 1:
        return ex
    if len(ex) == 2:
        return [np.minimum(*ex), np.maximum(*ex)]
    if len(ex) == 3:
        a, b, c = ex
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        return [np.minimum(lo, c), np.maximum(lo, np.minimum(hi, c)), np.maximum(hi, c)]
    return list(np.moveaxis(np.sort(np.stack(ex, axis=-1), axis=-1), -1, 0))


def _skip(v, excluded):
    # v uniform on [0, P - m); stepping past the m excluded indices in ascending order maps it
    # uniformly onto {0 .. P-1} minus the excluded set. Any leading shape (per row, last axis).
    for e in _ascending(excluded):
        v = v + (v >= e)
    return v


def de_draws(rng, popsize, dim, CR=None):
    """All random draws of one DE/rand/1 generation for ONE image.

    Returns a dict of arrays: 'r1', 'r2', 'r3' (popsize,) int64, pairwise distinct and != i
    for row i; with CR not None also 'cross' (popsize, dim) uniforms on [0, 1) and 'forced'
    (popsize,) int64 in [0, dim) (the coordinate always taken from the mutant). Draw order:
    r1, r2, r3, cross, forced (see the module docstring). Needs popsize >= 4.
    """
    return {key: v[0] for key, v in generation_draws([rng], popsize, dim, CR).items()}


def generation_draws(rngs, popsize, dim, CR=None):
    """``de_draws`` of every image whose generator is in ``rngs``, stacked: (B, P) / (B, P, dim).

    Each generator is consumed exactly as by ``de_draws``; only the mapping of the raw
    integers onto the allowed indices is batched (it is elementwise per image).
    """
    p = popsize
    if p < 4:
        raise AdvkernError(f"popsize must be >= 4 for DE/rand/1, got {p}")

    def image(rng):  # one image's draws, in the documented order
        r = [rng.integers(0, p - m, size=p) for m in (1, 2, 3)]
        if CR is not None:
            r += [rng.random((p, dim)), rng.integers(0, dim, size=p)]
        return r

    raw = [image(rng) for rng in rngs]
    if raw:
        raw_b = [np.stack(col) for col in zip(*raw)]
    else:
        raw_b = [np.zeros((0, p), np.int64)] * 3
        if CR is not None:
            raw_b += [np.zeros((0, p, dim)), np.zeros((0, p), np.int64)]
    i = np.arange(p)
    r1 = _skip(raw_b[0], [i])
    r2 = _skip(raw_b[1], [i, r1])
    r3 = _skip(raw_b[2], [i, r1, r2])
    draws = {"r1": r1, "r2": r2, "r3": r3}
    if CR is not None:
        draws["cross"], draws["forced"] = raw_b[3], raw_b[4]
    return draws


def stack_draws(draws_list):
    """Stack per-image draws (dicts from ``de_draws``) along a new leading image axis."""
    return {key: np.stack([d[key] for d in draws_list]) for key in draws_list[0]}


def de_step(pop, draws, F, CR, lower, upper):
    """One DE/rand/1 generation of children (pure; batched over images).

    pop: (B, P, dim); draws: dict as from ``de_draws`` with a leading B axis
    ('r1', 'r2', 'r3': (B, P); with CR also 'cross': (B, P, dim), 'forced': (B, P));
    lower, upper: (dim,). Returns the trial population (B, P, dim) in pop's dtype:

        mutant = pop[r1] + F * (pop[r2] - pop[r3])             (evaluated in pop's dtype)
        trial  = where(cross < CR or j == forced, mutant, pop)  (only when CR is not None)
        trial  = clip(trial, lower, upper)
    """
    pop = np.asarray(pop)
    if pop.ndim != 3:
        raise ShapeError(f"pop must be (B, P, dim), got shape {pop.shape}")
    b, p, dim = pop.shape
    bi = np.arange(b)[:, None]
    f = pop.dtype.type(F)
    mutant = pop[bi, draws["r1"]] + f * (pop[bi, draws["r2"]] - pop[bi, draws["r3"]])
    if CR is not None:
        take = (draws["cross"] < CR) | (np.arange(dim) == draws["forced"][..., None])
        mutant = np.where(take, mutant, pop)
    return np.clip(mutant, lower.astype(pop.dtype), upper.astype(pop.dtype))


def de_select(pop, fitness, trial, trial_fitness):
    """Greedy one-to-one selection: the child replaces its parent where f(child) <= f(parent).

    pop, trial: (..., P, dim); fitness, trial_fitness: (..., P).
    Returns (new_pop, new_fitness); the inputs are not modified.
    """
    keep = trial_fitness <= fitness
    return np.where(keep[..., None], trial, pop), np.where(keep, trial_fitness, fitness)


def apply_candidates(x, pop):
    """Write each candidate's pixels into a copy of its image (pure; x is never modified).

    x: (B, C, H, W); pop: (B, P, dim) with dim = k (2 + C), finite.
    Returns images (B*P, C, H, W) in x's dtype, image b*P + p carrying candidate pop[b, p].
    Pixel j sets x[:, r, c] = v with r = clamp(floor(row_j), 0, H-1), c likewise; pixels are
    written in order j = 1 .. k, so on a collision the later pixel wins.
    """
    if x.ndim != 4:
        raise ShapeError(f"x must be (B, C, H, W), got shape {x.shape}")
    pop = check_float_array(pop, "pop", ndim=3)
    b, c, h, w = x.shape
    if pop.shape[0] != b or pop.shape[2] % (2 + c) or pop.shape[2] == 0:
        raise ShapeError(f"pop must be ({b}, P, k*{2 + c}) for images {x.shape}, "
                         f"got {pop.shape}")
    p = pop.shape[1]
    k = pop.shape[2] // (2 + c)
    out = np.repeat(x, p, axis=0)
    cand = pop.reshape(b * p, k, 2 + c)
    rows = np.clip(np.floor(cand[:, :, 0]), 0, h - 1).astype(np.intp)
    cols = np.clip(np.floor(cand[:, :, 1]), 0, w - 1).astype(np.intp)
    vals = cand[:, :, 2:].astype(x.dtype)
    n = np.arange(b * p)
    for j in range(k):
        out[n, :, rows[:, j], cols[:, j]] = vals[:, j]
    return out


def score_candidates(model, images, labels, targeted=False):
    """Fitness and prediction of perturbed images in ONE forward pass.

    images: (M, C, H, W); labels: (M,) the true class (untargeted) or the target (targeted).
    Returns fitness (M,) in images' dtype (log softmax_y, or -log softmax_t when targeted;
    minimised) and pred (M,) int64.

    The log is monotone, so it ranks candidates exactly as Su et al.'s probabilities do, but
    it does not saturate: a confident model's true-class probability rounds to exactly 1.0
    once its logit margin exceeds ~17 (float32) or ~37 (float64), which leaves DE comparing
    ties on a flat plateau; log-sum-exp keeps the differences.
    """
    logits, _ = forward(model, images)
    logp = log_softmax(logits)[np.arange(len(labels)), labels]
    return (-logp if targeted else logp), predict(logits)


# -- the attack -------------------------------------------------------------------------------

def new_best_state(n, dim, dtype, xp=np):
    """The attack's per-image record of its best candidate so far (see ``track_best``)."""
    return {"best": xp.zeros((n, dim), dtype=dtype), "fit": xp.full(n, np.inf, dtype=dtype),
            "pred": xp.zeros(n, dtype=np.int64), "success": xp.zeros(n, dtype=bool)}


def track_best(state, idx, cand, fit, pred, hit, xp=np):
    """Update, in place, each scored image's best candidate by the key (successful first,
    then lower fitness; the first such member on ties; a later generation replaces the
    record only when strictly better).

    state: from ``new_best_state``; idx (M,) the images scored; cand (M, P, dim); fit, pred,
    hit (M, P). xp: the array module of the arrays (numpy, or a GPU backend's).
    """
    best, best_fit, best_pred, success = (state[k] for k in ("best", "fit", "pred", "success"))
    rows = xp.arange(len(idx))
    j = xp.where(hit.any(axis=1), xp.where(hit, fit, np.inf).argmin(axis=1),
                 fit.argmin(axis=1))
    f, s = fit[rows, j], hit[rows, j]
    better = (s & ~success[idx]) | ((s == success[idx]) & (f < best_fit[idx]))
    upd = idx[better]
    best[upd] = cand[rows[better], j[better]]
    best_fit[upd], best_pred[upd], success[upd] = f[better], pred[rows, j][better], s[better]


def check_pixel_args(model, x, y, pixels, popsize, generations, F, CR, targeted, target, clip):
    """Validate the pixel attack's arguments (shared with the engine: the same errors).

    Returns (x, y, (lo, hi), pixels, popsize, generations, F, CR, labels) where labels are
    the true classes (untargeted) or the targets.
    """
    x, y, (lo, hi) = check_batch(model, x, y, clip)
    if len(model.input_shape) != 3:
        raise ShapeError(f"pixel_attack needs image models with input (C, H, W), "
                         f"got input shape {model.input_shape}")
    k = check_int(pixels, "pixels", minimum=1)
    hw = model.input_shape[1] * model.input_shape[2]
    if k > hw:
        raise AdvkernError(f"pixels must be at most the image's {hw} pixels, got {k}")
    p = check_int(popsize, "popsize", minimum=4)
    n_gen = check_int(generations, "generations", minimum=1)
    F = check_positive(F, "F")
    if F > 2:
        raise AdvkernError(f"F must be in (0, 2], got {F}")
    if CR is not None:
        CR = check_positive(CR, "CR", allow_zero=True)
        if CR > 1:
            raise AdvkernError(f"CR must be in [0, 1] (or None for no crossover), got {CR}")
    if targeted:
        labels = check_targets(target, y, model.num_classes)
    elif target is not None:
        raise AdvkernError("target given for an untargeted attack; pass targeted=True")
    else:
        labels = y
    return x, y, (lo, hi), k, p, n_gen, F, CR, labels


def pixel_attack(model, x, y, *, pixels=1, popsize=400, generations=100, F=0.5, CR=None,
                 targeted=False, target=None, seed=0, clip=(0.0, 1.0), early_stop=True,
                 batch_images=None):
    """One-/few-pixel attack by DE/rand/1 (see the module docstring for the algorithm).

    model: Sequential with input (C, H, W); x: (N, C, H, W) float32/float64 in [lo, hi];
    y: (N,) true labels. pixels: k >= 1 pixels to change; popsize: P >= 4 members;
    generations: G >= 1; F in (0, 2]; CR: None (no crossover, as Su et al.) or in [0, 1];
    targeted with target (N,) or a scalar; seed: int or N ints (see per_sample_rngs);
    early_stop: stop an image at its first success; batch_images: at most this many images
    (batch_images * P candidates) per forward pass (default: all active images; the forward
    input alone is n_active * P * C*H*W values, e.g. 400 * 784 * 4 B = 1.25 MB per MNIST
    image in float32, before the model's activations).

    Returns (x_adv, info): x_adv (N, C, H, W) in x's dtype (x with the returned candidate
    applied; at most k pixels differ) and info, a dict of per-image arrays:
    'success' (N,) bool, 'generations' (N,) int64 (generations run: at the first success
    when early stopping, else G; 0 when a member of the initial population already
    succeeds), 'best_fitness' (N,) the returned candidate's fitness, 'queries' (N,) int64
    model evaluations (P (1 + generations)), 'pred' (N,) int64 its prediction, and
    'candidate' (N, k, 2 + C) the returned candidate (row, col, values) in x's dtype.
    """
    x, y, (lo, hi), k, p, n_gen, F, CR, labels = check_pixel_args(
        model, x, y, pixels, popsize, generations, F, CR, targeted, target, clip)
    if batch_images is not None:
        batch_images = check_int(batch_images, "batch_images", minimum=1)

    n = len(x)
    c = model.input_shape[0]
    dim = k * (2 + c)
    dtype = x.dtype
    lower, upper = candidate_bounds(model.input_shape, k, (lo, hi), dtype)
    rngs = per_sample_rngs(seed, n)
    step = batch_images or max(n, 1)

    def evaluate(idx, cand):
        # Score cand (len(idx), P, dim) of images idx: one forward per group of images.
        fit = np.empty((len(idx), p), dtype=dtype)
        pred = np.empty((len(idx), p), dtype=np.int64)
        for s in range(0, len(idx), step):
            sl = slice(s, s + step)
            images = apply_candidates(x[idx[sl]], cand[sl])
            f, q = score_candidates(model, images, np.repeat(labels[idx[sl]], p), targeted)
            fit[sl], pred[sl] = f.reshape(-1, p), q.reshape(-1, p)
        hit = pred == labels[idx][:, None] if targeted else pred != labels[idx][:, None]
        return fit, pred, hit

    state = new_best_state(n, dim, dtype)
    best, best_fit, best_pred, success = (state[k] for k in ("best", "fit", "pred", "success"))

    def track(idx, cand, fit, pred, hit):
        track_best(state, idx, cand, fit, pred, hit)

    pop = np.stack([init_population(r, p, lower, upper) for r in rngs]) if n else \
        np.zeros((0, p, dim), dtype=dtype)
    all_idx = np.arange(n)
    fit, pred, hit = evaluate(all_idx, pop)
    track(all_idx, pop, fit, pred, hit)
    gens = np.zeros(n, dtype=np.int64)

    for g in range(1, n_gen + 1):
        idx = np.flatnonzero(~success) if early_stop else all_idx
        if idx.size == 0:
            break
        draws = generation_draws([rngs[i] for i in idx], p, dim, CR)
        trial = de_step(pop[idx], draws, F, CR, lower, upper)
        t_fit, t_pred, t_hit = evaluate(idx, trial)
        pop[idx], fit[idx] = de_select(pop[idx], fit[idx], trial, t_fit)
        track(idx, trial, t_fit, t_pred, t_hit)
        gens[idx] = g

    x_adv = apply_candidates(x, best[:, None, :])
    info = {"success": success, "generations": gens, "best_fitness": best_fit,
            "queries": p * (1 + gens), "pred": best_pred,
            "candidate": best.reshape(n, k, 2 + c)}
    return x_adv, info
