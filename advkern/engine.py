"""The attack engine: every attack written once over the backend contract.

``engine.pgd(model, x, y, ..., backend="numba_cpu")`` runs the same algorithm as
``advkern.reference.gradient_attacks.pgd`` (the specification, which the tests hold it to),
but every heavy operation is a primitive of the chosen backend (``advkern.kernels``): the
batch is moved to the backend's device once, every step runs there, and only the result
comes back. Per step the host sees at most one bool (the early-stop "anyone left?" check).

Inputs are validated exactly as by the reference (same errors), randomness comes from the
same per-image generators (``per_sample_rngs``), so with the ``numpy`` backend the engine
reproduces the reference bit for bit, and with a fast backend up to the documented
tolerances (gradient-sign ties for sign steps, float rounding for L2/L1).
"""

import numpy as np

from . import kernels
from ._validate import check_batch, per_sample_rngs
from .errors import AdvkernError
from .reference import gradient_attacks as _ga
from .reference import jsma as _jsma
from .reference import pixel as _px
from .reference.projections import per_sample_eps


def _backend(backend):
    """A backend module from a name ('auto': the fastest here, see kernels.resolve;
    'reference': the numpy backend, whose primitives are the reference's) or a module."""
    if backend is None or isinstance(backend, str):
        name = kernels.resolve(backend)
        return kernels.get("numpy" if name == "reference" else name)
    if not callable(getattr(backend, "prepare", None)):
        raise AdvkernError(f"backend must be a backend name or module, got "
                           f"{type(backend).__name__}")
    return backend


def _predict(xp, z):
    if z.shape[1] == 1:
        return (z[:, 0] > 0).astype(np.int64)
    return z.argmax(axis=1)


# -- gradient attacks ---------------------------------------------------------------------


def fgsm(model, x, y, eps, *, targeted=False, target=None, loss="ce", clip=(0.0, 1.0),
         backend="auto"):
    """FGSM on a backend: x' = clip(x +- eps * sign(grad_x J)); see reference ``fgsm``.

    Run as one L-inf PGD step of length eps from x (the eps-ball clip is then a no-op).
    """
    return pgd(model, x, y, eps, _step_len(eps), 1, norm="inf", loss=loss, targeted=targeted,
               target=target, clip=clip, backend=backend)


def _step_len(eps):
    # alpha = eps, but > 0 where eps == 0 (those images are projected back onto x anyway).
    e = np.asarray(eps, dtype=np.float64)
    return np.where(e > 0, e, 1.0) if e.ndim else (float(eps) if eps else 1.0)


def fgm_l2(model, x, y, eps, *, targeted=False, target=None, loss="ce", clip=(0.0, 1.0),
           backend="auto"):
    """L2 fast gradient x' = clip(x +- eps * g / ||g||_2); see reference ``fgm_l2``.

    Run as one L2 PGD step of length eps: the projection onto the eps-ball is then a no-op
    up to rounding (the step's norm is eps).
    """
    return pgd(model, x, y, eps, _step_len(eps), 1, norm=2, loss=loss, targeted=targeted,
               target=target, clip=clip, backend=backend)


