"""Validation of a backend against the reference, run before anything is timed.

Every check returns a dict {"check", "ok", "detail"}; a backend is timed only when all of its
checks pass. Tolerances (float32 against the ``numpy`` backend, the reference, on the same
float32 inputs) follow the project's rules:

- exact: the fused L-inf step (clip / projection / sign are exact operations), the engine
  on the ``numpy`` backend against ``advkern.reference`` (the same code, bit for bit);
- reductions (logits, losses, input gradients, Jacobians, DE fitness):
  |got - ref| <= TOL * scale with TOL = 64 * sqrt(L) * eps (L = the model's longest GEMM
  reduction, eps = float32 machine epsilon; about 2e-4 for the mlp, 4e-4 for the cnn) and
  scale = max(1, max |ref| over the row) -- a summation-order difference is ~ sqrt(L) * eps,
  a wrong index or factor is O(1). Gradients must meet it on >= 99.5% of their entries: a
  ReLU whose pre-activation is within rounding of 0 may switch between float orders and
  move the entries it feeds (a discontinuity, where only near-agreement is meaningful);
- PGD: step by step from the reference's iterates (so differences cannot compound), the
  backend's next iterate may differ only where the gradient's sign is a tie at float32
  precision (within 4x the float32 reference's own error, measured against float64, or
  |g| <= 1e-4 max|g| as ``advkern verify``); the whole engine run, whose float32
  trajectory drifts once a tie flips a step, must be as strong as the reference's (mean
  loss, misclassifications) and stay in the ball and the box;
- JSMA search: the same (p, q) as the reference, or an admissible pair whose saliency is
  within TOL of the best (a tie); the attack: >= 75% of images identical and every other
  image a valid result (success means the target is predicted; L0 within the budget);
- DE: fitness and predictions of the same candidates as above; the attack follows the same
  draws, so the best candidates agree on >= 75% of images, with close fitness.
"""

import numpy as np

from advkern import engine
from advkern.kernels import numpy_backend as ref
from advkern.reference import gradient_attacks as ga
from advkern.reference import jsma as rj
from advkern.reference import pixel as rp

F32 = np.float32


def tolerance(model, dtype=F32):
    """64 * sqrt(L) * eps, L the longest reduction of the model's GEMMs (forward or dx)."""
    longest = 1
    for i, layer in enumerate(model.layers):
        src, dst = model.shapes[i], model.shapes[i + 1]
        if layer.type == "dense":
            longest = max(longest, src[0], dst[0])
        elif layer.type == "conv2d":
            kk = layer.kernel[0] * layer.kernel[1]
            longest = max(longest, src[0] * kk, dst[0] * kk)
    return 64.0 * np.sqrt(longest) * float(np.finfo(dtype).eps)


def _check(name, ok, detail):
    return {"check": name, "ok": bool(ok), "detail": detail}


def _rows(a):
    return np.asarray(a, dtype=np.float64).reshape(len(a), -1)


