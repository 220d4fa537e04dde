"""Defensive distillation (Papernot, McDaniel, Wu, Jha & Swami 2016) and its gradient masking.

For each temperature T:

1. teacher: the architecture trained on the bundled train split with hard labels at
   temperature T, i.e. on mean_i -log softmax(z(x_i) / T)_{y_i};
2. student: the same architecture (fresh initialisation, seed + 1) trained at temperature T
   on the teacher's soft labels q_i = softmax(z_teacher(x_i) / T) (computed in float64),
   i.e. on mean_i -sum_k q_ik log softmax(z(x_i) / T)_k
   (``reference.losses.soft_cross_entropy``, ``nets.train.train(temperature=, soft_labels=)``);
3. deployed at T = 1: the student's logits z are used as they are, so its softmax(z) is
   that of logits about T times larger than an ordinary network's.

"before" is the teacher at T = 1 (ordinary hard-label training: with ``quick=False`` it is
the bundled model itself, same recipe, seed and cache file). The attacks, all on the first
``n`` test images and scored on the images the attacked model classifies correctly:

- as deployed (what distillation is claimed to stop): FGSM and PGD on the cross-entropy
  (L-inf, eps), JSMA (pair variant, target (y + 1) mod 10, gamma 0.1) on the softmax
  probabilities, the saliency of the distillation paper;
- masking-aware: the same three attacks on the *scaled* model whose last Dense layer is
  divided by T (logits z / T: the same classes, the softmax the student was trained with),
  plus C&W L2 (which works on the logit margin) on the deployed student.

At T = 100 the deployed student's softmax saturates: float32 exp underflows for logit gaps
over ~104, so the input gradient of the cross-entropy is exactly zero for most images
(measured here as ``zero_gradient_fraction``), FGSM's sign(0) = 0 moves nothing and
JSMA's probability Jacobian vanishes: the defence masks gradients, it does not remove the
adversarial examples, which the scaled model (or C&W) finds again.
"""

import hashlib
import json
import os

import numpy as np

from ..errors import AdvkernError
from ._common import Context

NAME = "distillation"
SUMMARY = ("defensive distillation at T in {1, 20, 100}: FGSM / PGD / JSMA success before "
           "and after, and the gradient masking the scaled-logit attacks and C&W undo")
MODELS = ("mlp",)

TEMPERATURES = (1, 20, 100)
# quick: the demo's version (<= 60 s on two cores with training); full: the bundled recipe.
QUICK = {"n": 100, "epochs": 5, "pgd_steps": 20, "cw_steps": 50, "cw_search": 4}
FULL = {"n": 500, "epochs": None, "pgd_steps": 40, "cw_steps": 100, "cw_search": 6}
EPS = 0.1           # FGSM / PGD L-inf radius (pixels in [0, 1])
PGD_ALPHA = 0.01
JSMA = {"theta": 1.0, "gamma": 0.1}
# Masking-aware success at T = 100 counts as recovered when it is within RECOVER (absolute)
# of the success of the same attack on the undistilled model (T = 1 teacher).
RECOVER = 0.15


# -- training and the cache ---------------------------------------------------------------

def _recipe(arch, epochs):
    from ..nets.architectures import RECIPES
    r = dict(RECIPES[arch])
    if epochs is not None:
        r["epochs"] = int(epochs)
    return r


def _key(role, arch, temperature, seed, recipe, teacher=None, train_n=None):
    from .. import __version__
    k = {"kind": f"distillation-{role}", "name": arch, "temperature": float(temperature),
         "seed": int(seed), "recipe": recipe, "version": __version__}
    if teacher is not None:
        k["teacher"] = teacher
    if train_n is not None:
        k["train_n"] = int(train_n)
    return json.dumps(k, sort_keys=True)


def _train_split(train_n):
    from ..nets.datasets import load_mnist
    x, y = load_mnist("train")
    return (x, y) if train_n is None else (x[:train_n], y[:train_n])


