"""``advkern demo``: the seeds' headline results, reproduced on the bundled MNIST split, and a
report of them.

Trains (or loads from the cache) the bundled models, runs each attack with the seeds'
settings on the chosen backend ('auto': the fastest here), prints one table (experiment,
measured value, the target the project set from the papers / seed posts, pass or fail,
seconds) and writes a report folder: ``results.json`` (every figure, its target and verdict,
the machine, versions and times), ``report.md`` (the table with the pictures) and PNG
pictures: per attack a grid of 10 digits (original / perturbation / adversarial, predicted
class and confidence), accuracy-versus-eps curves for FGSM and PGD on both models, the JSMA
and one-pixel examples with the changed pixels circled. ``quick=True`` uses fewer images.
"""

import contextlib
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

from .attacks import run_attack
from .nets import build
from .nets.datasets import load_mnist
from .nets.zoo import pretrained
from .reference.linear import linear_attack, train_robust_linear

EPS_CURVE = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)


def _pct(v):
    return f"{100 * v:.1f}%"


def _stderr(msg):
    print(msg, file=sys.stderr, flush=True)


def headline_results(quick=False, seed=0, log=_stderr, backend=None, keep=None):
    """Run every experiment; returns a list of rows (experiment, model, measured, target, s).

    keep: a dict to fill with what the report needs: 'records' (one dict per row: the
    numbers, the target and whether it is met; None where the row has no target),
    'examples' (attack -> (model name, x, y, x_adv) of 10 images) and 'curves'.
    """
    keep = {} if keep is None else keep
    records = keep.setdefault("records", [])
    examples = keep.setdefault("examples", {})
    x, y = load_mnist("test")
    n_big = 200 if quick else len(x)
    n_jsma = 20 if quick else 100
    n_pix = 10 if quick else 50
    rows = []

    def add(name, model, measured, target, seconds, values=None, ok=None):
        ok = None if ok is None else bool(ok)
        rows.append((name, model, measured, target, f"{seconds:.1f}"))
        records.append({"experiment": name, "model": model, "measured": measured,
                        "values": values or {}, "target": target, "pass": ok,
                        "seconds": round(seconds, 3)})
        mark = "" if ok is None else ("  [pass]" if ok else "  [FAIL]")
        log(f"  {name} [{model}]: {measured}{mark}  ({seconds:.1f} s)")

    models = {}
    for name, goal in (("mlp", 0.93), ("cnn", 0.95)):
        t0 = time.perf_counter()
        models[name] = pretrained(name, seed=seed)
        acc = models[name].accuracy(x, y)
        add("clean accuracy", name, _pct(acc), f">= {goal:.0%}", time.perf_counter() - t0,
            {"accuracy": acc}, acc >= goal)

    xs, ys = x[:n_big], y[:n_big]
    for name in ("mlp", "cnn"):
        for eps, goal in ((0.1, 0.20), (0.25, 0.02)):
            r = run_attack(models[name], xs, ys, "fgsm", eps=eps, backend=backend)
            acc = r.metrics["adversarial_accuracy"]
            mine = name == "mlp"
            add(f"FGSM eps {eps} accuracy", name, _pct(acc), f"<= {goal:.0%}" if mine else "-",
                r.seconds, {"accuracy": acc}, acc <= goal if mine else None)
            if name == "mlp" and eps == 0.1:
                examples["fgsm"] = ("mlp", xs[:10], ys[:10], r.x_adv[:10], "FGSM eps 0.1")
    for name in ("mlp", "cnn"):
        r = run_attack(models[name], xs, ys, "pgd", eps=0.3, alpha=0.01, steps=40, seed=seed,
                       backend=backend)
        acc = r.metrics["adversarial_accuracy"]
        add("PGD-40 eps 0.3 accuracy", name, _pct(acc), "0%", r.seconds, {"accuracy": acc},
            acc == 0)
        if name == "mlp":
            examples["pgd"] = ("mlp", xs[:10], ys[:10], r.x_adv[:10], "PGD-40 eps 0.3")

    for use_logits, label in ((True, "logits"), (False, "probabilities")):
        r = run_attack(models["mlp"], x[:n_jsma], y[:n_jsma], "jsma", theta=1.0, gamma=0.1,
                       target="next", use_logits=use_logits, backend=backend)
        ok = r.info["success"]
        l0 = float(r.info["l0"][ok].mean()) if ok.any() else float("nan")
        frac = l0 / x[0].size
        rate = r.metrics["success_rate"]
        add(f"JSMA ({label}) success / mean L0, {n_jsma} img", "mlp",
            f"{_pct(rate)} / {l0:.1f} px ({_pct(frac)})", ">= 95% / <= 4% (paper 97.1/4.02)",
            r.seconds, {"success_rate": rate, "mean_l0_count": l0, "mean_l0_fraction": frac},
            bool(rate >= 0.95 and frac <= 0.04))
        if use_logits:
            examples["jsma"] = ("mlp", x[:10], y[:10], r.x_adv[:10],
                                "JSMA theta 1 gamma 0.1, target y+1 (changed pixels circled)")

    de = {}
    for k in (1, 5):
        r = run_attack(models["mlp"], x[:n_pix], y[:n_pix], "pixel", pixels=k, popsize=400,
                       generations=100 if not quick else 20, seed=seed, backend=backend)
        de[k] = r.metrics["success_rate_on_correct"]
        add(f"{k}-pixel DE success, {n_pix} img", "mlp", _pct(de[k]), "5-pixel > 1-pixel",
            r.seconds, {"success_rate_on_correct": de[k]}, (de[5] > de[1]) if k == 5 else None)
        if k == 1:
            examples["pixel"] = ("mlp", x[:10], y[:10], r.x_adv[:10],
                                 "one-pixel DE 400 x 100 (changed pixel circled)")

    t0 = time.perf_counter()
    adv = pretrained("mlp", seed=seed, adversarial="fgsm", eps=0.1)
    r = run_attack(adv, xs, ys, "fgsm", eps=0.1, backend=backend)
    clean, robust = adv.accuracy(xs, ys), r.metrics["adversarial_accuracy"]
    std_clean = models["mlp"].accuracy(xs, ys)
    add("FGSM-trained: clean / FGSM 0.1 accuracy", "mlp", f"{_pct(clean)} / {_pct(robust)}",
        "clean within 3 pts / > 60%", time.perf_counter() - t0,
        {"clean_accuracy": clean, "fgsm_accuracy": robust, "standard_clean": std_clean},
        bool(clean >= std_clean - 0.03 and robust > 0.60))

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
        time.perf_counter() - t0, {"standard_error": errs[0], "robust_error": errs[1]},
        bool(errs[0] >= 0.5 and errs[1] <= 0.10))

    for src, dst in (("mlp", "cnn"), ("cnn", "mlp")):
        r = run_attack(models[src], xs, ys, "fgsm", eps=0.1, backend=backend)
        acc = models[dst].accuracy(r.x_adv, ys)
        add(f"transfer FGSM 0.1 {src} -> {dst}: accuracy", dst, _pct(acc), "-", r.seconds,
            {"accuracy": acc})

    curves = keep.setdefault("curves", {})
    t0 = time.perf_counter()
    xc, yc = x[:100 if quick else 200], y[:100 if quick else 200]
    for name in ("mlp", "cnn"):
        for attack in ("fgsm", "pgd"):
            accs = []
            for eps in EPS_CURVE:
                if eps == 0:
                    accs.append(models[name].accuracy(xc, yc))
                    continue
                kw = {"alpha": 2.5 * eps / 20, "steps": 20} if attack == "pgd" else {}
                r = run_attack(models[name], xc, yc, attack, eps=eps, seed=seed,
                               backend=backend, **kw)
                accs.append(r.metrics["adversarial_accuracy"])
            curves[f"{attack.upper()} {name}"] = (list(EPS_CURVE), accs)
    log(f"  accuracy-vs-eps curves, {len(xc)} images ({time.perf_counter() - t0:.1f} s)")
    return rows


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__}