def _close(name, got, want, tol, min_frac=1.0):
    """Rows of got within tol * max(1, max|want row|) of want, on >= min_frac of entries."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape or got.dtype != want.dtype:
        return _check(name, False, f"shape/dtype {got.shape} {got.dtype}, want "
                                   f"{want.shape} {want.dtype}")
    g, w = _rows(got), _rows(want)
    scale = np.maximum(1.0, np.abs(w).max(axis=1, initial=0.0))[:, None]
    err = np.abs(g - w) / scale
    if not np.isfinite(g).all():
        return _check(name, False, "non-finite values")
    frac = float(np.mean(err <= tol)) if err.size else 1.0
    return _check(name, frac >= min_frac,
                  f"max scaled error {err.max(initial=0):.2e} (tol {tol:.1e}), "
                  f"{100 * frac:.2f}% within")


def _exact(name, got, want):
    got, want = np.asarray(got), np.asarray(want)
    same = got.shape == want.shape and got.dtype == want.dtype and np.array_equal(got, want)
    n_diff = int(np.sum(got != want)) if got.shape == want.shape else -1
    return _check(name, same, "identical" if same else f"{n_diff} entries differ "
                  f"(shape {got.shape} {got.dtype}, want {want.shape} {want.dtype})")


def _host(be, out):
    return tuple(be.to_host(o) for o in out) if isinstance(out, tuple) else be.to_host(out)


# -- primitives ------------------------------------------------------------------------------


def check_primitives(be, model, tag, x, y, sizes):
    """The contract's primitives of ``be`` against the numpy backend, on float32 (x, y)."""
    tol = tolerance(model)
    out = []
    n, k = len(x), model.num_logits
    net_r, net_b = ref.prepare(model, F32), be.prepare(model, F32)
    d = be.to_device

    values, dx, z = ref.loss_grad(net_r, x, y, "ce")
    gv, gdx, gz = _host(be, be.loss_grad(net_b, d(x), d(y), "ce"))
    out += [_close(f"{tag} loss_grad logits", gz, z, tol),
            _close(f"{tag} loss_grad values", gv[:, None], values[:, None], tol),
            _close(f"{tag} loss_grad dx", gdx, dx, tol, min_frac=0.995)]

    jac, zj = ref.jacobian(net_r, x)
    gjac, gzj = _host(be, be.jacobian(net_b, d(x)))
    rows = (lambda j: j.reshape(n * k, -1)) if gjac.shape == jac.shape else (lambda j: j)
    out += [_close(f"{tag} jacobian", rows(gjac), rows(jac), tol, min_frac=0.995),
            _close(f"{tag} jacobian logits", gzj, zj, tol)]

    # L-inf step from a point inside the ball, with one eps = 0 and one frozen image.
    rng = np.random.default_rng(0)
    x0 = x.reshape(n, -1)
    xa = np.clip(x0 + rng.uniform(-0.1, 0.1, x0.shape).astype(F32), 0, 1).astype(F32)
    g = dx.reshape(n, -1)
    eps = np.full(n, 0.3, F32)
    eps[0] = 0
    alpha = np.full(n, 0.05, F32)
    active = np.ones(n, bool)
    active[-1] = False
    want = ref.linf_step(xa, g, x0, eps, alpha, 0.0, 1.0, active)
    got = be.to_host(be.linf_step(d(xa), d(g), d(x0), d(eps), d(alpha), 0.0, 1.0, d(active)))
    out.append(_exact(f"{tag} linf_step", got, want))

    # JSMA pair search on the real saliency terms, increase (x < 1) and decrease (x > 0).
    t = (y + 1) % model.num_classes
    a, b = rj.saliency_terms(jac, zj, t, True)
    for theta, domain in ((1.0, x0 < 1), (-1.0, x0 > 0)):
        p, q, found = ref.jsma_best_pair(a, b, domain, theta)
        gp, gq, gf = _host(be, be.jsma_best_pair(d(a), d(b), d(domain), theta))
        out.append(_pairs_ok(f"{tag} jsma_best_pair theta={theta:+g}", a, b, domain, theta,
                             (p, q, found), (gp, gq, gf), tol))

    # DE scoring of random one-pixel candidates, untargeted and targeted.
    popsize = sizes["val_popsize"]
    lower, upper = rp.candidate_bounds(model.input_shape, 1, (0.0, 1.0), F32)
    pop = np.stack([rp.init_population(r, popsize, lower, upper)
                    for r in (np.random.default_rng([1, i]) for i in range(n))])
    for targeted, lab in ((False, y), (True, t)):
        fit, pred = ref.de_score(net_r, x, lab, pop, targeted)
        gfit, gpred = _host(be, be.de_score(net_b, d(x), d(lab), d(pop), targeted))
        name = f"{tag} de_score {'targeted' if targeted else 'untargeted'}"
        out.append(_close(name + " fitness", gfit, fit, tol))
        if gpred.shape != pred.shape:
            out.append(_check(name + " pred", False, f"shape {gpred.shape}, want {pred.shape}"))
        else:
            frac = float(np.mean(gpred == pred))
            out.append(_check(name + " pred", frac >= 0.995, f"{100 * frac:.2f}% equal"))
    return out


def _pair_score(a, b, p, q):
    return -(float(a[p]) + float(a[q])) * (float(b[p]) + float(b[q]))


def _pairs_ok(name, a, b, domain, theta, want, got, tol):
    p, q, found = want
    gp, gq, gf = (np.asarray(v) for v in got)
    if gp.shape != p.shape or not np.array_equal(gf, found):
        return _check(name, False, f"found differs on {int(np.sum(gf != found))} image(s)")
    ties = 0
    for i in np.flatnonzero(found & ((gp != p) | (gq != q))):
        i_p, i_q = int(gp[i]), int(gq[i])
        al, be_ = float(a[i, i_p]) + float(a[i, i_q]), float(b[i, i_p]) + float(b[i, i_q])
        admissible = (0 <= i_p < i_q and domain[i, i_p] and domain[i, i_q]
                      and ((al > 0 > be_) if theta > 0 else (al < 0 < be_)))
        best = _pair_score(a[i], b[i], p[i], q[i])
        if not admissible or _pair_score(a[i], b[i], i_p, i_q) < best - tol * max(1, abs(best)):
            return _check(name, False, f"image {i}: pair ({i_p}, {i_q}) vs reference "
                                       f"({p[i]}, {q[i]}) is not a tie")
        ties += 1
    return _check(name, True, f"{len(p)} images, same pairs" + (f" ({ties} ties)" if ties else ""))


