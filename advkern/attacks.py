"""The public attack API: every reference attack by name, with one parameter set and metrics.

``run_attack(model, x, y, "pgd", eps=0.3, alpha=0.01, steps=40)`` returns an
:class:`AttackRun` holding x_adv, the per-image info of the attack, the evaluation metrics
(``advkern.reference.metrics.evaluate``) and the attack's wall time. The CLI's ``attack``,
``verify``, ``sweep`` and ``demo`` commands are built on it.

Attacks (reference implementations in ``advkern.reference``):

=========  ==============================================================================
fgsm       x + eps sign(grad) (Goodfellow et al. 2015); targeted descends the target loss
fgm        L2 fast gradient x + eps g / ||g||_2
bim        L-inf PGD without random start (Kurakin et al.)
pgd        PGD in L-inf / L2 / L1 with random start and restarts (Madry et al. 2018)
mifgsm     momentum iterative FGSM (Dong et al. 2018): decay 1.0, 10 steps, alpha eps / steps
deepfool   DeepFool (Moosavi-Dezfooli et al. 2016), L2 or L-inf, overshoot 0.02, untargeted
cw         Carlini-Wagner L2 (2017): tanh box, Adam, binary search over c per image
lbfgs      Szegedy et al. (2014): box-constrained L-BFGS, search over c; targeted
jsma       Jacobian saliency map attack, pair-wise (Papernot et al. 2016); targeted
jsma1      JSMA, single-feature variant
pixel      one-/few-pixel attack by differential evolution (Su et al. 2019)
linear     the exact L-inf worst case of a binary linear model
=========  ==============================================================================
"""

import time
from dataclasses import dataclass, field

import numpy as np

from ._progress import Progress
from ._validate import check_batch, check_int, check_labels, seed_entropy
from .errors import AdvkernError
from .reference import gradient_attacks as ga
from .reference import jsma as _jsma
from .reference import linear as _linear
from .reference import metrics as _metrics
from .reference import pixel as _pixel

ATTACKS = ("fgsm", "fgm", "bim", "pgd", "mifgsm", "deepfool", "cw", "lbfgs", "jsma", "jsma1",
           "pixel", "linear")

# Defaults where a user gives none: the seeds' headline settings.
DEFAULTS = {
    "fgsm": {"eps": 0.1},
    "fgm": {"eps": 1.0},
    "bim": {"eps": 0.1},
    "pgd": {"eps": 0.3, "alpha": 0.01, "steps": 40, "norm": "inf"},
    "mifgsm": {"eps": 0.3, "steps": 10, "decay": 1.0},
    "deepfool": {"norm": "2", "overshoot": 0.02, "max_iter": 50, "candidates": 10},
    "cw": {"kappa": 0.0, "initial_const": 1.0, "search_steps": 9, "steps": 100, "lr": 0.1},
    "lbfgs": {"initial_const": 0.1, "search_steps": 5, "max_iter": 30, "target": "next"},
    "jsma": {"theta": 1.0, "gamma": 0.1, "target": "next"},
    "jsma1": {"theta": 1.0, "gamma": 0.1, "target": "next"},
    "pixel": {"pixels": 1, "popsize": 400, "generations": 100},
    "linear": {"eps": 0.2},
}

# Images per call: small enough for a progress bar, large enough that BLAS is efficient.
# Every attack's result on a slice equals its result in the whole batch (tests check it),
# so chunking changes nothing but the bar.
_CHUNK = {"pgd": 250, "bim": 250, "mifgsm": 250, "deepfool": 100, "cw": 100, "lbfgs": 100, "jsma": 100, "jsma1": 100, "pixel": 50}


@dataclass
class AttackRun:
    """The result of ``run_attack``.

    x_adv (N, ...); metrics: scalars only (n, clean / adversarial accuracy, success rates, mean
    and median of the perturbation norms l0 (features changed, a count), l1, l2, linf, and
    mean_l0_fraction / median_l0_fraction = the L0 count over the D input features); info:
    per-image (N,) arrays: the evaluation's pred, pred_adv, success (pred_adv != y, or ==
    target when targeted), l0 (int64 count), l1, l2, linf, and the attack's own records
    (e.g. JSMA's iterations, DE's generations and queries; where an attack keeps a record
    under one of the evaluation's names, its own success flag, L0 count or the prediction
    of its best candidate, it is kept as attack_success, attack_l0, attack_pred); seconds;
    params.
    """

    x_adv: np.ndarray
    info: dict
    metrics: dict
    seconds: float
    params: dict = field(default_factory=dict)