def _cached(key, stem, make, refresh=False):
    """Load the model cached under ``key`` or make, save (atomically) and return it."""
    from ..nets.io import load, save
    from ..nets.zoo import cache_dir
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = cache_dir() / f"{stem}-{digest}.npz"
    if path.exists() and not refresh:
        return load(path), digest, True
    model = make()
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    save(model, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees a half-written file
    return model, digest, False


def teacher(arch, temperature, seed=0, epochs=None, progress=False, train_n=None):
    """The architecture trained with hard labels at ``temperature`` (cached) on the first
    ``train_n`` bundled training images (None: all 4,000).

    At T = 1 with the bundled recipe (epochs and train_n None) this is
    ``pretrained(arch, seed)``. Returns (model, cache digest, was cached)."""
    from ..nets.architectures import build
    from ..nets.train import train
    from ..nets.zoo import cache_path, pretrained

    recipe = _recipe(arch, epochs)
    if float(temperature) == 1.0 and epochs is None and train_n is None:
        path = cache_path(arch, seed)
        hit = path.exists()
        return pretrained(arch, seed=seed, progress=progress), path.stem, hit
    key = _key("teacher", arch, temperature, seed, recipe, train_n=train_n)

    def make():
        x, y = _train_split(train_n)
        return train(build(arch, seed=seed), x, y, seed=seed, progress=progress,
                     temperature=temperature, label=f"teacher {arch} T={temperature:g}",
                     **recipe)[0]
    return _cached(key, f"distill-teacher-{arch}-T{temperature:g}-s{seed}", make)


def student(arch, temperature, seed=0, epochs=None, progress=False, train_n=None):
    """The student distilled at ``temperature`` from ``teacher(arch, temperature, seed)``
    on the same training images (cached; its key holds the teacher's). Returns (student,
    teacher, digest, was cached)."""
    from ..nets.architectures import build
    from ..nets.train import train
    from ..reference.losses import softmax

    t_model, t_digest, _ = teacher(arch, temperature, seed, epochs, progress, train_n)
    recipe = _recipe(arch, epochs)
    key = _key("student", arch, temperature, seed, recipe, teacher=t_digest, train_n=train_n)

    def make():
        x, y = _train_split(train_n)
        z = np.concatenate([t_model.logits(x[i:i + 1000]) for i in range(0, len(x), 1000)])
        q = softmax(z.astype(np.float64) / float(temperature))
        return train(build(arch, seed=seed + 1), x, y, seed=seed + 1, progress=progress,
                     temperature=temperature, soft_labels=q,
                     label=f"student {arch} T={temperature:g}", **recipe)[0]
    s_model, digest, hit = _cached(key, f"distill-student-{arch}-T{temperature:g}-s{seed}",
                                   make)
    return s_model, t_model, digest, hit


def scaled_logits(model, temperature):
    """A copy of ``model`` whose last Dense layer (weights and bias) is divided by T, so its
    logits are z / T: the same predictions, the softmax the student was trained with."""
    if model.layers[-1].type != "dense":
        raise AdvkernError(f"scaled_logits needs a model ending in a Dense layer, got "
                           f"{model.layers[-1].type!r}")
    m = model.copy()
    t = m.dtype.type(temperature)
    m.params[-1] = {k: a / t for k, a in m.params[-1].items()}
    return m


# -- measurements -------------------------------------------------------------------------

def gradient_stats(model, x, y):
    """Fraction of images whose cross-entropy input gradient is exactly zero (in the model's
    dtype), and the median gap between the two largest logits."""
    from ..reference.network import loss_and_input_grad
    _, g = loss_and_input_grad(model, x.astype(model.dtype, copy=False), y)
    zero = np.abs(g.reshape(len(x), -1)).max(axis=1) == 0
    z = np.sort(model.logits(x.astype(model.dtype, copy=False)).astype(np.float64), axis=1)
    return {"zero_gradient_fraction": float(zero.mean()),
            "median_top2_logit_gap": float(np.median(z[:, -1] - z[:, -2]))}


def _attack(model, x, y, name, backend, seed, evaluate_on=None, **kw):
    """Success rate on the images ``evaluate_on`` (default: model) classifies correctly.

    Attacks on the scaled model are evaluated on the deployed student: same argmax, and
    the success rule (pred != y, or pred == target for JSMA) is the deployed model's."""
    from ..attacks import run_attack
    from ..reference.metrics import evaluate
    r = run_attack(model, x, y, name, seed=seed, backend=backend, **kw)
    target = (y + 1) % model.num_classes if name == "jsma" else None   # run_attack's 'next'
    m = evaluate(evaluate_on or model, x, y, r.x_adv, target=target)
    return {"success_rate_on_correct": float(m["success_rate_on_correct"]),
            "success_rate": float(m["success_rate"]), "seconds": round(r.seconds, 3),
            "median_linf": float(m["median_linf"]), "median_l0": float(m["median_l0"]),
            "median_l2": float(m["median_l2"])}


def run(*, models=None, out=None, backend="auto", quick=False, seed=0, log=None,
        temperatures=TEMPERATURES, n=None, epochs=None, train_n=None):
    """Run the experiment (see the module docstring); returns the results dict.

    models: bundled architecture names to distil (default ('mlp',)); temperatures: the T
    values (1 must be among them: it is the reference the targets compare with); n: test
    images (default 100 quick / 500 full); epochs: training epochs of every teacher and
    student (default 5 quick / the bundled recipe's full); train_n: train on the first
    train_n bundled images (default all 4,000; tests use fewer)."""
    from .._validate import check_int
    from ..nets.architectures import ARCHITECTURES
    from ..nets.datasets import load_mnist

    ctx = Context(NAME, SUMMARY, out, backend, quick, seed, log)
    archs = list(MODELS if models is None else models)
    if not archs:
        raise AdvkernError("models: give at least one architecture")
    for a in archs:
        if a not in ARCHITECTURES:
            raise AdvkernError(f"models: distillation retrains its models, so it needs "
                               f"bundled architecture names ({sorted(ARCHITECTURES)}), got {a!r}")
    try:
        temps = sorted({float(t) for t in temperatures})
    except (TypeError, ValueError):
        temps = []
    if 1.0 not in temps or len(temps) < 2 or any(not np.isfinite(t) or t <= 0 for t in temps):
        raise AdvkernError(f"temperatures must be positive numbers including 1 and at least "
                           f"one other, got {temperatures!r}")
    cfg = dict(QUICK if ctx.quick else FULL)
    if n is not None:
        cfg["n"] = check_int(n, "n")
    if epochs is not None:
        cfg["epochs"] = check_int(epochs, "epochs")
    if train_n is not None:
        train_n = check_int(train_n, "train_n", minimum=10)
    xt, yt = load_mnist("test")
    x, y = xt[:cfg["n"]], yt[:cfg["n"]]
    be = ctx.backend
    pgd = {"eps": EPS, "alpha": PGD_ALPHA, "steps": cfg["pgd_steps"]}
    attacks = {"fgsm": ("fgsm", {"eps": EPS}), "pgd": ("pgd", pgd),
               "jsma": ("jsma", {**JSMA, "use_logits": False})}
    cw = {"steps": cfg["cw_steps"], "search_steps": cfg["cw_search"]}

    results = {}
    for arch in archs:
        rows = {}
        for t in temps:
            label = f"T={t:g}"
            ctx.stage(f"{arch} {label}: teacher and student")
            s, tm, digest, hit = student(arch, t, seed, cfg["epochs"], train_n=train_n)
            row = {"temperature": t, "cached": hit, "student_cache": digest,
                   "teacher_accuracy": tm.accuracy(xt, yt),
                   "student_accuracy": s.accuracy(xt, yt), **gradient_stats(s, x, y)}
            if t == 1.0:
                # before: the ordinary (undistilled) model, attacked as deployed
                row["before"] = {k: _attack(tm, x, y, a, be, seed, **kw)
                                 for k, (a, kw) in attacks.items()}
                row["before_stats"] = {"accuracy": tm.accuracy(xt, yt),
                                       **gradient_stats(tm, x, y)}
            ctx.stage(f"{arch} {label}: attacks")
            row["deployed"] = {k: _attack(s, x, y, a, be, seed, **kw)
                               for k, (a, kw) in attacks.items()}
            sc = scaled_logits(s, t)
            aware = {f"{k}_scaled": _attack(sc, x, y, a, be, seed, evaluate_on=s, **kw)
                     for k, (a, kw) in attacks.items()}
            aware["jsma_logits"] = _attack(s, x, y, "jsma", be, seed, **JSMA, use_logits=True)
            aware["cw"] = _attack(s, x, y, "cw", be, seed, **cw)
            row["masking_aware"] = aware
            rows[label] = row
        results[arch] = rows
        _targets(ctx, arch, rows, temps)
        path = ctx.figure(f"distillation_{arch}")
        if path:
            figure(rows, f"defensive distillation, {arch} (n={len(x)}, eps={EPS})", path)
    return ctx.finish(models=archs, temperatures=temps, n=len(x), eps=EPS,
                      pgd=pgd, jsma=JSMA, cw=cw, epochs=cfg["epochs"] or "recipe",
                      train_n=4000 if train_n is None else int(train_n),
                      metric="success_rate_on_correct", results=results)


def _targets(ctx, arch, rows, temps):
    lo, hi = rows["T=1"], rows[f"T={max(temps):g}"]
    tmax = f"T={max(temps):g}"
    for a in ("fgsm", "jsma"):
        s1 = lo["deployed"][a]["success_rate_on_correct"]
        sT = hi["deployed"][a]["success_rate_on_correct"]
        ctx.target(f"{arch}: distillation lowers {a.upper()} success ({tmax} vs T=1)",
                   f"{100 * sT:.1f}% at {tmax} vs {100 * s1:.1f}% at T=1",
                   f"lower at {tmax} (seed claim)", sT < s1, t1=s1, tmax=sT)
    # the target names FGSM and JSMA; PGD's recovery is reported without a verdict
    for a in ("fgsm", "jsma", "pgd"):
        before = lo["before"][a]["success_rate_on_correct"]
        rec = hi["masking_aware"][f"{a}_scaled"]["success_rate_on_correct"]
        ok = None if a == "pgd" else rec >= before - RECOVER
        ctx.target(f"{arch}: {a.upper()} on logits / T recovers it at {tmax}",
                   f"{100 * rec:.1f}% (undistilled {100 * before:.1f}%, deployed "
                   f"{100 * hi['deployed'][a]['success_rate_on_correct']:.1f}%)",
                   f">= undistilled - {100 * RECOVER:.0f} points" if ok is not None else
                   "reported", ok, scaled=rec, before=before)
    c = hi["masking_aware"]["cw"]["success_rate_on_correct"]
    ctx.target(f"{arch}: C&W on the deployed student at {tmax}", f"{100 * c:.1f}%",
               f">= undistilled FGSM - {100 * RECOVER:.0f} points",
               c >= lo["before"]["fgsm"]["success_rate_on_correct"] - RECOVER, cw=c)


def figure(rows, title, path):
    """Grouped bars: attack success (on correctly classified images) as deployed and
    masking-aware, per temperature; and the zero-gradient fraction per temperature."""
    from ..figures import _plt
    plt = _plt()
    labels = list(rows)
    series = [("FGSM", "deployed", "fgsm"), ("PGD", "deployed", "pgd"),
              ("JSMA (softmax)", "deployed", "jsma"),
              ("FGSM on z/T", "masking_aware", "fgsm_scaled"),
              ("PGD on z/T", "masking_aware", "pgd_scaled"),
              ("JSMA on z/T", "masking_aware", "jsma_scaled"),
              ("C&W", "masking_aware", "cw")]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.5, 3.8),
                                  gridspec_kw={"width_ratios": [3, 1]})
    groups = ["undistilled"] + labels
    w = 0.8 / len(series)
    colors = plt.get_cmap("tab10")
    for j, (name, part, key) in enumerate(series):
        # the undistilled model has no masking-aware bars: its gradients are not masked
        vals = [np.nan if g == "undistilled" and part == "masking_aware" else
                (rows["T=1"]["before"] if g == "undistilled" else rows[g][part])[key]
                ["success_rate_on_correct"] for g in groups]
        xs = np.arange(len(groups)) + (j - (len(series) - 1) / 2) * w
        aware = part == "masking_aware"
        # an attack and its masking-aware version share a colour; hatching marks the latter
        bars = ax.bar(xs, 100 * np.asarray(vals), w, label=name,
                      color=colors(j % 3 if j < 6 else 3),
                      hatch="//" if aware else None, edgecolor="white" if aware else None)
        for b, v in zip(bars, vals):
            if np.isfinite(v):
                ax.text(b.get_x() + b.get_width() / 2, 100 * v + 1, f"{100 * v:.0f}",
                        ha="center", va="bottom", fontsize=5.5)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("attack success on correctly classified (%)")
    ax.set_ylim(0, 112)
    ax.legend(fontsize=6.5, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title, fontsize=9)
    zf = [rows[g]["zero_gradient_fraction"] for g in labels]
    acc = [rows[g]["student_accuracy"] for g in labels]
    xs = np.arange(len(labels))
    ax2.bar(xs - 0.2, 100 * np.asarray(zf), 0.4, label="zero input gradient", color="gray")
    ax2.bar(xs + 0.2, 100 * np.asarray(acc), 0.4, label="test accuracy", color="tab:green")
    for i, (a, b) in enumerate(zip(zf, acc)):
        ax2.text(i - 0.2, 100 * a + 1, f"{100 * a:.0f}", ha="center", fontsize=6)
        ax2.text(i + 0.2, 100 * b + 1, f"{100 * b:.0f}", ha="center", fontsize=6)
    ax2.set_xticks(xs)
    ax2.set_xticklabels(labels)
    ax2.set_ylim(0, 112)
    ax2.set_ylabel("% of images / accuracy", fontsize=8)
    ax2.legend(fontsize=6.5, loc="upper left")
    ax2.set_title("deployed student (T = 1)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