def pgd(model, x, y, eps, alpha, steps, *, norm="inf", loss="ce", random_start=False,
        restarts=1, targeted=False, target=None, early_stop=False, clip=(0.0, 1.0), seed=0,
        l1_sparsity=0.95, backend="auto"):
    """PGD / BIM on a backend; arguments and result as reference ``gradient_attacks.pgd``.

    Per step: one ``pgd_step``; with early stop, one ``loss_grad`` (forward + loss + input
    gradient, which also returns the logits for the success check) and one fused ``*_step``
    (step, ball, box, freeze).
    """
    be = _backend(backend)
    x, y, (lo, hi), e, norm, a, steps, restarts, labels, sign, rngs = _ga.check_pgd_args(
        model, x, y, eps, alpha, steps, norm, loss, restarts, targeted, target, clip, seed,
        l1_sparsity, random_start)
    if not e.any():
        return x.copy()

    dt = x.dtype
    xp = be.xp
    net = be.prepare(model, dt)
    x0 = be.to_device(x)
    eps_d, alpha_d = be.to_device(e.astype(dt)), be.to_device(a.astype(dt))
    lab = be.to_device(labels)
    y_d = be.to_device(y)

    def succeeded(z):
        pred = _predict(xp, z)
        return pred == lab if targeted else pred != y_d

    def step(xa, g, active):
        if norm == "linf":
            return be.linf_step(xa, g, x0, eps_d, alpha_d, lo, hi, active)
        if norm == "l2":
            return be.l2_step(xa, g, x0, eps_d, alpha_d, lo, hi, active)
        return be.l1_step(xa, g, x0, eps_d, alpha_d, lo, hi, active, l1_sparsity)

    # Primitives never modify their inputs, so x0 itself can start an attack and the best
    # result so far can be an attack's own array (no copies of the batch per restart).
    best = x0
    best_obj = xp.full(len(x), -np.inf)
    best_ok = xp.zeros(len(x), dtype=bool)
    for _ in range(restarts if random_start else 1):
        # The random start is drawn on the host from the per-image generators (an input).
        xa = be.to_device(_ga.random_init(x, e, norm, rngs, (lo, hi))) if random_start \
            else x0
        active = xp.ones(len(x), dtype=bool)
        for _ in range(steps):
            if not early_stop:  # one primitive an iteration (a backend may fuse it)
                xa = be.pgd_step(net, xa, lab, loss, sign < 0, x0, eps_d, alpha_d, lo, hi,
                                 active, norm, l1_sparsity)
                continue
            _, g, z = be.loss_grad(net, xa, lab, loss)
            active &= ~succeeded(z)
            if not bool(active.any()):
                break
            xa = step(xa, g if sign > 0 else -g, active)
        values, _, z = be.loss_grad(net, xa, lab, loss)
        obj, ok = sign * values, succeeded(z)
        better = (ok & ~best_ok) | ((ok == best_ok) & (obj > best_obj))
        best = xa if bool(better.all()) else \
            xp.where(better.reshape((-1,) + (1,) * (xa.ndim - 1)), xa, best)
        best_obj = xp.where(better, obj, best_obj)
        best_ok = best_ok | ok
    return be.to_host(best)


def mi_fgsm(model, x, y, eps, alpha=None, steps=10, *, decay=1.0, targeted=False,
            target=None, loss="ce", clip=(0.0, 1.0), backend="auto"):
    """MI-FGSM on a backend; arguments and result as reference ``mi_fgsm``.

    Per step: one ``loss_grad`` and one ``momentum_step`` (the per-image L1 norm and the
    momentum update in float64, as ``reference momentum_update``, then the ``linf_step``
    along the momentum's sign).
    """
    be = _backend(backend)
    x, y, (lo, hi), e, a, steps, decay, labels, sign = _ga.check_mi_args(
        model, x, y, eps, alpha, steps, decay, loss, targeted, target, clip)
    if not e.any():
        return x.copy()
    xp, dt, n = be.xp, x.dtype, len(x)
    net = be.prepare(model, dt)
    x0 = be.to_device(x)
    eps_d, alpha_d = be.to_device(e.astype(dt)), be.to_device(a.astype(dt))
    lab = be.to_device(labels)
    active = xp.ones(n, dtype=bool)
    mom = xp.zeros((n, x[0].size), dtype=np.float64)
    xa = x0
    for _ in range(steps):
        _, g, _ = be.loss_grad(net, xa, lab, loss)
        xa, mom = be.momentum_step(xa, g, mom, decay, sign < 0, x0, eps_d, alpha_d, lo, hi,
                                   active)
    return be.to_host(xa)