def resolve_target(target, y, num_classes):
    """'next' -> (y + 1) mod K; an int or an (N,) array as given; None stays None."""
    if isinstance(target, str):
        if target != "next":
            raise AdvkernError(f"target must be a class index, an array or 'next', got {target!r}")
        return (y + 1) % num_classes
    if target is None:
        return None
    t = np.asarray(target)
    if t.ndim == 0:
        t = np.broadcast_to(t, y.shape)
    # checked like labels: integers (or whole-number floats) in range, one per image; a
    # fractional target is an error, never truncated
    return check_labels(t, len(y), num_classes, name="target")


_COMMON = {"clip", "targeted", "target", "loss"}
ALLOWED = {
    "fgsm": _COMMON | {"eps"},
    "fgm": _COMMON | {"eps"},
    "bim": _COMMON | {"eps", "alpha", "steps", "early_stop"},
    "pgd": _COMMON | {"eps", "alpha", "steps", "norm", "random_start", "restarts",
                      "early_stop", "l1_sparsity"},
    "mifgsm": _COMMON | {"eps", "alpha", "steps", "decay"},
    "deepfool": {"clip", "norm", "overshoot", "max_iter", "candidates"},
    "cw": {"clip", "targeted", "target", "kappa", "initial_const", "search_steps", "steps",
           "lr", "abort_early"},
    "lbfgs": {"clip", "targeted", "target", "initial_const", "search_steps", "max_iter",
              "memory"},
    "jsma": {"clip", "targeted", "target", "theta", "gamma", "use_logits"},
    "jsma1": {"clip", "targeted", "target", "theta", "gamma", "use_logits"},
    "pixel": {"clip", "targeted", "target", "pixels", "popsize", "generations", "F", "CR",
              "early_stop", "batch_images"},
    "linear": {"clip", "eps"},
}


def attack_params(attack, **given):
    """The attack's parameters: DEFAULTS[attack] updated with the non-None ``given``.

    A parameter the attack does not take is an error (rather than silently ignored and then
    recorded as if it had been used).
    """
    if attack not in ATTACKS:
        raise AdvkernError(f"unknown attack {attack!r}: use one of {', '.join(ATTACKS)}")
    given = {k: v for k, v in given.items() if v is not None}
    extra = sorted(set(given) - ALLOWED[attack])
    if extra:
        raise AdvkernError(f"{attack} does not take {', '.join(extra)} "
                           f"(it takes {', '.join(sorted(ALLOWED[attack]))})")
    params = dict(DEFAULTS[attack])
    params.update(given)
    return params


def _lbfgs_kw(p):
    return {k: p[k] for k in ("initial_const", "search_steps", "max_iter", "memory") if k in p}


def _cw_kw(p):
    return {k: p[k] for k in ("kappa", "initial_const", "search_steps", "steps", "lr",
                              "abort_early") if k in p}


def _call(model, x, y, attack, p, seed, backend=None):
    """One call on a chunk; returns (x_adv, info dict).

    backend None: the reference implementation (advkern.reference); a backend name: the
    engine (advkern.engine) over that backend's primitives.
    """
    common = {"clip": p.get("clip", (0.0, 1.0))}
    if backend is not None and attack != "linear":
        return _call_engine(model, x, y, attack, p, seed, backend, common)
    tgt = {"targeted": True, "target": p["target"]} if p.get("targeted") else {}
    if attack == "fgsm":
        return ga.fgsm(model, x, y, p["eps"], loss=p.get("loss", "ce"), **tgt, **common), {}
    if attack == "fgm":
        return ga.fgm_l2(model, x, y, p["eps"], loss=p.get("loss", "ce"), **tgt, **common), {}
    if attack == "bim":
        return ga.bim(model, x, y, p["eps"], p.get("alpha"), p.get("steps"),
                      loss=p.get("loss", "ce"), early_stop=p.get("early_stop", False),
                      **tgt, **common), {}
    if attack == "pgd":
        return ga.pgd(model, x, y, p["eps"], p["alpha"], p["steps"], norm=p.get("norm", "inf"),
                      loss=p.get("loss", "ce"), random_start=p.get("random_start", False),
                      restarts=p.get("restarts", 1), early_stop=p.get("early_stop", False),
                      l1_sparsity=p.get("l1_sparsity", 0.95), seed=seed, **tgt, **common), {}
    if attack == "lbfgs":
        from .reference.lbfgs import lbfgs_attack
        return lbfgs_attack(model, x, y, p["target"], **_lbfgs_kw(p), **common)
    if attack == "cw":
        from .reference.cw import cw_l2
        return cw_l2(model, x, y, **_cw_kw(p), **tgt, **common)
    if attack == "deepfool":
        from .reference.deepfool import deepfool
        return deepfool(model, x, y, norm=p["norm"], overshoot=p["overshoot"],
                        max_iter=p["max_iter"], candidates=p["candidates"], **common)
    if attack == "mifgsm":
        return ga.mi_fgsm(model, x, y, p["eps"], p.get("alpha"), p["steps"],
                          decay=p.get("decay", 1.0), loss=p.get("loss", "ce"), **tgt,
                          **common), {}
    if attack in ("jsma", "jsma1"):
        return _jsma.jsma(model, x, y, p["target"], theta=p["theta"], gamma=p["gamma"],
                          variant="pair" if attack == "jsma" else "single",
                          use_logits=p.get("use_logits", True), **common)
    if attack == "pixel":
        return _pixel.pixel_attack(model, x, y, pixels=p["pixels"], popsize=p["popsize"],
                                   generations=p["generations"], F=p.get("F", 0.5),
                                   CR=p.get("CR"), seed=seed,
                                   early_stop=p.get("early_stop", True),
                                   batch_images=p.get("batch_images"), **tgt, **common)
    if attack == "linear":
        return _linear.linear_attack(model, x, y, p["eps"], clip=common["clip"]), {}
    raise AdvkernError(f"unknown attack {attack!r}")


