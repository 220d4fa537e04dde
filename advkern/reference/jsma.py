"""Jacobian-based Saliency Map Attack (JSMA), Papernot et al. 2016, "The Limitations of Deep
Learning in Adversarial Settings" (EuroS&P 2016): a targeted L0 attack.

Notation: an image is flattened to n = prod(input_shape) features x (n,); F(x) (K,) is the
vector the saliency is taken from (the logits Z, the paper's choice, or the softmax
probabilities); t is the target class. Per image and per iteration

    a = dF_t/dx                   (n,)   how each feature moves the target score
    b = sum_{j != t} dF_j/dx      (n,)   how it moves all the other scores together

and the search runs over a *search domain* Gamma of features still free to move.

Pair variant (the paper's Algorithm 3), theta > 0 (features are increased):

    alpha_pq = a_p + a_q,   beta_pq = b_p + b_q
    (p*, q*) = argmax_{p < q, p, q in Gamma}  -alpha_pq * beta_pq
               subject to alpha_pq > 0 and beta_pq < 0

and for theta < 0 (features are decreased) the sign conditions flip, alpha_pq < 0 and
beta_pq > 0, with the same objective -alpha_pq * beta_pq (> 0 on every admissible pair).
Single-feature variant (the paper's Eq. 8-9):

    theta > 0:  S[i] = 0 if a_i < 0 or b_i > 0, else a_i * |b_i|
    theta < 0:  S[i] = 0 if a_i > 0 or b_i < 0, else |a_i| * b_i
    i* = argmax_{i in Gamma} S[i]

Both S[i] on its admissible set and the pair objective equal -a*b (resp. -alpha*beta), so
the two searches share one admissibility rule; see :func:`best_pair` and
:func:`best_feature` for the exact rule, the tie-breaking and what "not found" means. These
two pure functions are the primitives a fast backend implements.
"""

import numbers

import numpy as np

from .._validate import check_batch, check_float_array, check_int, check_positive, check_targets
from ..errors import AdvkernError, ShapeError
from .losses import predict, softmax
from .network import forward, jacobian

VARIANTS = ("pair", "single")


# -- argument checks ------------------------------------------------------------------------

def _check_theta(theta):
    """theta as a float: finite and non-zero (its sign picks increase or decrease)."""
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real):
        raise AdvkernError(f"theta must be a real number, got {theta!r}")
    v = float(theta)
    if not np.isfinite(v) or v == 0:
        raise AdvkernError(f"theta must be finite and non-zero, got {theta!r}")
    return v


def _check_search_args(a, b, domain, theta):
    a = check_float_array(a, "a", ndim=2)
    b = check_float_array(b, "b", ndim=2)
    if b.shape != a.shape:
        raise ShapeError(f"a and b must have the same shape (B, n), got {a.shape} and {b.shape}")
    dt = np.result_type(a, b)                      # one working dtype for sums and products
    a, b = a.astype(dt, copy=False), b.astype(dt, copy=False)
    domain = np.asarray(domain)
    if domain.dtype != np.bool_:
        raise AdvkernError(f"domain must be a boolean mask, got dtype {domain.dtype}")
    if domain.shape != a.shape:
        raise ShapeError(f"domain must have the shape of a {a.shape}, got {domain.shape}")
    return a, b, domain, _check_theta(theta)


def _admissible(alpha, beta, theta):
    """The sign rule of both variants: alpha > 0 > beta (theta > 0), alpha < 0 < beta (else)."""
    if theta > 0:
        ok = alpha > 0
        ok &= beta < 0
    else:
        ok = alpha < 0
        ok &= beta > 0
    return ok


def max_iterations(n, gamma, variant="pair"):
    """Papernot's iteration budget for n features and the distortion bound gamma in (0, 1].

    budget = floor(gamma * n) features; max_iter = floor(budget / 2) = floor(gamma * n / 2)
    for the pair variant (two features per iteration) and budget for the single variant, so
    an image never has more than budget features changed. The product gamma * n gets a
    1e-12 relative allowance, so that e.g. gamma = 0.29, n = 100 gives 29, not the 28 the
    binary float product 28.999999999999996 would.
    """
    n = check_int(n, "n", minimum=0)
    gamma = check_positive(gamma, "gamma")
    if gamma > 1:
        raise AdvkernError(f"gamma must be in (0, 1], got {gamma!r}")
    if variant not in VARIANTS:
        raise AdvkernError(f"variant must be one of {VARIANTS}, got {variant!r}")
    budget = int(np.floor(n * gamma * (1 + 1e-12)))
    return budget // 2 if variant == "pair" else budget