def _figures(keep, out, models):
    from .figures import accuracy_curves, attack_grid

    files = {}
    for attack, (name, x, y, xa, title) in keep["examples"].items():
        path = os.path.join(out, f"{attack}_{name}.png")
        attack_grid(models[name], x, y, xa, f"{title}, {name}", path,
                    mark_changed=attack in ("jsma", "pixel"))
        files[attack] = os.path.basename(path)
    path = os.path.join(out, "accuracy_vs_eps.png")
    accuracy_curves(keep["curves"], "accuracy vs eps (FGSM; PGD-20, alpha 2.5 eps / 20)", path)
    files["curves"] = os.path.basename(path)
    return files


def _mark(ok):
    return "-" if ok is None else ("pass" if ok else "**FAIL**")


def _markdown(res):
    m = res["machine"]
    lines = [
        "# advkern demo report", "",
        f"{res['date']}, {res['backend']} backend, total {res['seconds']:.0f} s "
        f"({'quick run' if res['quick'] else 'full run'}).", "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {m['platform']}; Python {m['python']}, "
        f"NumPy {m['numpy']}, advkern {res['advkern']}.", "",
        f"{res['passed']} of {res['with_target']} targets met.", "",
        "| experiment | model | measured | target | verdict | seconds |",
        "|---|---|---|---|---|---|"]
    for r in res["results"]:
        if r.get("group"):
            continue
        lines.append(f"| {r['experiment']} | {r['model']} | {r['measured']} | {r['target']} | "
                     f"{_mark(r['pass'])} | {r['seconds']:.1f} |")
    lines.append("")
    for key, title in (("fgsm", "FGSM eps 0.1"), ("pgd", "PGD-40 eps 0.3"),
                       ("jsma", "JSMA (pair-wise, from logits)"),
                       ("pixel", "one-pixel differential evolution"),
                       ("curves", "accuracy versus eps")):
        if key in res["figures"]:
            lines += [f"## {title}", "", f"![{title}]({res['figures'][key]})", ""]
    for name, e in res.get("experiments", {}).items():
        lines += [f"## Experiment `{name}` (quick form, {e['seconds']:.0f} s)", "",
                  e["summary"] + ".", "", f"Details: `{name}/results.json`.", "",
                  "| figure | measured | target | verdict |", "|---|---|---|---|"]
        lines += [f"| {r['experiment'].split(': ', 1)[1]} | {r['measured']} | {r['target']} | "
                  f"{_mark(r['pass'])} |" for r in res["results"] if r.get("group") == name]
        lines.append("")
        lines += [f"![{k}]({v})" for k, v in e["figures"].items()]
        lines.append("")
    return "\n".join(lines)


