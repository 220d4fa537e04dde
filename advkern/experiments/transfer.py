"""Cross-technique transferability (Papernot, McDaniel & Goodfellow 2016, "Transferability in
machine learning"): adversarial examples crafted on one model, classified by others.

Sources (white-box, attacked with FGSM at L-inf ``eps``, and with PGD in the full version):
the given networks (default mlp and cnn) and multiclass softmax regression (the bundled
``softmax`` architecture where it exists, else ``logreg``, which with 10 classes is the same
Flatten -> Dense 10 model). Targets: the same three, a hand-written k-NN
(``reference.knn.KNN``, k = 3, on the bundled 4,000 training images) and, when
scikit-learn is importable, a decision tree (``DecisionTreeClassifier(random_state=seed)``,
grown to purity) and an RBF-kernel SVM (``SVC()``: C = 1, gamma = 'scale'), both fitted on
the same 4,000 training images (flattened pixels); without scikit-learn they are skipped
and results.json says so under ``skipped``.

The matrix M[attack][source][target] is the accuracy of ``target`` on the adversarials
crafted on ``source`` from the first ``n`` test images (all n, correctly classified by the
source or not, so every cell has the same denominator); ``clean[target]`` is the target's
accuracy on the same n clean images, the reference row. The diagonal is white-box accuracy.
Lower means the examples transfer better.
"""

import numpy as np

from ..errors import AdvkernError
from ._common import Context, load_models

NAME = "transfer"
SUMMARY = ("transferability matrix: accuracy of mlp / cnn / softmax regression / k-NN / "
           "decision tree / SVM on FGSM (and PGD) adversarials crafted on each network")
MODELS = ("mlp", "cnn")

QUICK = {"n": 300, "attacks": ("fgsm",)}
FULL = {"n": 1000, "attacks": ("fgsm", "pgd")}
EPS = 0.2   # L-inf; Papernot et al. used 0.3, where all but the k-NN fall to <= 16% (less contrast)
PGD = {"alpha": 0.03, "steps": 20}
K = 3


def softmax_regression_name():
    """'softmax' where that architecture exists (with a recipe), else 'logreg'."""
    from ..nets.architectures import ARCHITECTURES, RECIPES
    return "softmax" if "softmax" in ARCHITECTURES and "softmax" in RECIPES else "logreg"


class _Net:
    """A network as a target: predict flattened or not."""

    kind = "network"

    def __init__(self, model):
        self.model = model

    def predict(self, x):
        return self.model.predict(x.astype(self.model.dtype, copy=False))


class _Flat:
    """A classifier on flattened pixels (k-NN, scikit-learn estimators) as a target."""

    def __init__(self, est, kind, chunk=1000):
        self.est, self.kind, self.chunk = est, kind, chunk

    def predict(self, x):
        f = x.reshape(len(x), -1)
        return np.concatenate([np.asarray(self.est.predict(f[i:i + self.chunk]), np.int64)
                               for i in range(0, len(f), self.chunk)]) if len(f) else \
            np.zeros(0, np.int64)


def sklearn_targets(x, y, seed=0):
    """{name: fitted estimator} for the decision tree and the SVM, and {name: note} of what
    was skipped (everything, with the reason, when scikit-learn is not importable)."""
    try:
        from sklearn.svm import SVC
        from sklearn.tree import DecisionTreeClassifier
    except ImportError as e:
        note = f"skipped: scikit-learn is not importable ({e})"
        return {}, {"decision_tree": note, "svm": note}
    f = x.reshape(len(x), -1).astype(np.float64)
    return {"decision_tree": DecisionTreeClassifier(random_state=seed).fit(f, y),
            "svm": SVC(kernel="rbf", C=1.0, gamma="scale").fit(f, y)}, {}


