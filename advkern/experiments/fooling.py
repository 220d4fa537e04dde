"""Fooling images (Nguyen, Yosinski & Clune 2015): unrecognisable inputs the classifier
assigns to a class with >= 99% confidence, from a blank or noise start, by two methods.

Gradient ascent (``gradient_ascent``) maximises, per image n with class t_n,

    J(x) = log softmax(z(x))_t - R(x),    R(x) = l2/2 ||x||^2 + tv TV2(x),
    TV2(x) = sum_{c,i,j} (x[c,i+1,j] - x[c,i,j])^2 + (x[c,i,j+1] - x[c,i,j])^2

(TV2: squared total variation, Mahendran & Vedaldi's beta = 2, smooth so its gradient is
exact), by sign steps of length alpha projected onto the box [lo, hi]. The class term's
gradient is the backend contract's ``loss_grad`` (d CE / dx, negated: descending the cross
entropy toward t is ascending log p_t); the step is the contract's ``linf_step`` with an
eps-ball as wide as the box, so it projects onto the box only. All classes and all starts
move in one batch; an image stops (is frozen) once p_t >= ``stop``.

Evolution (``evolve``) is a direct encoding: a candidate is the whole image, D = C*H*W
values in [lo, hi], initialised uniformly (Nguyen et al.'s direct encoding starts from
uniform noise too). The population evolves by the pixel attack's DE/rand/1 with binomial
crossover: the draws of ``reference.pixel.generation_draws`` (per-run generators) and the
backend's ``de_step``, then greedy selection (child replaces parent where its fitness is
<= the parent's, as ``reference.pixel.de_select``). The contract's ``de_score`` writes a
few (row, col, value) pixels into a base image and cannot score a whole-image candidate,
so the fitness -log softmax_t is computed from the backend's plain batched ``logits`` of
all runs x P candidates in one pass (log-sum-exp in float64). Deviation from Nguyen et
al.: they mutate pixels with a decaying rate and polynomial mutation; we reuse the DE
machinery the library already has (same population / selection structure).
"""

import os
import re

import numpy as np

from .._validate import check_box, check_int, check_labels, check_model, check_positive
from .._validate import per_sample_rngs
from ..errors import AdvkernError, ShapeError
from ._common import Context, load_models

NAME = "fooling"
SUMMARY = ("fooling images: >= 99% confident, unrecognisable inputs per class by gradient "
           "ascent and by evolution (Nguyen et al. 2015)")
MODELS = ("mlp", "cnn")

# quick: the demo's version (<= 60 s on two cores for both bundled models); full: more
# starts / runs and bigger budgets.
QUICK = {"starts": 4, "steps": 200, "alpha": 0.01, "l2": 0.0, "tv": 0.02, "anneal": True,
         "stop": 0.9999, "runs": 2, "popsize": 20, "generations": 300, "F": 0.5, "CR": 0.1}
FULL = {"starts": 10, "steps": 500, "alpha": 0.01, "l2": 0.0, "tv": 0.02, "anneal": True,
        "stop": 0.9999, "runs": 5, "popsize": 40, "generations": 1000, "F": 0.5, "CR": 0.1}
TARGET = 0.99


# -- the regulariser --------------------------------------------------------------------