def _writable_folder(out):
    from .experiments._common import writable_folder
    writable_folder(out, "the report")


def _experiment_names(experiments):
    from . import experiments as _exp
    from .errors import AdvkernError

    if experiments is None or experiments == "all":
        return _exp.available()
    if experiments == "none":
        return []
    names = [e.strip() for e in experiments.split(",")] if isinstance(experiments, str) \
        else list(experiments)
    for e in names:
        if e not in _exp.available():
            raise AdvkernError(f"unknown experiment {e!r}: use 'all', 'none' or some of "
                               f"{_exp.available()}")
    return names


def _run_experiments(names, out, backend, seed, rows, recs):
    """The quick form of each experiment (``advkern.experiments``), its figures under
    out/NAME; its targets join the demo's rows and records. Returns {name: summary}."""
    from . import experiments as _exp

    done = {}
    for name in names:
        _stderr(f"advkern demo: experiment {name} (quick form)")
        res = _exp.run(name, out=None if out is None else os.path.join(out, name),
                       backend=backend, quick=True, seed=seed, log=_stderr)
        share = res["seconds"] / max(len(res["targets"]), 1)
        for t in res["targets"]:
            rows.append((f"{name}: {t['name']}", "-", t["measured"], t["target"],
                         f"{share:.1f}"))
            recs.append({"experiment": f"{name}: {t['name']}", "model": "-",
                         "measured": t["measured"], "values": t["values"],
                         "target": t["target"], "pass": t["pass"],
                         "seconds": round(share, 3), "group": name})
        done[name] = {"summary": res["summary"], "seconds": res["seconds"],
                      "figures": {k: f"{name}/{v}" for k, v in res["figures"].items()}}
    return done