# -- the two search primitives --------------------------------------------------------------

def best_pair(a, b, domain, theta, block=256):
    """The pair of the paper's Algorithm 3, for every image of a batch.

    a, b: (B, n) float (a = dF_t/dx, b = sum_{j != t} dF_j/dx); domain: (B, n) bool (the
    search domain Gamma); theta: its sign picks the rule (magnitude unused).
    Returns p, q: (B,) int64 feature indices with p < q (-1 where not found) and found (B,)
    bool.

    Rule: over pairs p < q with domain[p] and domain[q], alpha = a_p + a_q, beta = b_p + b_q
    (in the dtype of a and b), a pair is admissible when alpha > 0 and beta < 0 (theta > 0)
    or alpha < 0 and beta > 0 (theta < 0), strictly; the chosen pair maximises
    -alpha * beta over the admissible pairs. found is False when no pair is admissible
    (fewer than two domain features, or no pair passes the sign test). Ties are broken
    deterministically by the smallest p, then the smallest q.

    Memory: no n x n table is ever built. The domain features of an image are gathered into
    m <= n entries (the order, and hence the tie rule, is kept) and the rows p are streamed
    `block` at a time against the columns q > p: about 18 bytes (two float64 tables and two
    bool masks) per entry of a block x m partial table, i.e. O(block * n), with a running
    best (score, p, q) per image. Images are searched one after the other. Work: m(m-1)/2
    pairs per image.

    Streaming honours the tie rule exactly: within a block, argmin over the row-major table
    returns the first minimum (smallest row p, then smallest column q), and a later block
    (larger p) replaces the running best only when strictly better. The product alpha * beta
    is minimised instead of maximising -alpha * beta: negation is exact, so the two orders
    and their ties coincide.
    """
    a, b, domain, theta = _check_search_args(a, b, domain, theta)
    block = check_int(block, "block")
    nb = len(a)
    p = np.full(nb, -1, dtype=np.int64)
    q = np.full(nb, -1, dtype=np.int64)
    found = np.zeros(nb, dtype=bool)
    for img in range(nb):
        idx = np.flatnonzero(domain[img])
        best = _best_pair_one(a[img, idx], b[img, idx], theta, block)
        if best is not None:
            p[img], q[img], found[img] = idx[best[0]], idx[best[1]], True
    return p, q, found


def _best_pair_one(ad, bd, theta, block):
    """(i, j) with i < j over the gathered domain features ad, bd (m,), or None."""
    m = ad.size
    best_val, best = np.inf, None
    for i0 in range(0, m - 1, block):
        i1 = min(i0 + block, m - 1)            # the last feature has no partner q > p
        rows = i1 - i0
        alpha = ad[i0:i1, None] + ad[None, i0 + 1:]   # (rows, m - i0 - 1): column c is q = i0+1+c
        beta = bd[i0:i1, None] + bd[None, i0 + 1:]
        ok = _admissible(alpha, beta, theta)
        # Row r is p = i0 + r, so only columns c >= r are pairs q > p (upper triangle of the
        # leading rows x (rows - 1) corner; every later column is q > p for every row).
        ok[:, :rows - 1] &= np.triu(np.ones((rows, rows - 1), dtype=bool))
        np.multiply(alpha, beta, out=alpha)
        del beta
        # Admissible products lie in [-inf, -0.0]; +inf marks the rest, so argmin never picks
        # an inadmissible pair while one admissible pair exists.
        np.copyto(alpha, np.inf, where=~ok)
        k = int(np.argmin(alpha))
        val = alpha.flat[k]
        if val < best_val:
            best_val = val
            r, c = divmod(k, alpha.shape[1])
            best = (i0 + r, i0 + 1 + c)
    return best


def best_feature(a, b, domain, theta):
    """The feature of the single-feature saliency map (the paper's Eq. 8-9), per image.

    a, b: (B, n) float; domain: (B, n) bool; theta: its sign picks the rule.
    Returns i: (B,) int64 (-1 where not found) and found (B,) bool.

    Rule: a feature i in the domain is admissible when a_i > 0 and b_i < 0 (theta > 0) or
    a_i < 0 and b_i > 0 (theta < 0), strictly; its saliency is then S[i] = -a_i * b_i
    (= a_i |b_i|, resp. |a_i| b_i) and the chosen feature maximises S, ties to the smallest
    index. found is False when no domain feature is admissible: the paper's S is 0 there, and
    a feature with zero first-order effect is not worth spending the budget on (the same
    stopping rule as the pair variant).
    """
    a, b, domain, theta = _check_search_args(a, b, domain, theta)
    ok = _admissible(a, b, theta)
    ok &= domain
    prod = a * b                                   # minimised: -a*b is maximised, same ties
    np.copyto(prod, np.inf, where=~ok)
    i = np.argmin(prod, axis=1).astype(np.int64) if a.shape[1] else np.zeros(len(a), np.int64)
    found = ok.any(axis=1)
    i[~found] = -1
    return i, found