def regularizer(x, l2=0.0, tv=0.0, xp=np):
    """R(x) = l2/2 ||x||^2 + tv TV2(x) per image and its gradient.

    x: (N, C, H, W) (or (N, D) when tv == 0) -> (values (N,) float64, grad like x in x's
    dtype). TV2 sums squared differences of vertical and horizontal neighbours per channel;
    dTV2/dx[i] = 2 (x[i] - x[i-1]) - 2 (x[i+1] - x[i]) along each axis (edges: one term).
    xp: the array module of x (numpy, or a GPU backend's).
    """
    n = x.shape[0]
    val = xp.zeros(n, dtype=np.float64)
    grad = xp.zeros(x.shape, dtype=np.float64)
    x64 = x.astype(np.float64)
    if l2:
        val = val + 0.5 * l2 * (x64 * x64).reshape(n, -1).sum(axis=1)
        grad = grad + l2 * x64
    if tv:
        if x.ndim != 4:
            raise ShapeError(f"tv needs images (N, C, H, W), got shape {tuple(x.shape)}")
        dv = x64[:, :, 1:, :] - x64[:, :, :-1, :]
        dh = x64[:, :, :, 1:] - x64[:, :, :, :-1]
        val = val + tv * ((dv * dv).reshape(n, -1).sum(axis=1)
                          + (dh * dh).reshape(n, -1).sum(axis=1))
        g = xp.zeros(x.shape, dtype=np.float64)
        g[:, :, 1:, :] += 2 * dv
        g[:, :, :-1, :] -= 2 * dv
        g[:, :, :, 1:] += 2 * dh
        g[:, :, :, :-1] -= 2 * dh
        grad = grad + tv * g
    return val, grad.astype(x.dtype)


# -- gradient ascent --------------------------------------------------------------------


def _check_common(model, classes, n, stop, clip):
    check_model(model)
    if model.num_classes < 2 or model.shapes[-1][0] < 2:
        raise AdvkernError("fooling images need a model with K >= 2 logits")
    t = check_labels(classes, n, model.num_classes, name="classes")
    stop = check_positive(stop, "stop")
    if stop > 1:
        raise AdvkernError(f"stop must be a confidence in (0, 1], got {stop}")
    return t, stop, check_box(clip)


def _confidence(xp, z, t):
    """softmax(z)_t (N,) in float64 by log-sum-exp."""
    z = z.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + xp.log(xp.exp(z - m).sum(axis=1))
    return xp.exp(z[xp.arange(len(z)), t] - lse)


def gradient_ascent(model, classes, x_start, *, steps=200, alpha=0.01, l2=0.0, tv=0.0,
                    anneal=False, stop=0.9999, clip=(0.0, 1.0), backend="auto"):
    """Images that ``model`` assigns to ``classes`` by projected sign-gradient ascent on
    log softmax_t - R (see the module docstring).

    model: Sequential with K >= 2 logits; classes: (N,) ints t_n; x_start: (N, *input_shape)
    float32/float64 in [lo, hi] (blank, noise, ...; never modified); steps >= 0; alpha > 0
    the per-step L-inf step; l2, tv >= 0 the regulariser weights; anneal: decay the weights
    linearly from their value at step 0 to 0 at the last step (a fixed weight stalls the
    sign steps at an equilibrium below a high ``stop``); stop in (0, 1]: an image
    is frozen once softmax_t >= stop; backend: 'auto', 'reference' or a backend name.

    Returns (x (N, *input_shape) in x_start's dtype, info) with info 'confidence' (N,)
    float64 softmax_t of x, 'steps' (N,) int64 steps taken, 'history' (S + 1, N) float64
    log softmax_t before each of the S steps run (S < steps when every image stopped
    early) and at the end.
    """
    from ..engine import _backend

    x_start = check_model(model).check_input(x_start, "x_start")
    t, stop, (lo, hi) = _check_common(model, classes, len(x_start), stop, clip)
    if x_start.size and (x_start.min() < lo or x_start.max() > hi):
        raise AdvkernError(f"x_start outside the box [{lo}, {hi}]")
    steps = check_int(steps, "steps", minimum=0)
    alpha = check_positive(alpha, "alpha")
    l2 = check_positive(l2, "l2", allow_zero=True)
    tv = check_positive(tv, "tv", allow_zero=True)
    be = _backend(backend)
    xp, dt, n = be.xp, x_start.dtype, len(x_start)
    if n == 0:
        return x_start.copy(), {"confidence": np.zeros(0), "steps": np.zeros(0, np.int64),
                                "history": np.zeros((1, 0))}
    net = be.prepare(model, dt)
    xa = be.to_device(x_start)
    x0 = xa
    lab = be.to_device(t)
    # eps = the box's width: the L-inf ball around x0 then holds the whole box, so the
    # step's projection is the box clip alone.
    eps_d = be.to_device(np.full(n, hi - lo, dtype=dt))
    alpha_d = be.to_device(np.full(n, alpha, dtype=dt))
    taken = xp.zeros(n, dtype=np.int64)
    history = []
    for s in range(steps):
        ce, g, _ = be.loss_grad(net, xa, lab, "ce")
        active = xp.exp(-ce.astype(np.float64)) < stop
        if not bool(active.any()):
            break
        history.append(-ce.astype(np.float64))
        d = -g   # ascent direction of log p_t (descent of the cross entropy)
        w = 1.0 - s / steps if anneal else 1.0
        if (l2 or tv) and w > 0:
            d = d - regularizer(xa, w * l2, w * tv, xp)[1]
        xa = be.linf_step(xa, d.astype(dt), x0, eps_d, alpha_d, lo, hi, active)
        taken += active
    z = be.logits(net, xa)
    conf = _confidence(xp, z, lab)
    history.append(xp.log(conf))
    info = {"confidence": be.to_host(conf), "steps": be.to_host(taken),
            "history": np.stack([be.to_host(h) for h in history])}
    return be.to_host(xa), info