def _call_engine(model, x, y, attack, p, seed, backend, common):
    from . import engine

    tgt = {"targeted": True, "target": p["target"]} if p.get("targeted") else {}
    be = {"backend": backend}
    if attack == "fgsm":
        return engine.fgsm(model, x, y, p["eps"], loss=p.get("loss", "ce"), **tgt, **common,
                           **be), {}
    if attack == "fgm":
        return engine.fgm_l2(model, x, y, p["eps"], loss=p.get("loss", "ce"), **tgt, **common,
                             **be), {}
    if attack == "bim":
        return engine.bim(model, x, y, p["eps"], p.get("alpha"), p.get("steps"),
                          loss=p.get("loss", "ce"), early_stop=p.get("early_stop", False),
                          **tgt, **common, **be), {}
    if attack == "pgd":
        return engine.pgd(model, x, y, p["eps"], p["alpha"], p["steps"],
                          norm=p.get("norm", "inf"), loss=p.get("loss", "ce"),
                          random_start=p.get("random_start", False),
                          restarts=p.get("restarts", 1), early_stop=p.get("early_stop", False),
                          l1_sparsity=p.get("l1_sparsity", 0.95), seed=seed, **tgt, **common,
                          **be), {}
    if attack == "lbfgs":
        return engine.lbfgs_attack(model, x, y, p["target"], **_lbfgs_kw(p), **common, **be)
    if attack == "cw":
        return engine.cw_l2(model, x, y, **_cw_kw(p), **tgt, **common, **be)
    if attack == "deepfool":
        return engine.deepfool(model, x, y, norm=p["norm"], overshoot=p["overshoot"],
                               max_iter=p["max_iter"], candidates=p["candidates"], **common,
                               **be)
    if attack == "mifgsm":
        return engine.mi_fgsm(model, x, y, p["eps"], p.get("alpha"), p["steps"],
                              decay=p.get("decay", 1.0), loss=p.get("loss", "ce"), **tgt,
                              **common, **be), {}
    if attack in ("jsma", "jsma1"):
        return engine.jsma(model, x, y, p["target"], theta=p["theta"], gamma=p["gamma"],
                           variant="pair" if attack == "jsma" else "single",
                           use_logits=p.get("use_logits", True), **common, **be)
    if attack == "pixel":
        if p.get("batch_images") is not None:
            raise AdvkernError("batch_images is a reference-only option")
        return engine.pixel_attack(model, x, y, pixels=p["pixels"], popsize=p["popsize"],
                                   generations=p["generations"], F=p.get("F", 0.5),
                                   CR=p.get("CR"), seed=seed,
                                   early_stop=p.get("early_stop", True), **tgt, **common, **be)
    raise AdvkernError(f"unknown attack {attack!r}")


PER_IMAGE = ("pred", "pred_adv", "success", "l0", "l1", "l2", "linf")


def _split_metrics(m, d):
    """evaluate()'s dict -> (scalar metrics with the L0 fractions, per-image arrays)."""
    per = {k: m[k] for k in PER_IMAGE}
    per["l0"] = per["l0"].astype(np.int64)
    scalars = {k: v for k, v in m.items() if k not in PER_IMAGE}
    for stat in ("mean", "median"):
        scalars[f"{stat}_l0_fraction"] = scalars[f"{stat}_l0"] / d if d else float("nan")
    return scalars, per