# -- saliency terms from the model ----------------------------------------------------------

def saliency_terms(jac, logits, target, use_logits=True):
    """a = dF_t/dx and b = sum_{j != t} dF_j/dx from the logit Jacobian, per image.

    jac: (B, K, n) = dZ/dx (``network.jacobian``); logits: (B, K); target: (B,) int.
    Returns a, b: (B, n) in jac's dtype.

    use_logits=True: F = Z (the paper's choice). use_logits=False: F = softmax(Z) and, with
    s = softmax(Z), dF/dx = (diag(s) - s s^T) dZ/dx, i.e. dF_k/dx = s_k (dZ_k/dx - sum_j s_j
    dZ_j/dx). As sum_k F_k = 1, b = -a up to rounding there, so the pair objective becomes
    alpha^2 over pairs with alpha > 0 (the effect Carlini & Wagner point out for JSMA-F);
    b is still computed as the sum over the other classes, as defined.

    Binary models (K = 1, logits read as the two classes (0, z)): with probabilities the
    two-class reading is used (s = (1 - sigma(z), sigma(z))). With logits it would make one of
    a, b identically 0, so no pair or feature could ever be admissible: that raises
    AdvkernError instead of failing silently.
    """
    jac = np.asarray(jac)
    logits = np.asarray(logits)
    if jac.ndim != 3 or logits.shape != jac.shape[:2]:
        raise ShapeError(f"jac must be (B, K, n) and logits (B, K), got {jac.shape} and "
                         f"{logits.shape}")
    nb, k, _ = jac.shape
    target = np.asarray(target)
    if target.shape != (nb,):
        raise ShapeError(f"target must have shape ({nb},), got {target.shape}")
    if use_logits:
        if k == 1:
            raise AdvkernError("JSMA on the logits of a binary (one-logit) model is degenerate "
                               "(b = 0 for target 1, a = 0 for target 0): use use_logits=False")
        g = jac
    else:
        jz = jac if k > 1 else np.concatenate([np.zeros_like(jac), jac], axis=1)
        s = softmax(logits).astype(jac.dtype, copy=False)        # (B, max(K, 2))
        mean = np.einsum("bk,bkn->bn", s, jz)
        g = s[:, :, None] * (jz - mean[:, None, :])
    kk = g.shape[1]
    if nb and (target.min() < 0 or target.max() >= kk):
        raise AdvkernError(f"target out of range [0, {kk - 1}]")
    rows = np.arange(nb)
    a = g[rows, target]
    others = np.ones((nb, kk), dtype=bool)
    others[rows, target] = False
    b = np.where(others[:, :, None], g, 0).sum(axis=1)
    return a, b


# -- the attack -----------------------------------------------------------------------------

def check_jsma_args(model, x, y, target, theta, gamma, variant, use_logits, clip):
    """Validate JSMA's arguments (shared with the engine, so both raise the same errors).

    Returns (x, y, (lo, hi), theta, target (N,), max_iter); target 'next' is resolved.
    """
    x, y, (lo, hi) = check_batch(model, x, y, clip)
    if variant not in VARIANTS:
        raise AdvkernError(f"variant must be one of {VARIANTS}, got {variant!r}")
    theta = _check_theta(theta)
    if not isinstance(use_logits, (bool, np.bool_)):
        raise AdvkernError(f"use_logits must be True or False, got {use_logits!r}")
    n = int(np.prod(model.input_shape))
    max_iter = max_iterations(n, gamma, variant)
    if use_logits and model.num_logits == 1:
        raise AdvkernError("JSMA on the logits of a binary (one-logit) model is degenerate "
                           "(b = 0 for target 1, a = 0 for target 0): use use_logits=False")
    if isinstance(target, str):
        if target != "next":
            raise AdvkernError(f"target must be labels or 'next', got {target!r}")
        target = (y + 1) % model.num_classes
    t = check_targets(target, y, model.num_classes)
    return x, y, (lo, hi), theta, t, max_iter