def run(*, models=None, out=None, backend="auto", quick=False, seed=0, log=None, eps=EPS,
        k=K, n=None, attacks=None, train_n=None):
    """Run the experiment (see the module docstring); returns the results dict.

    models: the network sources / targets besides softmax regression (default mlp, cnn);
    eps: the L-inf radius; k: the k-NN's k; n: test images (300 quick, 1,000 full);
    attacks: ('fgsm',) quick, ('fgsm', 'pgd') full; train_n: fit the k-NN and the
    scikit-learn targets on the first train_n bundled training images (default all 4,000)."""
    from .._validate import check_positive
    from ..attacks import run_attack
    from ..nets.datasets import load_mnist
    from ..nets.zoo import pretrained
    from ..reference.knn import KNN

    ctx = Context(NAME, SUMMARY, out, backend, quick, seed, log)
    eps = check_positive(eps, "eps")
    cfg = dict(QUICK if ctx.quick else FULL)
    if n is not None:
        cfg["n"] = int(n)
    attacks = tuple(cfg["attacks"] if attacks is None else attacks)
    if not attacks or any(a not in ("fgsm", "pgd") for a in attacks):
        raise AdvkernError(f"attacks: use 'fgsm' and/or 'pgd', got {attacks!r}")

    ctx.stage("models")
    nets = load_models(models, MODELS)
    sr = softmax_regression_name()
    if sr not in nets:
        nets["softmax-regression"] = pretrained(sr, seed=seed, progress=False)
    xtr, ytr = load_mnist("train")
    if train_n is not None:
        xtr, ytr = xtr[:int(train_n)], ytr[:int(train_n)]
    xt, yt = load_mnist("test")
    x, y = xt[:cfg["n"]], yt[:cfg["n"]]
    targets = {name: _Net(m) for name, m in nets.items()}
    knn = KNN(k).fit(xtr, ytr)
    targets[f"knn (k={k})"] = _Flat(knn, "k-NN (NumPy)")
    ctx.stage("fitting the scikit-learn targets")
    fitted, skipped = sklearn_targets(xtr, ytr, seed)
    for name, est in fitted.items():
        targets[name] = _Flat(est, f"scikit-learn {type(est).__name__}")
    for name, note in skipped.items():
        ctx.log(f"  {name}: {note}")

    ctx.stage("clean accuracy")
    clean = {t: float(np.mean(tm.predict(x) == y)) for t, tm in targets.items()}
    matrix, crafted = {}, {}
    for atk in attacks:
        matrix[atk] = {}
        kw = {"eps": eps} if atk == "fgsm" else {"eps": eps, **PGD}
        for src, m in nets.items():
            ctx.stage(f"{atk} on {src}")
            r = run_attack(m, x, y, atk, seed=seed, backend=ctx.backend, **kw)
            crafted[f"{atk}/{src}"] = round(r.seconds, 3)
            matrix[atk][src] = {t: float(np.mean(tm.predict(r.x_adv) == y))
                                for t, tm in targets.items()}
    _targets(ctx, matrix, clean, nets)
    path = ctx.figure("transfer_matrix")
    if path:
        note = "; ".join(f"{t}: {v}" for t, v in skipped.items())
        figure(matrix, clean, f"transferability: target accuracy on adversarials "
               f"(L-inf eps={eps:g}, n={len(x)})", path, note=note)
    return ctx.finish(
        models=list(nets), sources=list(nets), target_models=list(targets),
        target_kinds={t: tm.kind for t, tm in targets.items()},
        softmax_regression=sr, n=len(x), eps=eps, attacks=list(attacks),
        pgd=PGD if "pgd" in attacks else None, knn={"k": k, "train_points": len(xtr),
        "chunk_rows": knn.chunk_rows(), "distance": "squared Euclidean, float64",
        "ties": "equal distances: lower training index first; equal votes: the class of the "
                "nearest neighbour among the tied classes"},
        sklearn={"decision_tree": "DecisionTreeClassifier(random_state=seed)",
                 "svm": "SVC(kernel='rbf', C=1.0, gamma='scale')"},
        skipped=skipped, clean=clean, matrix=matrix, attack_seconds=crafted,
        metric="accuracy of the target on the source's adversarials (lower = transfers better)")


def _targets(ctx, matrix, clean, nets):
    # Papernot et al.: every model class is vulnerable to examples crafted on other models
    for atk, rows in matrix.items():
        worst = {}
        for t in clean:
            others = [rows[s][t] for s in rows if s != t]
            worst[t] = min(others) if others else float("nan")
        ok = all(worst[t] < clean[t] for t in clean if np.isfinite(worst[t]))
        ctx.target(f"{atk.upper()}: every target loses accuracy on another model's "
                   "adversarials",
                   ", ".join(f"{t} {100 * clean[t]:.0f}->{100 * worst[t]:.0f}%"
                             for t in clean), "lower than clean for each target "
                   "(Papernot et al. 2016)", ok, clean=clean, worst_transfer=worst)


def figure(matrix, clean, title, path, note=""):
    """Heatmap(s), one per attack: rows = 'clean' + sources, columns = targets, cells =
    accuracy (%) written in; white-box cells (source = target) outlined; ``note`` (e.g.
    the skipped targets) printed under the plot."""
    from ..figures import _plt
    plt = _plt()
    cols = list(clean)
    rows_n = len(next(iter(matrix.values()))) + 1
    # each panel has its own row labels: room for them (~2.3 in) beside every panel
    fig, axes = plt.subplots(1, len(matrix), figsize=((1.15 * len(cols) + 2.3) * len(matrix),
                                                      0.55 * rows_n + 1.9), squeeze=False,
                             layout="constrained")
    im = None
    for ax, (atk, rows) in zip(axes[0], matrix.items()):
        names = ["clean"] + [f"{atk.upper()} from {s}" for s in rows]
        vals = np.array([[clean[c] for c in cols]] + [[rows[s][c] for c in cols]
                                                      for s in rows]) * 100
        im = ax.imshow(vals, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for i in range(vals.shape[0]):
            for j in range(vals.shape[1]):
                ax.text(j, i, f"{vals[i, j]:.1f}", ha="center", va="center", fontsize=7.5,
                        color="black")
        for i, s in enumerate(rows, start=1):
            if s in cols:
                j = cols.index(s)
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.8,
                                           edgecolor="black"))
        ax.axhline(0.5, color="white", lw=2)
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, rotation=30, ha="right", fontsize=7.5)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7.5)
        ax.set_xlabel("target model", fontsize=8)
        ax.set_title(f"{atk.upper()} (outlined: white-box)", fontsize=8)
    cb = fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03, pad=0.01)
    cb.set_label("target accuracy (%)", fontsize=8)
    fig.suptitle(title, fontsize=9)
    if note:
        fig.supxlabel(note, fontsize=6.5)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
