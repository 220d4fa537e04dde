"""``advkern demo``: the seeds' headline results, reproduced on the bundled MNIST split.

Trains (or loads from the cache) the bundled models, runs each reference attack with the
seeds' settings, and prints one table: experiment, measured value, the target the project set
(from the papers / seed posts), and seconds. ``quick=True`` uses fewer images (a smoke run).
"""

import time

import numpy as np

from .attacks import run_attack
from .nets import build
from .nets.datasets import load_mnist
from .nets.zoo import pretrained
from .reference.linear import linear_attack, train_robust_linear


def _pct(v):
    return f"{100 * v:.1f}%"


def headline_results(quick=False, seed=0, log=print, backend=None):
    """Run every experiment; returns a list of rows (experiment, model, measured, target, s)."""
    x, y = load_mnist("test")
    n_big = 200 if quick else len(x)
    n_jsma = 20 if quick else 100
    n_pix = 10 if quick else 50
    rows = []

    def add(name, model, measured, target, seconds):
        rows.append((name, model, measured, target, f"{seconds:.1f}"))
        log(f"  {name} [{model}]: {measured}  ({seconds:.1f} s)")

    models = {}
    for name, goal in (("mlp", "93%"), ("cnn", "95%")):
        t0 = time.perf_counter()
        models[name] = pretrained(name, seed=seed)
        add("clean accuracy", name, _pct(models[name].accuracy(x, y)), f">= {goal}",
            time.perf_counter() - t0)

    xs, ys = x[:n_big], y[:n_big]
    for name in ("mlp", "cnn"):
        for eps, goal in ((0.1, "<= 20%"), (0.25, "<= 2%")):
            r = run_attack(models[name], xs, ys, "fgsm", eps=eps, backend=backend)
            add(f"FGSM eps {eps} accuracy", name, _pct(r.metrics["adversarial_accuracy"]),
                goal if name == "mlp" else "-", r.seconds)
    for name in ("mlp", "cnn"):
        r = run_attack(models[name], xs, ys, "pgd", eps=0.3, alpha=0.01, steps=40, seed=seed,
                       backend=backend)
        add("PGD-40 eps 0.3 accuracy", name, _pct(r.metrics["adversarial_accuracy"]), "0%",
            r.seconds)

    for use_logits, label in ((True, "logits"), (False, "probabilities")):
        r = run_attack(models["mlp"], x[:n_jsma], y[:n_jsma], "jsma", theta=1.0, gamma=0.1,
                       target="next", use_logits=use_logits, backend=backend)
        ok = r.info["success"]
        l0 = r.info["l0"][ok].mean() / x[0].size if ok.any() else np.nan
        add(f"JSMA ({label}) success / mean L0, {n_jsma} img", "mlp",
            f"{_pct(r.metrics['success_rate'])} / {_pct(l0)}",
            ">= 95% / <= 4% (paper 97.1/4.02)", r.seconds)

    for k in (1, 5):
        r = run_attack(models["mlp"], x[:n_pix], y[:n_pix], "pixel", pixels=k, popsize=400,
                       generations=100 if not quick else 20, seed=seed,
                       backend=backend)
        add(f"{k}-pixel DE success, {n_pix} img", "mlp",
            _pct(r.metrics["success_rate_on_correct"]), "5-pixel > 1-pixel", r.seconds)

    t0 = time.perf_counter()
    adv = pretrained("mlp", seed=seed, adversarial="fgsm", eps=0.1)
    r = run_attack(adv, xs, ys, "fgsm", eps=0.1, backend=backend)
    add("FGSM-trained: clean / FGSM 0.1 accuracy", "mlp",
        f"{_pct(adv.accuracy(xs, ys))} / {_pct(r.metrics['adversarial_accuracy'])}",
        "clean within 3 pts / > 60%", time.perf_counter() - t0)

    t0 = time.perf_counter()
    xtr, ytr = load_mnist("train")
    keep_tr, keep_te = ytr <= 1, y <= 1
    base = build("logreg", num_classes=2, seed=seed)
    std = train_robust_linear(base, xtr[keep_tr], ytr[keep_tr], 0.0, epochs=10, seed=seed)
    rob = train_robust_linear(base, xtr[keep_tr], ytr[keep_tr], 0.2, epochs=10, seed=seed)
    errs = [1 - m.accuracy(linear_attack(m, x[keep_te], y[keep_te], 0.2), y[keep_te])
            for m in (std, rob)]
    add("0 vs 1 logreg, eps 0.2 error: standard -> robust", "logreg",
        f"{_pct(errs[0])} -> {_pct(errs[1])}", ">= 50% -> <= 10% (seed: 84.5 -> 2.5)",
        time.perf_counter() - t0)

    for src, dst in (("mlp", "cnn"), ("cnn", "mlp")):
        r = run_attack(models[src], xs, ys, "fgsm", eps=0.1, backend=backend)
        add(f"transfer FGSM 0.1 {src} -> {dst}: accuracy", dst,
            _pct(models[dst].accuracy(r.x_adv, ys)), "-", r.seconds)
    return rows


def run_demo(quick=False, seed=0, backend="auto"):
    from .cli import _table
    from .kernels import resolve

    t0 = time.perf_counter()
    backend = resolve("reference" if backend is None else backend)
    print(f"advkern demo: bundled MNIST (1,000 test images), attacks on the "
          f"{'NumPy reference' if backend == 'reference' else backend + ' backend'}")
    rows = headline_results(quick=quick, seed=seed, backend=backend)
    print()
    print(_table(["experiment", "model", "measured", "target", "seconds"], rows))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0