# -- PGD -------------------------------------------------------------------------------------

TIE_RTOL = 1e-4  # |g| <= TIE_RTOL * max|g| of the image: a gradient-sign tie (as advkern verify)


def pgd_lockstep(be, model, tag, x, y, steps, eps=0.3, alpha=0.01):
    """PGD steps of the backend (loss_grad, then linf_step) from the reference's iterates.

    Step s starts both from the reference's x_s, so differences cannot compound: the
    backend's x_{s+1} may differ from the reference's only where the sign of the gradient is
    a tie at float32 precision: |g64| <= 4 * err + TIE_RTOL * max|g64| (per image; g64 the
    float64 gradient, err the largest error of the float32 reference's gradient on that
    image -- a confidently classified image has p_y within rounding of 1 and a gradient made
    of rounding, whose signs float32 cannot decide). At most 0.01% of the features may
    differ elsewhere (a ReLU within rounding of 0 switching).
    """
    n = len(x)
    d = be.to_device
    net_r, net_b = ref.prepare(model, F32), be.prepare(model, F32)
    net64 = ref.prepare(model, np.float64)
    e, a = np.full(n, eps, F32), np.full(n, alpha, F32)
    active = np.ones(n, bool)
    xa, differ, bad = x.copy(), 0, 0

    def per_image_max(v):
        return np.abs(v).reshape(n, -1).max(axis=1).reshape((n,) + (1,) * (v.ndim - 1))

    for _ in range(steps):
        _, g, _ = ref.loss_grad(net_r, xa, y, "ce")
        _, g64, _ = ref.loss_grad(net64, xa.astype(np.float64), y, "ce")
        want = ref.linf_step(xa, g, x, e, a, 0.0, 1.0, active)
        _, gb, _ = be.loss_grad(net_b, d(xa), d(y), "ce")
        got = be.to_host(be.linf_step(d(xa), gb, d(x), d(e), d(a), 0.0, 1.0, d(active)))
        if got.shape != want.shape or got.dtype != want.dtype:
            return _check(f"{tag} pgd steps", False, f"shape/dtype {got.shape} {got.dtype}")
        tie = np.abs(g64) <= 4 * per_image_max(g - g64) + TIE_RTOL * per_image_max(g64)
        diff = got != want
        differ += int(diff.sum())
        bad += int(np.sum(diff & ~tie))
        xa = want
    total = steps * x.size
    return _check(f"{tag} pgd steps", bad <= 1e-4 * total,
                  f"{steps} steps from the reference iterates: {differ} of {total} features "
                  f"differ, {bad} of them not at a gradient-sign tie")


def pgd_strength(model, tag, x, y, got, want):
    """The backend's whole PGD run is as strong as the reference's.

    Over many float32 steps, sign ties flip a few steps and the trajectories drift apart
    (the step-by-step check above is the strict one), so the attack result is compared by
    what it achieves: mean cross-entropy >= 99% of the reference's, and the number of
    misclassified images within max(1, 10%) of it.
    """
    if got.shape != want.shape or got.dtype != want.dtype:
        return _check(f"{tag} pgd", False, f"shape/dtype {got.shape} {got.dtype}")
    net = ref.prepare(model, F32)
    loss_got = float(ref.loss_grad(net, got, y, "ce")[0].mean())
    loss_want = float(ref.loss_grad(net, want, y, "ce")[0].mean())
    ok_got, ok_want = int(np.sum(model.predict(got) != y)), int(np.sum(model.predict(want) != y))
    agree = float(np.mean(np.isclose(got, want, rtol=0, atol=1e-6)))
    strong = (loss_got >= 0.99 * loss_want and abs(ok_got - ok_want) <= max(1, 0.1 * len(y))
              and got.min() >= 0 and got.max() <= 1
              and np.abs(got - x).max() <= 0.3 + 1e-6)
    return _check(f"{tag} pgd", strong,
                  f"mean loss {loss_got:.4g} vs {loss_want:.4g}, misclassified {ok_got} vs "
                  f"{ok_want}, {100 * agree:.2f}% of features equal")


