"""The linearity explanation of adversarial examples (Goodfellow, Shlens & Szegedy 2015; seed
002): FGSM on models from nearly linear to highly non-linear, and where their mistakes agree.

1. Binary logistic regression separating two digits (3 vs 7, labels 0 / 1): FGSM at each eps
   (error rate, mean confidence), and the seed's picture: the weights w, the perturbation
   sign(w) and perturbed digits. For this model the FGSM direction is exactly +-sign(w):
   d CE / dx = (sigmoid(z) - y) w, so a 3 (y = 0) moves by +eps sign(w), toward 7, and a 7 by
   -eps sign(w).
2. Multiclass models (default: ``softmax`` regression, the ``maxout`` net and the ``rbf``
   net): FGSM at each eps on the test images; error rate and the mean confidence (the
   softmax probability of the predicted class) on the misclassified.
3. Agreement: for the FGSM examples (largest eps) crafted on model a, among the examples
   that model a and model b both misclassify, the fraction where they pick the same wrong
   class: ``agreement[a][b]``. The pair value pools both crafting directions (examples
   crafted on a and on b). Goodfellow et al. report 84.6% for softmax <-> maxout and 54.3%
   for the RBF network.

Confidence is the probability the model gives its own prediction; "error" counts every test
image whose prediction after the attack differs from its label (clean mistakes included,
as the paper's error rates do).
"""

import os

import numpy as np

from ..errors import AdvkernError
from ._common import Context, load_models

NAME = "linearity"
SUMMARY = ("the linearity explanation: FGSM on logistic regression (3 vs 7), softmax, maxout "
           "and RBF networks, and the agreement of their mistakes (Goodfellow et al. 2015)")
MODELS = ("softmax", "maxout", "rbf")
EPS = (0.1, 0.25)
PAIR = (3, 7)
# quick: the first 500 test images for the multiclass models (all test 3s and 7s for the
# pair either way); full: the whole 1,000-image test split.
QUICK_N = 500

TARGET_LOGREG = 0.95      # error rate of FGSM eps 0.25 on logreg 3-vs-7 (seed: 99%)
TARGET_GAP = 0.20         # rbf's error at least this far below maxout's
TARGET_LOW_CONF = 0.5     # "low confidence": the mean below even odds


def _pct(v):
    return "n/a" if v is None or not np.isfinite(v) else f"{100 * v:.1f}%"


# -- the binary pair model ---------------------------------------------------------------


def pair_model(classes=PAIR, seed=0, progress=False):
    """Binary logistic regression (``logreg`` with num_classes=2: Flatten -> Dense 1) trained
    on the bundled train images of two digits, relabelled 0 / 1 in the order given, with the
    ``logreg`` recipe; cached like ``advkern.nets.zoo.pretrained`` (the file
    ``advkern train --arch logreg --classes 3,7`` writes). Returns the model."""
    from ..nets import build, load, save
    from ..nets import zoo
    from ..nets.architectures import RECIPES
    from ..nets.datasets import load_mnist, select_classes
    from ..nets.train import train

    classes = [int(c) for c in classes]
    if len(classes) != 2:
        raise AdvkernError(f"a binary logistic regression needs two classes, got {classes}")
    path = zoo.cache_path("logreg", seed, classes=classes)
    if path.exists():
        return load(path)
    x, y = select_classes(*load_mnist("train"), classes)
    model, _ = train(build("logreg", seed=seed, num_classes=2), x, y, seed=seed,
                     progress=progress, label=f"training logreg {classes[0]}-vs-{classes[1]}",
                     **RECIPES["logreg"])
    tmp = path.with_suffix(".tmp.npz")
    save(model, tmp)
    os.replace(tmp, path)  # atomic, as zoo.pretrained
    return model


# -- measurements ------------------------------------------------------------------------