# -- evolution --------------------------------------------------------------------------


def evolve(model, classes, *, popsize=20, generations=300, F=0.5, CR=0.1, stop=0.9999,
           seed=0, clip=(0.0, 1.0), dtype=np.float32, backend="auto"):
    """Fooling images by a direct encoding evolved with DE/rand/1/bin (module docstring).

    classes: (N,) ints, one evolutionary run per entry (run n evolves images of class t_n
    from its own generator ``per_sample_rngs(seed, N)[n]``); popsize P >= 4; generations
    >= 0; F in (0, 2]; CR in [0, 1]; stop: a run ends when its best member reaches
    softmax_t >= stop.

    Returns (x (N, *input_shape) in dtype: each run's best member, info) with info
    'confidence' (N,) float64 softmax_t of the best member, 'population_median' (N,) the
    median softmax_t over the final population, 'generations' (N,) int64 run,
    'queries' (N,) int64 model evaluations P (1 + generations).
    """
    from ..engine import _backend
    from ..reference import pixel as _px

    check_model(model)
    shape = tuple(model.input_shape)
    dim = int(np.prod(shape))
    n = len(np.atleast_1d(np.asarray(classes)))
    t, stop, (lo, hi) = _check_common(model, classes, n, stop, clip)
    p = check_int(popsize, "popsize", minimum=4)
    n_gen = check_int(generations, "generations", minimum=0)
    F = check_positive(F, "F")
    if F > 2:
        raise AdvkernError(f"F must be in (0, 2], got {F}")
    CR = check_positive(CR, "CR", allow_zero=True)
    if CR > 1:
        raise AdvkernError(f"CR must be in [0, 1], got {CR}")
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise AdvkernError(f"dtype must be float32 or float64, got {dt}")
    be = _backend(backend)
    xp = be.xp
    rngs = per_sample_rngs(seed, n)
    lower, upper = np.full(dim, lo, dtype=dt), np.full(dim, hi, dtype=dt)
    net = be.prepare(model, dt)
    lab = be.to_device(t)
    lower_d, upper_d = be.to_device(lower), be.to_device(upper)

    def score(idx, cand):
        # fitness -log softmax_t (minimised) of cand (len(idx), P, D): one batched forward
        m = len(idx)
        z = be.logits(net, cand.reshape((m * p,) + shape)).astype(np.float64)
        mx = z.max(axis=1, keepdims=True)
        lse = mx[:, 0] + xp.log(xp.exp(z - mx).sum(axis=1))
        return (lse - z[xp.arange(m * p), xp.repeat(lab[idx], p)]).reshape(m, p)

    if n == 0:
        return np.zeros((0,) + shape, dt), {
            "confidence": np.zeros(0), "population_median": np.zeros(0),
            "generations": np.zeros(0, np.int64), "queries": np.zeros(0, np.int64)}
    pop = be.to_device(np.stack([_px.init_population(r, p, lower, upper) for r in rngs]))
    all_idx = xp.arange(n)
    fit = score(all_idx, pop)
    gens = xp.zeros(n, dtype=np.int64)
    # -log stop: a run is done once its best fitness is at or below it
    done_fit = -np.log(stop)
    for g in range(1, n_gen + 1):
        idx = xp.flatnonzero(fit.min(axis=1) > done_fit)
        if idx.size == 0:
            break
        draws = _px.generation_draws([rngs[i] for i in be.to_host(idx)], p, dim, CR)
        trial = be.de_step(pop[idx], {k: be.to_device(v) for k, v in draws.items()}, F, CR,
                           lower_d, upper_d)
        t_fit = score(idx, trial)
        keep = t_fit <= fit[idx]
        pop[idx] = xp.where(keep[..., None], trial, pop[idx])
        fit[idx] = xp.where(keep, t_fit, fit[idx])
        gens[idx] = g
    j = fit.argmin(axis=1)
    best = pop[all_idx, j]
    gens_h = be.to_host(gens)
    info = {"confidence": np.exp(-be.to_host(fit[all_idx, j])),
            "population_median": np.median(np.exp(-be.to_host(fit)), axis=1),
            "generations": gens_h, "queries": p * (1 + gens_h)}
    return be.to_host(best).reshape((n,) + shape), info