def deepfool(model, x, y, *, norm=2, overshoot=0.02, max_iter=50, candidates=10,
             clip=(0.0, 1.0), backend="auto"):
    """DeepFool on a backend; arguments and result as reference ``deepfool.deepfool``.

    All images move together: per iteration one ``jacobian`` (K rows; it returns the logits
    for the stop test) over the images still at their original class, then the step
    (``reference deepfool_step``, written with the backend's xp) on the device.
    """
    from .reference import deepfool as _df

    be = _backend(backend)
    x, y, (lo, hi), norm, overshoot, max_iter, c = _df.check_deepfool_args(
        model, x, y, norm, overshoot, max_iter, candidates, clip)
    xp, dt, n = be.xp, x.dtype, len(x)
    shape = tuple(model.input_shape)
    net = be.prepare(model, dt)
    xa = be.to_device(x)
    x64 = be.to_device(x.reshape(n, -1), np.float64)
    z0 = be.logits(net, xa)
    k0 = _predict(xp, z0)
    cands = _df.candidate_classes(z0, c, xp)
    r_tot = xp.zeros((n, x[0].size), dtype=np.float64)
    iters = xp.zeros(n, dtype=np.int64)
    live = xp.arange(n)
    flat = xa.reshape(n, -1)
    for _ in range(max_iter):
        if not live.size:
            break
        jac, z = be.jacobian(net, flat[live].reshape((-1,) + shape))
        still = ~_df.crossed(z, k0[live], xp)
        live, z, jac = live[still], z[still], jac[still]
        if not live.size:
            break
        r, ok = _df.deepfool_step(z, jac, k0[live], cands[live], norm, xp)
        live, r = live[ok], r[ok]
        new = xp.clip(x64[live] + (1 + overshoot) * (r_tot[live] + r), lo, hi)
        r_tot[live] = (new - x64[live]) / (1 + overshoot)
        flat[live] = new.astype(dt)
        iters[live] += 1
    pred = _predict(xp, be.logits(net, xa)) if n else xp.zeros(0, dtype=np.int64)
    info = {"success": be.to_host(pred != k0), "iterations": be.to_host(iters),
            "original": be.to_host(k0)}
    return be.to_host(xa), info


def cw_l2(model, x, y, *, targeted=False, target=None, kappa=0.0, initial_const=1.0,
          search_steps=9, steps=100, lr=0.1, abort_early=True, clip=(0.0, 1.0),
          backend="auto"):
    """Carlini-Wagner L2 on a backend; arguments and result as reference ``cw.cw_l2``.

    The loop (``reference cw.run_cw``: Adam on tanh-space w, per-image binary search over c,
    the best successful point) runs with the backend's xp; each step is one ``loss_grad``
    with the 'cw' margin. Computed in float64 on every backend, as the reference: Adam's
    normalised steps turn float32 rounding of near-zero gradients into whole steps.
    """
    from .reference import cw as _cw

    be = _backend(backend)
    x, y, (lo, hi), labels, sign, kappa, c0, search_steps, steps, lr, abort_early = \
        _cw.check_cw_args(model, x, y, targeted, target, kappa, initial_const, search_steps,
                          steps, lr, abort_early, clip)
    n = len(x)
    if n == 0:
        return x.copy(), {"success": np.zeros(0, bool), "l2": np.zeros(0),
                          "const": np.zeros(0)}
    shape = (n,) + tuple(model.input_shape)
    net = be.prepare(model, np.float64)
    lab = be.to_device(labels)

    def grad_fn(xprime):
        v, dx, z = be.loss_grad(net, xprime.reshape(shape), lab, "cw")
        return v, dx.reshape(n, -1), z

    best, found, best_l2, const = _cw.run_cw(
        grad_fn, be.to_device(x.reshape(n, -1), np.float64), sign, lo, hi, kappa, c0,
        search_steps, steps, lr, abort_early, be.xp)
    found_h = be.to_host(found)
    info = {"success": found_h, "l2": np.where(found_h, np.sqrt(be.to_host(best_l2)), np.nan),
            "const": be.to_host(const)}
    return be.to_host(best).reshape(x.shape).astype(x.dtype), info