def probabilities(model, x, batch=500):
    """Class probabilities (N, max(K, 2)) float64 from the model's logits (log-sum-exp)."""
    from ..reference.losses import softmax

    out = [softmax(model.logits(x[i:i + batch]).astype(np.float64))
           for i in range(0, len(x), batch)]
    return np.concatenate(out) if out else np.zeros((0, model.num_classes))


def fgsm_stats(model, x, y, eps, backend):
    """FGSM at eps: (x_adv, pred (N,), stats dict: error, confidence_wrong, confidence_all)."""
    from ..attacks import run_attack

    run = run_attack(model, x, y, "fgsm", eps=eps, backend=backend)
    p = probabilities(model, run.x_adv)
    pred = p.argmax(axis=1)
    wrong = pred != y
    conf = p.max(axis=1)
    return run.x_adv, pred, {
        "eps": float(eps), "error": float(wrong.mean()) if len(y) else float("nan"),
        "confidence_wrong": float(conf[wrong].mean()) if wrong.any() else None,
        "confidence_all": float(conf.mean()) if len(y) else None,
        "seconds": round(run.seconds, 3)}


def agreement(pred_a, pred_b, y):
    """(same wrong class, both wrong) counts of two models' predictions on one batch."""
    both = (pred_a != y) & (pred_b != y)
    return int(np.sum(both & (pred_a == pred_b))), int(both.sum())


def agreement_table(names, preds, y):
    """preds[a][b]: model b's predictions on the examples crafted on a.

    Returns (matrix (M, M) float with NaN on the diagonal and where no example is
    misclassified by both, counts {a: {b: [same, both]}}, pairs {"a<->b": pooled fraction})."""
    m = len(names)
    mat = np.full((m, m), np.nan)
    counts = {a: {} for a in names}
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i == j:
                continue
            same, both = agreement(preds[a][a], preds[a][b], y)
            counts[a][b] = [same, both]
            mat[i, j] = same / both if both else np.nan
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            same = counts[a][b][0] + counts[b][a][0]
            both = counts[a][b][1] + counts[b][a][1]
            pairs[f"{a}<->{b}"] = same / both if both else None
    return mat, counts, pairs


# -- figures -----------------------------------------------------------------------------


def _plt():
    from ..figures import _plt as plt
    return plt()