def metrics_from_info(info, y, d):
    """``AttackRun.metrics`` from an AttackRun's per-image ``info`` (N,) arrays and the labels
    y (N,); d: the input features per image. Equals the metrics ``run_attack`` computes from
    x and x_adv (``advkern.distributed`` summarises gathered chunks with it)."""
    m = _metrics.summarize(y, info["pred"], info["pred_adv"], info["success"],
                           {k: info[k] for k in ("l0", "l1", "l2", "linf")})
    return _split_metrics(m, d)[0]


def run_attack(model, x, y, attack, *, seed=0, progress=False, backend="auto", **params):
    """Run a reference attack by name on (x, y) and evaluate it.

    x: (N, *model.input_shape) in the box, y: (N,) labels. params: the attack's parameters
    (see DEFAULTS; e.g. eps, alpha, steps, norm, loss, random_start, restarts, early_stop,
    targeted, target (int, (N,) or 'next'), theta, gamma, pixels, popsize, generations,
    clip). JSMA is always targeted (default target 'next' = (y + 1) mod K).
    backend: 'auto' (default: ``$ADVKERN_BACKEND`` or the fastest backend here, see
    ``advkern.kernels.resolve``), 'reference' (or None) for the reference implementation
    (the specification), or a backend name ('numpy', 'numba_cpu', 'cupy', 'numba_cuda';
    ``advkern.kernels.available()``) to run the engine on it. The exact linear attack always
    runs the reference. ``run.params['backend']`` records the name that ran.
    Returns an AttackRun; the time excludes model loading and evaluation.
    """
    from . import kernels
    # an unknown or unavailable backend fails before any work
    resolved = kernels.resolve("reference" if backend is None else backend)
    backend = None if resolved == "reference" else resolved
    p = attack_params(attack, **params)
    x, y, clip = check_batch(model, x, y, p.get("clip", (0.0, 1.0)))
    p["clip"] = clip
    if attack in ("jsma", "jsma1", "lbfgs"):
        p["targeted"] = True
    target = resolve_target(p.get("target"), y, model.num_classes) if p.get("targeted") else None
    if p.get("targeted") and target is None:
        raise AdvkernError("a targeted attack needs a target (a class index, (N,) labels or "
                           "'next')")
    if not p.get("targeted"):
        if p.get("target") is not None:
            raise AdvkernError("target= needs targeted=True (an untargeted attack has no "
                               "target)")
        p.pop("target", None)
    if np.ndim(seed) == 0:
        seed = check_int(seed, "seed", minimum=0)
        seed_entropy(seed, 0)        # the range check (int64)
    else:
        seed_entropy(seed, len(x))   # a per-image seed array of the wrong length fails here
    # A fast backend takes the whole batch at once (bigger GEMMs; its own progress is cheap).
    chunk = (_CHUNK.get(attack, len(x)) if backend is None else len(x)) or 1
    n = len(x)
    outs, infos = [], []
    t0 = time.perf_counter()
    with Progress(-(-n // chunk), attack, enabled=progress) as bar:
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            pc = dict(p, target=target[a:b]) if target is not None else p
            # Per-image seeds [seed, i] keep a chunk's draws equal to the whole batch's.
            cs = np.stack([np.full(b - a, seed), np.arange(a, b)], 1) if np.ndim(seed) == 0 \
                else np.asarray(seed)[a:b]
            xa, info = _call(model, x[a:b], y[a:b], attack, pc, cs, backend)
            outs.append(xa)
            infos.append(info)
            bar.update(1)
    seconds = time.perf_counter() - t0
    x_adv = np.concatenate(outs) if outs else x.copy()
    info = {k: np.concatenate([i[k] for i in infos]) for k in (infos[0] if infos else {})}
    metrics, per_image = _split_metrics(_metrics.evaluate(model, x, y, x_adv, target=target),
                                        int(np.prod(model.input_shape)))
    for k in PER_IMAGE:
        if k in info:                     # the attack's own record, kept beside the evaluation's
            info[f"attack_{k}"] = info.pop(k)
    info.update(per_image)
    p_out = {k: v for k, v in p.items() if k != "target"}
    p_out.update(attack=attack, seed=seed if np.ndim(seed) == 0 else "per-image",
                 backend="reference" if backend is None or attack == "linear" else backend)
    return AttackRun(x_adv, info, metrics, seconds, p_out)