def lbfgs_attack(model, x, y, target, *, initial_const=0.1, search_steps=5, max_iter=30,
                 memory=8, clip=(0.0, 1.0), backend="auto"):
    """Szegedy et al.'s L-BFGS attack on a backend; arguments and result as reference
    ``lbfgs.lbfgs_attack`` (the projected L-BFGS and the search over c run with the backend's
    xp; each objective evaluation is one ``loss_grad``). float64 on every backend."""
    from .reference import lbfgs as _lb

    be = _backend(backend)
    x, y, (lo, hi), t, c0, search_steps, max_iter, memory = _lb.check_lbfgs_args(
        model, x, y, target, initial_const, search_steps, max_iter, memory, clip)
    n = len(x)
    if n == 0:
        return x.copy(), {"success": np.zeros(0, bool), "l2": np.zeros(0),
                          "const": np.zeros(0)}
    xp = be.xp
    shape = (n,) + tuple(model.input_shape)
    net = be.prepare(model, np.float64)
    t_d = be.to_device(t)

    def loss_grad_fn(z):
        j, dj, _ = be.loss_grad(net, z.reshape(shape), t_d, "ce")
        return j, dj.reshape(n, -1)

    def predict_fn(z):
        return _predict(xp, be.logits(net, z.reshape(shape))) == t_d

    best, found, best_d, const = _lb.run_lbfgs_attack(
        loss_grad_fn, predict_fn, be.to_device(x.reshape(n, -1), np.float64), c0,
        search_steps, max_iter, memory, lo, hi, xp)
    found_h = be.to_host(found)
    info = {"success": found_h, "l2": np.where(found_h, np.sqrt(be.to_host(best_d)), np.nan),
            "const": be.to_host(const)}
    return be.to_host(best).reshape(x.shape).astype(x.dtype), info


def bim(model, x, y, eps, alpha=None, steps=None, backend="auto", **kw):
    """BIM (L-inf PGD without random start) with Kurakin et al.'s defaults; see reference."""
    for k in ("norm", "random_start", "restarts"):
        if k in kw:
            raise AdvkernError(f"bim does not take {k}=")
    if alpha is None or steps is None:
        xc, _, box = check_batch(model, x, y, kw.get("clip", (0.0, 1.0)))
        d_alpha, d_steps = _ga.bim_defaults(float(per_sample_eps(eps, len(xc)).max(initial=0.0)),
                                            box)
        alpha = d_alpha if alpha is None else alpha
        steps = d_steps if steps is None else steps
    return pgd(model, x, y, eps, alpha, steps, norm="inf", backend=backend, **kw)


# -- JSMA ---------------------------------------------------------------------------------


def jsma(model, x, y, target, *, theta=1.0, gamma=0.1, variant="pair", use_logits=True,
         clip=(0.0, 1.0), backend="auto"):
    """Targeted JSMA on a backend; arguments and result as reference ``jsma.jsma``.

    All images of the batch move together: per iteration one ``jacobian`` (which returns the
    logits for the success check) over the still-active images, then one batched
    ``jsma_best_pair`` / ``jsma_best_feature`` search.
    """
    be = _backend(backend)
    x, y, (lo, hi), theta, t, max_iter = _jsma.check_jsma_args(model, x, y, target, theta,
                                                               gamma, variant, use_logits, clip)
    n_img, n = len(x), int(np.prod(model.input_shape))

    xp = be.xp
    dt = x.dtype
    net = be.prepare(model, dt)
    step, lo_d, hi_d = dt.type(theta), dt.type(lo), dt.type(hi)
    x0 = be.to_device(x.reshape(n_img, n))
    xa = x0.copy()
    t_d = be.to_device(t)
    domain = xa < hi_d if theta > 0 else xa > lo_d
    success = xp.zeros(n_img, dtype=bool)
    iterations = xp.zeros(n_img, dtype=np.int64)
    live = xp.arange(n_img)
    while live.size:
        a, b, z = _saliency(be, net, xa[live].reshape(-1, *model.input_shape), t_d[live],
                            use_logits)
        hit = _predict(xp, z) == t_d[live]
        success[live[hit]] = True
        keep = ~hit & (iterations[live] < max_iter)
        live, a, b = live[keep], a[keep], b[keep]
        if not live.size:
            break
        if variant == "pair":
            p, q, found = be.jsma_best_pair(a, b, domain[live], theta)
            chosen = (p[found], q[found])
        else:
            i, found = be.jsma_best_feature(a, b, domain[live], theta)
            chosen = (i[found],)
        live = live[found]
        for c in chosen:
            v = xp.clip(xa[live, c] + step, lo_d, hi_d)
            xa[live, c] = v
            domain[live, c] = v < hi_d if theta > 0 else v > lo_d
        iterations[live] += 1
    info = {"success": be.to_host(success),
            "l0": be.to_host(xp.count_nonzero(xa != x0, axis=1)).astype(np.int64),
            "iterations": be.to_host(iterations)}
    return be.to_host(xa).reshape(x.shape), info