def logreg_figure(model, x, y, x_adv, pred_adv, p_adv, classes, eps, path, count=8):
    """The seed's picture: w, sign(w) (the perturbation that raises the score of class 1;
    negated on class-1 digits), and ``count`` perturbed digits with the model's call."""
    plt = _plt()
    w = np.asarray(model.params[-1]["w"][:, 0], dtype=np.float64).reshape(x.shape[2:])
    idx0, idx1 = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    pick = np.concatenate([idx0[:count // 2], idx1[:count - count // 2]])
    cols = 2 + len(pick)
    fig, axes = plt.subplots(1, cols, figsize=(1.6 * cols, 2.2))
    lim = float(np.abs(w).max()) or 1.0
    axes[0].imshow(w, cmap="RdBu_r", vmin=-lim, vmax=lim)
    axes[0].set_title("weights w", fontsize=8)
    axes[1].imshow(np.sign(w), cmap="gray", vmin=-1, vmax=1)
    axes[1].set_title("sign(w)", fontsize=8)
    for ax, i in zip(axes[2:], pick):
        ax.imshow(x_adv[i, 0], cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{classes[y[i]]} -> {classes[pred_adv[i]]}\n"
                     f"p={p_adv[i].max():.2f}", fontsize=8,
                     color="red" if pred_adv[i] != y[i] else "black")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"logistic regression {classes[0]} vs {classes[1]}: FGSM eps {eps}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def agreement_figure(names, mat, eps, path):
    """Heat map of agreement[a][b] (rows: the model the examples were crafted on)."""
    plt = _plt()
    m = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * m + 2.2, 1.0 * m + 1.6))
    shown = np.where(np.isnan(mat), 0.0, mat)
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=0, vmax=1)
    for i in range(m):
        for j in range(m):
            txt = "-" if np.isnan(mat[i, j]) else f"{100 * mat[i, j]:.1f}%"
            ax.text(j, i, txt, ha="center", va="center", fontsize=9,
                    color="white" if shown[i, j] < 0.6 and not np.isnan(mat[i, j])
                    else "black")
    labels = [os.path.splitext(os.path.basename(n))[0] for n in names]  # files: short names
    ax.set_xticks(range(m), labels)
    ax.set_yticks(range(m), labels)
    ax.set_xlabel("model evaluated")
    ax.set_ylabel("FGSM crafted on")
    ax.set_title(f"same wrong class when both err\n(FGSM eps {eps})", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def error_figure(per_model, path):
    """Error rate and mean confidence on the misclassified per model and eps (bars)."""
    plt = _plt()
    names = list(per_model)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    width = 0.8 / len(EPS)
    for k, eps in enumerate(EPS):
        err = [per_model[n]["fgsm"][str(eps)]["error"] for n in names]
        conf = [per_model[n]["fgsm"][str(eps)]["confidence_wrong"] or 0.0 for n in names]
        pos = np.arange(len(names)) + (k - (len(EPS) - 1) / 2) * width
        axes[0].bar(pos, err, width, label=f"eps {eps}")
        axes[1].bar(pos, conf, width, label=f"eps {eps}")
    for ax, title in zip(axes, ["FGSM error rate", "mean confidence on the misclassified"]):
        ax.set_xticks(range(len(names)), [os.path.splitext(os.path.basename(n))[0]
                                          for n in names])
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the experiment ----------------------------------------------------------------------


def run(*, models=None, out=None, backend="auto", quick=False, seed=0, log=None):
    """The linearity experiment (see the module docstring); returns the results dict."""
    from ..nets.datasets import load_mnist, select_classes

    ctx = Context(NAME, SUMMARY, out, backend, quick, seed, log)
    xte, yte = load_mnist("test")
    big = max(EPS)

    # 1. logistic regression on the pair
    ctx.stage(f"logreg {PAIR[0]}-vs-{PAIR[1]}: training on first use (cached), FGSM")
    lr_model = pair_model(PAIR, seed=ctx.seed)
    xp_, yp_ = select_classes(xte, yte, PAIR)
    logreg = {"classes": list(PAIR), "n": int(len(yp_)),
              "clean_accuracy": float(lr_model.accuracy(xp_, yp_)), "fgsm": {}}
    for eps in EPS:
        xa, pa, st = fgsm_stats(lr_model, xp_, yp_, eps, ctx.backend)
        logreg["fgsm"][str(eps)] = st
        if eps == big:
            fig_x, fig_pred = xa, pa
    st = logreg["fgsm"][str(big)]
    ctx.target(f"logreg {PAIR[0]}-vs-{PAIR[1]}: FGSM eps {big} error rate",
               f"{_pct(st['error'])} of {len(yp_)} test digits (mean confidence "
               f"{_pct(st['confidence_all'])}; on the misclassified "
               f"{_pct(st['confidence_wrong'])})",
               f">= {TARGET_LOGREG:.0%} (seed: 99%)", st["error"] >= TARGET_LOGREG,
               error=st["error"], confidence_all=st["confidence_all"],
               confidence_wrong=st["confidence_wrong"])
    path = ctx.figure("logreg_3v7")
    if path:
        logreg_figure(lr_model, xp_, yp_, fig_x, fig_pred, probabilities(lr_model, fig_x),
                      PAIR, big, path)

    # 2. the multiclass models
    nets = load_models(models, MODELS)
    n = QUICK_N if ctx.quick else len(yte)
    x, y = xte[:n], yte[:n]
    per_model, adv = {}, {}
    for name, model in nets.items():
        if model.num_classes != 10 or tuple(model.input_shape) != tuple(x.shape[1:]):
            raise AdvkernError(f"model {name!r} must classify the 10 MNIST digits "
                               f"(input {x.shape[1:]}), got {model.num_classes} classes, "
                               f"input {model.input_shape}")
        ctx.stage(f"{name}: FGSM at eps {', '.join(map(str, EPS))} on {n} test images")
        rec = {"clean_accuracy": float(model.accuracy(x, y)), "fgsm": {}}
        for eps in EPS:
            xa, _, st = fgsm_stats(model, x, y, eps, ctx.backend)
            rec["fgsm"][str(eps)] = st
            if eps == big:
                adv[name] = xa
            ctx.target(f"{name}: FGSM eps {eps}",
                       f"error {_pct(st['error'])}, mean confidence on the misclassified "
                       f"{_pct(st['confidence_wrong'])} (clean accuracy "
                       f"{_pct(rec['clean_accuracy'])})", "reported (no target)", None,
                       error=st["error"], confidence_wrong=st["confidence_wrong"])
        per_model[name] = rec
    names = list(nets)

    if "rbf" in per_model and "maxout" in per_model:
        r, m = per_model["rbf"]["fgsm"][str(big)], per_model["maxout"]["fgsm"][str(big)]
        gap = m["error"] - r["error"]
        low = r["confidence_wrong"] is None or r["confidence_wrong"] < TARGET_LOW_CONF
        ctx.target(f"rbf vs maxout: FGSM eps {big} error rate",
                   f"rbf {_pct(r['error'])} vs maxout {_pct(m['error'])} "
                   f"({100 * gap:.1f} points below); rbf's mean confidence on its mistakes "
                   f"{_pct(r['confidence_wrong'])} (maxout {_pct(m['confidence_wrong'])})",
                   f">= {100 * TARGET_GAP:.0f} points below maxout, with confidence < "
                   f"{TARGET_LOW_CONF:.0%} on its mistakes (seed: 55.4% error at 1.2% "
                   f"confidence)", gap >= TARGET_GAP and low,
                   rbf_error=r["error"], maxout_error=m["error"], gap=gap,
                   rbf_confidence_wrong=r["confidence_wrong"],
                   maxout_confidence_wrong=m["confidence_wrong"])

    # 3. agreement of the mistakes on the FGSM examples
    result = {"logreg": logreg, "models": per_model, "n_test": int(n), "eps": list(EPS)}
    if len(names) >= 2:
        ctx.stage(f"agreement of the mistakes at eps {big}")
        preds = {a: {b: probabilities(nets[b], adv[a]).argmax(axis=1) for b in names}
                 for a in names}
        mat, counts, pairs = agreement_table(names, preds, y)
        result["agreement"] = {"eps": big, "models": names,
                               "matrix": [[None if np.isnan(v) else float(v) for v in row]
                                          for row in mat],  # null: the diagonal / no mistakes
                               "counts": counts, "pairs": pairs}
        sm, sr = pairs.get("softmax<->maxout"), pairs.get("softmax<->rbf")
        if sm is not None or sr is not None:
            ok = None if sm is None or sr is None else sm > sr
            ctx.target("agreement: softmax<->maxout vs softmax<->rbf",
                       f"softmax<->maxout {_pct(sm)}, softmax<->rbf {_pct(sr)} (same wrong "
                       f"class among examples both misclassify, both crafting directions)",
                       "softmax<->maxout above softmax<->rbf (seed: 84.6% vs 54.3%)", ok,
                       softmax_maxout=sm, softmax_rbf=sr)
        path = ctx.figure("agreement")
        if path:
            agreement_figure(names, mat, big, path)
    path = ctx.figure("fgsm_errors")
    if path and per_model:
        error_figure(per_model, path)
    return ctx.finish(**result, notes=[
        "error: fraction of test images misclassified after FGSM (clean mistakes included)",
        "confidence: the probability the model gives its own prediction",
        "agreement[a][b]: examples crafted on a (FGSM, largest eps) that a and b both "
        "misclassify; fraction with the same wrong class. pairs pool both directions",
        f"logreg: binary logistic regression on the digits {PAIR[0]} (label 0) and "
        f"{PAIR[1]} (label 1)"])