def jsma(model, x, y, target, *, theta=1.0, gamma=0.1, variant="pair", use_logits=True,
         clip=(0.0, 1.0), block=256):
    """Targeted JSMA (Papernot et al. 2016) on a batch; returns a new x_adv and per-image info.

    model: a Sequential; x: (N, *input_shape) float32/float64 inside clip = (lo, hi);
    y: (N,) true labels; target: an int, an array (N,), or 'next' for (y + 1) % num_classes;
    every target must differ from y. theta: finite, non-zero change per chosen feature
    (> 0 increases features, < 0 decreases them); gamma in (0, 1]: the largest fraction of
    the n = prod(input_shape) features that may change; variant: 'pair' (Algorithm 3) or
    'single' (Eq. 8-9); use_logits: saliency from the logits (the paper) or the softmax
    probabilities (see :func:`saliency_terms`, which also covers binary models); block: the
    row block of the streamed pair search (memory O(block * n), see :func:`best_pair`).

    Returns x_adv: (N, *input_shape) in x's dtype (x is not modified) and info, a dict of
    (N,) arrays: success (bool, the model predicts target at x_adv), l0 (int64, features with
    x_adv != x) and iterations (int64, modifications made).

    Per image, with Gamma = {i : x_i < hi} (theta > 0) or {i : x_i > lo} (theta < 0): until
    the model predicts t, or max_iter = :func:`max_iterations` (floor(gamma n / 2) pairs or
    floor(gamma n) single features) modifications were made, or no pair/feature is
    admissible (failure):
        compute a, b at the current x_adv; pick (p, q) = best_pair (or i = best_feature);
        x_p <- clip(x_p + theta, lo, hi) for each chosen feature;
        a chosen feature leaves Gamma when it is now saturated (x_p == hi for theta > 0,
        x_p == lo for theta < 0); otherwise it stays and may be chosen again.
    Only chosen features change, so they are the only ones that can saturate. With theta = 1
    on [0, 1] every chosen feature saturates at once and this is the paper's
    Gamma <- Gamma \\ {p, q}; with a smaller |theta| a feature can be picked several times,
    so l0 <= 2 * iterations (pair) or <= iterations (single), and l0 <= floor(gamma n).
    The prediction is checked before each iteration, so an image already predicted as its
    target returns unchanged with success and 0 iterations.

    Batching: all still-active images move together — one forward pass (predictions, and the
    probabilities for use_logits=False) and one ``network.jacobian`` call over them per
    iteration, then the per-image searches. Every image's path depends only on itself, so a
    batch result equals the per-image results. Deterministic (no randomness).
    """
    x, y, (lo, hi), theta, t, max_iter = check_jsma_args(model, x, y, target, theta, gamma,
                                                         variant, use_logits, clip)
    block = check_int(block, "block")
    n_img = len(x)
    n = int(np.prod(model.input_shape))

    dt = x.dtype
    step, lo_d, hi_d = dt.type(theta), dt.type(lo), dt.type(hi)
    x0 = x.reshape(n_img, n)
    xa = x0.copy()
    domain = xa < hi_d if theta > 0 else xa > lo_d
    success = np.zeros(n_img, dtype=bool)
    iterations = np.zeros(n_img, dtype=np.int64)
    live = np.arange(n_img)
    while live.size:
        logits, _ = forward(model, xa[live].reshape(-1, *model.input_shape))
        hit = predict(logits) == t[live]
        success[live[hit]] = True
        keep = ~hit & (iterations[live] < max_iter)
        live, logits = live[keep], logits[keep]
        if not live.size:
            break
        jac = jacobian(model, xa[live].reshape(-1, *model.input_shape))
        a, b = saliency_terms(jac, logits, t[live], use_logits)
        if variant == "pair":
            p, q, found = best_pair(a, b, domain[live], theta, block)
            chosen = (p[found], q[found])
        else:
            i, found = best_feature(a, b, domain[live], theta)
            chosen = (i[found],)
        live = live[found]
        for c in chosen:
            v = np.clip(xa[live, c] + step, lo_d, hi_d)
            xa[live, c] = v
            domain[live, c] = v < hi_d if theta > 0 else v > lo_d
        iterations[live] += 1
    info = {"success": success, "l0": np.count_nonzero(xa != x0, axis=1).astype(np.int64),
            "iterations": iterations}
    return xa.reshape(x.shape), info