def _saliency(be, net, x, t, use_logits):
    """JSMA's a = dF_t/dx and b = sum_{j != t} dF_j/dx (N, D) and the logits, in ONE batched
    backward pass with two seed rows per image instead of the full K-row Jacobian:
    a's seed is dF_t/dz, b's the sum of the others' (reference ``saliency_terms`` derives the
    same two rows from all K rows; the results agree up to the summation order).

    F = Z (logits): seeds e_t and 1 - e_t. F = softmax(Z): with s = softmax(z),
    dF_j/dz = s_j (e_j - s), so the seeds are s_t (e_t - s) and sum_{j != t} s_j (e_j - s);
    this needs the logits first (one extra forward). A one-logit model uses the two-class
    reading (0, z) and keeps the seeds' second column.
    """
    xp = be.xp
    n = len(x)
    rows = xp.arange(n)
    if use_logits:
        k = net.num_logits
        seeds = xp.zeros((n, 2, k), dtype=x.dtype)
        seeds[rows, 0, t] = 1
        seeds[:, 1, :] = 1
        seeds[rows, 1, t] = 0
        jac, z = be.jacobian(net, x, seeds)
        return jac[:, 0], jac[:, 1], z
    z = be.logits(net, x)
    z2 = xp.concatenate([xp.zeros_like(z), z], axis=1) if z.shape[1] == 1 else z
    s = xp.exp(z2 - z2.max(axis=1, keepdims=True))
    s /= s.sum(axis=1, keepdims=True)
    onehot = xp.zeros_like(s)
    onehot[rows, t] = 1
    s_t = s[rows, t][:, None]
    others = s * (1 - onehot)
    seed_a = s_t * (onehot - s)
    seed_b = others - others.sum(axis=1, keepdims=True) * s
    seeds = xp.stack([seed_a, seed_b], axis=1)
    if z.shape[1] == 1:
        seeds = seeds[:, :, 1:]
    jac, _ = be.jacobian(net, x, seeds)
    return jac[:, 0], jac[:, 1], z


# -- one-/few-pixel DE ----------------------------------------------------------------------