@contextlib.contextmanager
def background_compile(backend):
    """While the body runs, compile the demo's later numba_cpu kernels in a second process
    (``kernels.numba_cpu.warm``) when numba's cache is cold: a fresh machine compiles them on
    first use (~35 s on two cores, single-threaded, one core idle meanwhile). ``advkern
    demo`` uses it; ``run_demo`` itself starts no process."""
    warm = None
    if backend == "numba_cpu":
        from .kernels.numba_cpu import warm as _warm
        warm = _warm.start()
    try:
        yield
    except BaseException:
        if warm is not None:
            _warm.finish(warm, timeout=0)
        raise
    if warm is not None:
        _warm.finish(warm)


def run_demo(quick=False, seed=0, backend="auto", out="advkern-report", experiments="all"):
    """Run the demo, print its table, write the report folder ``out`` (None: no report).
    experiments: 'all' (default), 'none', or names of ``advkern.experiments`` (a list or a
    comma-separated string) to run in their quick form after the headline attacks.
    Returns 0."""
    from .cli import _table
    from .kernels import resolve

    t0 = time.perf_counter()
    backend = resolve("reference" if backend is None else backend)
    exp_names = _experiment_names(experiments)
    if out is not None:
        _writable_folder(out)   # before any work: a bad --out must not cost the run
    _stderr(f"advkern demo: bundled MNIST (1,000 test images), attacks on the "
            f"{'NumPy reference' if backend == 'reference' else backend + ' backend'}")
    keep = {}
    rows = headline_results(quick=quick, seed=seed,
                            backend=None if backend == "reference" else backend, keep=keep)
    recs = keep["records"]
    exp_done = _run_experiments(exp_names, out, backend, seed, rows, recs)
    table = [row + (_mark(rec["pass"]).strip("*"),) for row, rec in zip(rows, recs)]
    print(_table(["experiment", "model", "measured", "target", "seconds", "verdict"], table))
    seconds = time.perf_counter() - t0
    with_target = [r for r in recs if r["pass"] is not None]
    passed = sum(bool(r["pass"]) for r in with_target)
    print(f"\n{passed} of {len(with_target)} targets met; total {seconds:.0f} s")
    if out is None:
        return 0
    from . import __version__
    models = {"mlp": pretrained("mlp", seed=seed, progress=False)}
    figures = _figures(keep, out, models)
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "backend": backend, "quick": bool(quick), "seed": seed,
           "seconds": round(time.perf_counter() - t0, 1), "advkern": __version__,
           "machine": _machine(), "passed": passed, "with_target": len(with_target),
           "results": recs, "figures": figures, "experiments": exp_done,
           "curves": {k: {"eps": e, "accuracy": a} for k, (e, a) in keep["curves"].items()}}
    from .experiments._common import _json_default
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=_json_default)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(_markdown(res) + "\n")
    n_exp = sum(len(e["figures"]) for e in exp_done.values())
    print(f"wrote {out}/report.md, results.json and {len(figures) + n_exp} pictures"
          + (f" ({n_exp} in the experiments' folders)" if n_exp else ""))
    return 0