# -- attacks -----------------------------------------------------------------------------------


class RefAttacks:
    """The engine on the numpy backend, run once per (attack, model) and shared by backends."""

    def __init__(self, sizes):
        self.sizes = sizes
        self.cache = {}

    def run(self, attack, model, tag, x, y, backend="numpy"):
        """(x_adv, info) of ``attack`` on (x, y); the numpy backend's results are cached."""
        if backend == "numpy" and (attack, tag) in self.cache:
            return self.cache[attack, tag]
        s = self.sizes
        if attack == "pgd":
            out = engine.pgd(model, x, y, 0.3, 0.01, s["val_pgd_steps"], backend=backend), {}
        elif attack == "jsma":
            out = engine.jsma(model, x, y, "next", theta=1.0, gamma=s["val_jsma_gamma"],
                              backend=backend)
        else:
            out = engine.pixel_attack(model, x, y, popsize=s["val_popsize"],
                                      generations=s["val_generations"], seed=0, backend=backend)
        if backend == "numpy":
            self.cache[attack, tag] = out
        return out


def check_engine_numpy(model, tag, x, y, refs):
    """The engine on the numpy backend reproduces advkern.reference bit for bit (float32)."""
    s = refs.sizes
    out = []
    got, _ = refs.run("pgd", model, tag, x, y)
    out.append(_exact(f"{tag} pgd = reference", got,
                      ga.pgd(model, x, y, 0.3, 0.01, s["val_pgd_steps"])))
    got, gi = refs.run("jsma", model, tag, x, y)
    want, wi = rj.jsma(model, x, y, "next", theta=1.0, gamma=s["val_jsma_gamma"])
    out.append(_exact(f"{tag} jsma = reference", got, want))
    out.append(_exact(f"{tag} jsma iterations = reference", gi["iterations"], wi["iterations"]))
    got, gi = refs.run("pixel", model, tag, x, y)
    want, wi = rp.pixel_attack(model, x, y, popsize=s["val_popsize"],
                               generations=s["val_generations"], seed=0)
    out.append(_exact(f"{tag} pixel = reference", got, want))
    out.append(_exact(f"{tag} pixel best_fitness = reference", gi["best_fitness"],
                      wi["best_fitness"]))
    return out


def check_attacks(name, be, model, tag, x, y, refs):
    """Each attack through the engine on backend ``name`` against the numpy backend."""
    tol = tolerance(model)
    out = []
    out.append(pgd_lockstep(be, model, tag, x, y, refs.sizes["val_pgd_steps"]))
    want, _ = refs.run("pgd", model, tag, x, y)
    got, _ = refs.run("pgd", model, tag, x, y, backend=name)
    out.append(pgd_strength(model, tag, x, y, got, want))

    want, wi = refs.run("jsma", model, tag, x, y)
    got, gi = refs.run("jsma", model, tag, x, y, backend=name)
    same = np.array([np.array_equal(g, w) for g, w in zip(got, want)])
    t = (y + 1) % model.num_classes
    budget = rj.max_iterations(int(np.prod(model.input_shape)), refs.sizes["val_jsma_gamma"]) * 2
    pred = model.predict(got)
    valid = ((~gi["success"] | (pred == t)) & (gi["l0"] <= budget)
             & (got.min(axis=(1, 2, 3)) >= 0) & (got.max(axis=(1, 2, 3)) <= 1))
    out.append(_check(f"{tag} jsma", same.mean() >= 0.75 and valid.all(),
                      f"{int(same.sum())}/{len(same)} images identical, "
                      f"{int(valid.sum())}/{len(valid)} valid"))

    want, wi = refs.run("pixel", model, tag, x, y)
    got, gi = refs.run("pixel", model, tag, x, y, backend=name)
    same = np.array([np.array_equal(g, w) for g, w in zip(gi["candidate"], wi["candidate"])])
    fit_ok = np.abs(gi["best_fitness"] - wi["best_fitness"]) <= \
        tol * np.maximum(1, np.abs(wi["best_fitness"]))
    out.append(_check(f"{tag} pixel", same.mean() >= 0.75 and fit_ok[same].all(),
                      f"{int(same.sum())}/{len(same)} best candidates identical, fitness "
                      f"within tolerance on {int(fit_ok[same].sum())} of them"))
    return out