def pixel_attack(model, x, y, *, pixels=1, popsize=400, generations=100, F=0.5, CR=None,
                 targeted=False, target=None, seed=0, clip=(0.0, 1.0), early_stop=True,
                 backend="auto"):
    """One-/few-pixel DE on a backend; arguments and result as reference ``pixel_attack``.

    The draws of every generation come from the same per-image generators, in the same
    order, as the reference's (so the trajectories agree); ``de_step`` and ``de_score``
    (all candidates of all active images in one batched, possibly incremental, pass) run on
    the backend; the population and its fitness never leave it.
    """
    be = _backend(backend)
    x, y, (lo, hi), k, p, n_gen, F, CR, labels = _px.check_pixel_args(
        model, x, y, pixels, popsize, generations, F, CR, targeted, target, clip)

    xp = be.xp
    n, c = len(x), model.input_shape[0]
    dim, dt = k * (2 + c), x.dtype
    lower, upper = _px.candidate_bounds(model.input_shape, k, (lo, hi), dt)
    rngs = per_sample_rngs(seed, n)
    net = be.prepare(model, dt)
    xd, lab = be.to_device(x), be.to_device(labels)
    lower_d, upper_d = be.to_device(lower), be.to_device(upper)

    state = _px.new_best_state(n, dim, dt, xp)
    best, best_fit, best_pred, success = (state[k] for k in ("best", "fit", "pred", "success"))

    def evaluate(idx, cand):
        fit, pred = be.de_score(net, xd[idx], lab[idx], cand, targeted)
        hit = pred == lab[idx][:, None] if targeted else pred != lab[idx][:, None]
        return fit, pred, hit

    def track(idx, cand, fit, pred, hit):
        _px.track_best(state, idx, cand, fit, pred, hit, xp)

    pop = be.to_device(np.stack([_px.init_population(r, p, lower, upper) for r in rngs])) if n \
        else xp.zeros((0, p, dim), dtype=dt)
    all_idx = xp.arange(n)
    fit, pred, hit = evaluate(all_idx, pop)
    track(all_idx, pop, fit, pred, hit)
    gens = xp.zeros(n, dtype=np.int64)
    draws_of = _DrawAhead(rngs, p, dim, CR, n_gen,
                          ahead=xp is not np or getattr(be, "SIMULATED", False))
    for g in range(1, n_gen + 1):
        idx = xp.flatnonzero(~success) if early_stop else all_idx
        if idx.size == 0:
            break
        idx_h = be.to_host(idx)
        draws = draws_of(g, idx_h)
        trial = be.de_step(pop[idx], {kk: be.to_device(v) for kk, v in draws.items()}, F, CR,
                           lower_d, upper_d)
        t_fit, t_pred, t_hit = evaluate(idx, trial)
        keep = t_fit <= fit[idx]  # Storn & Price's greedy selection, as reference de_select
        pop[idx] = xp.where(keep[..., None], trial, pop[idx])
        fit[idx] = xp.where(keep, t_fit, fit[idx])
        track(idx, trial, t_fit, t_pred, t_hit)
        gens[idx] = g
    draws_of.close()

    best_h = be.to_host(best)
    x_adv = _px.apply_candidates(x, best_h[:, None, :])
    gens_h = be.to_host(gens)
    info = {"success": be.to_host(success), "generations": gens_h,
            "best_fitness": be.to_host(best_fit), "queries": p * (1 + gens_h),
            "pred": be.to_host(best_pred), "candidate": best_h.reshape(n, k, 2 + c)}
    return x_adv, info


class _DrawAhead:
    """Each generation's DE draws, from the same per-image generators in the same order as
    the reference; with ``ahead`` (a GPU backend) the next generation's draws are made on a
    host thread while the device scores the current one.

    Drawing ahead is exact: generation g + 1 draws for the images active at generation g, a
    superset of those that will be active then (success only removes images), and an image
    that has left is never drawn for again, so the extra draws consume nothing anyone reads.
    """

    def __init__(self, rngs, p, dim, CR, n_gen, ahead):
        self.rngs, self.p, self.dim, self.CR, self.n_gen = rngs, p, dim, CR, n_gen
        self.pool = None
        self.pending = None
        if ahead:
            from concurrent.futures import ThreadPoolExecutor
            self.pool = ThreadPoolExecutor(max_workers=1)

    def _draw(self, idx_h):
        return _px.generation_draws([self.rngs[i] for i in idx_h], self.p, self.dim, self.CR)

    def __call__(self, g, idx_h):
        if self.pending is None:
            draws = self._draw(idx_h)
        else:
            ids, fut = self.pending
            self.pending = None
            got = fut.result()
            rows = np.searchsorted(ids, idx_h)   # idx_h is a sorted subset of ids
            draws = got if len(rows) == len(ids) else {k: v[rows] for k, v in got.items()}
        if self.pool is not None and g < self.n_gen:
            self.pending = (idx_h, self.pool.submit(self._draw, idx_h))
        return draws

    def close(self):
        if self.pool is not None:
            if self.pending is not None:
                self.pending[1].result()
            self.pool.shutdown()


ATTACKS = {"fgsm": fgsm, "fgm": fgm_l2, "bim": bim, "pgd": pgd, "mifgsm": mi_fgsm,
           "deepfool": deepfool, "cw": cw_l2, "lbfgs": lbfgs_attack, "jsma": jsma,
           "pixel": pixel_attack}