# -- the experiment ---------------------------------------------------------------------


def _starts(model, classes, starts, seed, dtype=np.float32):
    """Start images: per class, one blank (all lo = 0) start, then starts - 1 uniform
    noise starts U(0, 1) from default_rng(seed). Returns (x (classes * starts, ...),
    labels, start index)."""
    shape = tuple(model.input_shape)
    k = len(classes)
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.zeros((k,) + shape),
                        rng.random(((starts - 1) * k,) + shape)]).astype(dtype)
    return x, np.tile(classes, starts), np.repeat(np.arange(starts), k)


def _per_class(conf, labels, classes):
    """Per class: median, min and max over its runs."""
    return {int(c): {"median": float(np.median(conf[labels == c])),
                     "min": float(conf[labels == c].min()),
                     "max": float(conf[labels == c].max())} for c in classes}


def _pick(conf, labels, classes):
    """Per class, the index of the run whose confidence is the (lower) median."""
    out = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        out.append(idx[np.argsort(conf[idx], kind="stable")[(len(idx) - 1) // 2]])
    return np.array(out)


def _label(name):
    """A model name or file as a safe file-name part ('models/my net.npz' -> 'my_net')."""
    base = os.path.splitext(os.path.basename(str(name)))[0] or "model"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", base)


def _pct(c):
    # floor to 0.01 %: 99.996 % shows as 99.99 %, never rounds up to 100 %
    return f"{np.floor(c * 1e4) / 100:.2f}%"


def fooling_grid(rows, row_labels, classes, title, path):
    """Save a len(rows) x len(classes) grid: rows[r] = (images (K, C, H, W), conf (K,)).
    Returns path."""
    from ..figures import _image, _plt

    plt = _plt()
    k = len(classes)
    fig, axes = plt.subplots(len(rows), k, figsize=(1.2 * k + 1.2, 1.5 * len(rows) + 0.6),
                             squeeze=False)
    for r, (imgs, conf) in enumerate(rows):
        for i in range(k):
            a = axes[r, i]
            a.imshow(_image(imgs[i]), cmap="gray", vmin=0, vmax=1)
            a.set_title(f"{classes[i]}: {_pct(conf[i])}", fontsize=7)
            a.set_xticks([])
            a.set_yticks([])
        axes[r, 0].set_ylabel(row_labels[r], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def run(*, models=None, out=None, backend="auto", quick=False, seed=0, log=None):
    """The fooling experiment (see the module docstring); returns the results dict."""
    ctx = Context(NAME, SUMMARY, out, backend, quick, seed, log)
    nets = load_models(models, MODELS)
    cfg = dict(QUICK if ctx.quick else FULL)
    per_model = {}
    for name, model in nets.items():
        classes = np.arange(model.num_classes)
        ctx.stage(f"{name}: gradient ascent ({cfg['starts']} starts x {len(classes)} classes)")
        x0, lab, _ = _starts(model, classes, cfg["starts"], ctx.seed)
        xg, ig = gradient_ascent(model, lab, x0, steps=cfg["steps"], alpha=cfg["alpha"],
                                 l2=cfg["l2"], tv=cfg["tv"], anneal=cfg["anneal"],
                                 stop=cfg["stop"],
                                 backend=ctx.backend)
        ctx.stage(f"{name}: evolution ({cfg['runs']} runs x {len(classes)} classes, "
                  f"P={cfg['popsize']})")
        lab_e = np.tile(classes, cfg["runs"])
        xe, ie = evolve(model, lab_e, popsize=cfg["popsize"], generations=cfg["generations"],
                        F=cfg["F"], CR=cfg["CR"], stop=cfg["stop"], seed=ctx.seed,
                        backend=ctx.backend)
        ga, ev = _per_class(ig["confidence"], lab, classes), \
            _per_class(ie["confidence"], lab_e, classes)
        ga_med = np.array([ga[int(c)]["median"] for c in classes])
        ev_med = np.array([ev[int(c)]["median"] for c in classes])
        ctx.target(f"{name} gradient ascent: per-class median confidence",
                   f"min over classes {_pct(ga_med.min())} (median of "
                   f"{cfg['starts']} starts each)",
                   f">= {TARGET:.0%} for all {len(classes)} classes",
                   bool((ga_med >= TARGET).all()), per_class_median=ga_med)
        ctx.target(f"{name} evolution: per-class median confidence",
                   f"min over classes {_pct(ev_med.min())} (median of {cfg['runs']} runs "
                   f"each)", "reported (no target)", None, per_class_median=ev_med)
        gi, ei = _pick(ig["confidence"], lab, classes), _pick(ie["confidence"], lab_e, classes)
        path = ctx.figure(f"fooling_{_label(name)}")
        if path:
            fooling_grid([(xg[gi], ig["confidence"][gi]), (xe[ei], ie["confidence"][ei])],
                         ["gradient ascent", "evolution (DE)"], list(classes),
                         f"fooling images, {name} (median-confidence run per class)", path)
        per_model[name] = {
            "gradient_ascent": {"per_class": ga, "steps_median": float(np.median(ig["steps"])),
                                "steps_max": int(ig["steps"].max()),
                                "tv2_median": float(np.median(regularizer(xg, tv=1.0)[0]))},
            "evolution": {"per_class": ev,
                          "population_median": _per_class(ie["population_median"], lab_e,
                                                          classes),
                          "generations_median": float(np.median(ie["generations"])),
                          "queries_max": int(ie["queries"].max()),
                          "tv2_median": float(np.median(regularizer(xe, tv=1.0)[0]))},
        }
        ctx.stage(f"{name}: done")
    return ctx.finish(config=cfg, target_confidence=TARGET, models=per_model,
                      notes=["gradient ascent: blank start + uniform-noise starts, sign steps "
                             "on log p_t - w_s tv TV2(x) (w_s annealed 1 -> 0 when anneal), "
                             "box-projected; an image is frozen at p_t >= stop",
                             "tv2_median: the median squared total variation of the images "
                             "(smoothness; lower is smoother)",
                             "evolution: whole-image direct encoding, DE/rand/1/bin via the "
                             "backend's de_step; fitness from plain batched logits (de_score "
                             "scores few-pixel candidates only)"])
