"""The ``advkern`` command line (console script and ``python -m advkern``).

Bad input prints one line ``advkern: error: ...`` on stderr and exits with status 2;
no traceback is shown for errors the user can fix.
"""

import argparse
import contextlib
import math
import os
import sys
import time

from .errors import AdvkernError


def _table(headers, rows):
    cols = [[str(h)] + [str(r[i]) for r in rows] for i, h in enumerate(headers)]
    widths = [max(len(c) for c in col) for col in cols]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------- train


def _writable_file(path):
    """Fail now, not after the work, when ``path`` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise AdvkernError(f"{path} is a folder: give a file name")
    if not os.path.isdir(folder):
        raise AdvkernError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise AdvkernError(f"cannot write {path}: folder {folder} is not writable")


def cmd_train(args):
    from .nets import architectures, build, save
    from .nets.datasets import load_mnist
    from .nets.train import train

    if args.out and len(args.arch) > 1:
        raise AdvkernError("--out takes one architecture; use --out-dir for several")
    # Everything that could fail after training is checked before it (nothing is lost).
    if args.seed < 0:
        raise AdvkernError(f"--seed must be >= 0, got {args.seed}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise AdvkernError(f"--lr must be finite and > 0, got {args.lr}")
    if args.epochs is not None and args.epochs < 1:
        raise AdvkernError(f"--epochs must be >= 1, got {args.epochs}")
    if args.out_dir:
        if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise AdvkernError(f"--out-dir {args.out_dir} is a file, not a folder")
        os.makedirs(args.out_dir, exist_ok=True)
    if args.out:
        _writable_file(args.out)
    xtr, ytr = load_mnist("train")
    xte, yte = load_mnist("test")
    classes = None
    if getattr(args, "classes", None):
        from .nets.datasets import select_classes
        try:
            classes = [int(c) for c in args.classes.split(",")]
        except ValueError:
            raise AdvkernError(f"--classes must be digits separated by commas (e.g. 3,7), "
                               f"got {args.classes!r}") from None
        xtr, ytr = select_classes(xtr, ytr, classes)
        xte, yte = select_classes(xte, yte, classes)
    rows = []
    for name in args.arch:
        recipe = dict(architectures.RECIPES.get(name, {}))
        for key in ("epochs", "lr", "batch_size", "optimizer"):
            if getattr(args, key) is not None:
                recipe[key] = getattr(args, key)
        adv = {} if args.adversarial is None else {"adversarial": args.adversarial, "eps": args.eps}
        t0 = time.perf_counter()
        backend = _backend_arg(args)
        arch = build(name, seed=args.seed, num_classes=len(classes) if classes else 10,
                     data=(xtr, ytr))
        model, hist = train(arch, xtr, ytr, seed=args.seed,
                            progress=not args.quiet and None,
                            backend=backend, **recipe, **adv)
        secs = time.perf_counter() - t0
        out = args.out or (f"{args.out_dir.rstrip('/')}/{name}.npz" if args.out_dir else None)
        if out is None:
            # Nothing asked for: keep it where `--model NAME` (and advkern.nets.zoo) looks,
            # under the same key a first use with these settings would have trained.
            from .nets import zoo
            key = {k: v for k, v in recipe.items()
                   if architectures.RECIPES.get(name, {}).get(k) != v}
            if classes:
                key["classes"] = classes
            out = str(zoo.cache_path(name, args.seed, **key, **adv))
        save(model, out)
        rows.append((name + (f"+{args.adversarial}" if args.adversarial else ""),
                     recipe.get("epochs"), f"{100 * model.accuracy(xtr, ytr):.2f}%",
                     f"{100 * model.accuracy(xte, yte):.2f}%", f"{secs:.1f}", backend,
                     out or "-"))
    print(_table(["model", "epochs", "train acc", "test acc", "seconds", "backend",
                  "saved to"], rows))
    return 0


# ----------------------------------------------------------------------------- info


def cmd_info(args):
    from .nets import load_model

    model = load_model(args.model)
    print(f"model {model.name or '-'}: input (N, {', '.join(map(str, model.input_shape))}), "
          f"{model.num_logits} logit(s), {model.num_params:,} parameters, dtype {model.dtype}")
    rows = [(i, desc, "(N, " + ", ".join(map(str, shape)) + ")", f"{n:,}")
            for i, desc, shape, n in model.summary()]
    print(_table(["#", "layer", "output shape", "params"], rows))
    return 0


# ----------------------------------------------------------------------------- attacks


def _model(spec, quiet=False):
    """A model from a bundled architecture name (trained and cached on first use) or a file."""
    from .nets import ARCHITECTURES, load_model
    from .nets.zoo import pretrained

    if spec in ARCHITECTURES:
        return pretrained(spec, progress=None if not quiet else False)
    return load_model(spec)


def _data(args, model=None):
    """(x, y) from --data FILE.npz (arrays x, y) or the bundled test split; first --n images."""
    import numpy as np

    from ._validate import check_int
    from .nets.datasets import load_mnist

    if getattr(args, "data", None):
        z = _npz(args.data)
        if "x" not in z or "y" not in z:
            raise AdvkernError(f"{args.data}: needs arrays 'x' and 'y', has {sorted(z)}")
        x, y = z["x"], z["y"]
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255
        if model is not None and x.ndim == len(model.input_shape):
            x = x.reshape(len(x), *model.input_shape)
    else:
        x, y = load_mnist("test", dtype=np.float64 if getattr(args, "dtype", None) == "float64"
                          else np.float32)
    if args.n is not None:
        n = check_int(args.n, "--n")
        if n > len(x):
            raise AdvkernError(f"--n {n} exceeds the {len(x)} images available")
        x, y = x[:n], y[:n]
    return x, y


def _npz(path):
    """All arrays of an .npz file (no pickle); a defect is one AdvkernError line."""
    import zipfile

    import numpy as np

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
        raise AdvkernError(f"{path}: not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (FileNotFoundError, IsADirectoryError, AdvkernError):
        raise
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise AdvkernError(f"{path}: contains pickled objects; advkern never unpickles") \
                from None
        raise AdvkernError(f"{path}: not a readable .npz ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise AdvkernError(f"{path}: not a readable .npz ({e})") from None


def _json_safe(obj):
    """NaN/inf -> None so the output is strict JSON (jq, JSON.parse)."""
    import math
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _attack_kwargs(args):
    target = args.target
    if target is not None and target != "next":
        try:
            target = int(target)
        except ValueError:
            raise AdvkernError(f"--target must be a class index or 'next', got {target!r}") from None
    kw = {"eps": args.eps, "alpha": args.alpha, "steps": args.steps, "norm": args.norm,
          "decay": args.decay, "overshoot": args.overshoot, "max_iter": args.max_iter,
          "candidates": args.candidates, "kappa": args.kappa,
          "initial_const": args.initial_const, "search_steps": args.search_steps,
          "lr": args.lr, "loss": args.loss, "theta": args.theta, "gamma": args.gamma, "pixels": args.pixels,
          "popsize": args.popsize, "generations": args.generations}
    if args.random_start:
        kw["random_start"] = True
    if args.restarts is not None:
        kw["restarts"] = args.restarts
    if args.early_stop:
        kw["early_stop"] = True
    if args.targeted or args.attack in ("jsma", "jsma1", "lbfgs"):
        kw["targeted"] = True
        kw["target"] = target if target is not None else \
            ("next" if args.attack in ("jsma", "jsma1", "lbfgs") else None)
    elif target is not None:
        raise AdvkernError("--target needs --targeted")
    return kw


def _backend_arg(args):
    """The --backend flag resolved ('auto' -> the fastest here; 'reference' stays)."""
    from .kernels import resolve
    return resolve(getattr(args, "backend", None) or "auto")


def _fmt(v, pct=False):
    import math
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}%" if pct else (f"{v:.4g}" if isinstance(v, float) else str(v))


def _scalar_metrics(m):
    return {k: v for k, v in m.items() if not hasattr(v, "shape")}


def _need_matplotlib(flag):
    """Fail before any work when a picture is asked for and cannot be drawn."""
    try:
        import matplotlib
    except ImportError:
        raise AdvkernError(f"{flag} needs matplotlib: pip install 'advkern[plot]'") from None
    matplotlib.use("Agg")


def cmd_attack(args):
    import json

    import numpy as np

    from .attacks import run_attack

    if _on_cluster(args):
        return _attack_on_cluster(args)
    if args.png:
        _need_matplotlib("--png")
    if args.out:
        _writable_file(args.out)
    model = _model(args.model, args.json)
    x, y = _data(args, model)
    run = run_attack(model, x, y, args.attack, seed=args.seed, progress=None if not args.json
                     else False, backend=_backend_arg(args), **_attack_kwargs(args))
    m = run.metrics
    if args.out:
        extra = {f"info_{k}": v for k, v in run.info.items()
                 if k not in ("pred", "pred_adv", "success", "l0", "l2", "linf")}
        per = run.info
        # to an open file, so numpy writes exactly args.out (it appends .npz to a name)
        with open(args.out, "wb") as fout:
            np.savez_compressed(fout, x=x, x_adv=run.x_adv, y=y, pred=per["pred"],
                                pred_adv=per["pred_adv"], success=per["success"],
                                l0=per["l0"], l2=per["l2"], linf=per["linf"],
                                params=np.array(json.dumps(run.params, default=str)), **extra)
    if args.png:
        _panels(model, x, y, run.x_adv, args.png, args.png_max)
    if args.json:
        print(json.dumps(_json_safe({"model": args.model, "params": run.params,
                                     "metrics": _scalar_metrics(m), "seconds": run.seconds}),
                         default=str))
        return 0
    print(f"{args.attack} on {args.model} ({run.params['backend']} backend): {len(x)} images, "
          f"{run.seconds:.2f} s ({1000 * run.seconds / max(len(x), 1):.2f} ms/image)")
    print(_table(["clean acc", "adv acc", "success", "success | correct", "mean L0 (px)", "mean L2",
                  "mean Linf"],
                 [(_fmt(m["clean_accuracy"], True), _fmt(m["adversarial_accuracy"], True),
                   _fmt(m["success_rate"], True), _fmt(m["success_rate_on_correct"], True),
                   _fmt(m["mean_l0"]), _fmt(m["mean_l2"]), _fmt(m["mean_linf"]))]))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _panels(model, x, y, x_adv, folder, limit):
    """The classic figure per image: original, perturbation (magnified), adversarial."""
    import os

    import numpy as np

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AdvkernError("--png needs matplotlib: pip install 'advkern[plot]'") from None
    from .reference.losses import softmax

    os.makedirs(folder, exist_ok=True)
    n = min(len(x), limit)
    p0, p1 = softmax(model.logits(x[:n])), softmax(model.logits(x_adv[:n]))
    for i in range(n):
        img = lambda a: a[i].transpose(1, 2, 0).squeeze()  # noqa: E731
        d = img(x_adv) - img(x)
        m = np.abs(d).max() or 1.0
        fig, ax = plt.subplots(1, 3, figsize=(7.5, 2.8))
        ax[0].imshow(img(x), cmap="gray", vmin=0, vmax=1)
        ax[0].set_title(f"{p0[i].argmax()} ({100 * p0[i].max():.1f}%)  [true {y[i]}]", fontsize=9)
        ax[1].imshow(d, cmap="seismic", vmin=-m, vmax=m)
        ax[1].set_title(f"perturbation (x{1 / m:.3g})", fontsize=9)
        ax[2].imshow(img(x_adv), cmap="gray", vmin=0, vmax=1)
        ax[2].set_title(f"{p1[i].argmax()} ({100 * p1[i].max():.1f}%)", fontsize=9)
        for a in ax:
            a.axis("off")
        fig.tight_layout()
        fig.savefig(os.path.join(folder, f"panel_{i:04d}.png"), dpi=90)
        plt.close(fig)


def cmd_grad(args):
    import numpy as np

    from .reference.network import forward, jacobian, loss_and_input_grad

    model = _model(args.model)
    x, y = _data(args, model)
    dt = np.dtype(args.dtype)
    x = x.astype(dt)
    logits, _ = forward(model, x)
    loss, g = loss_and_input_grad(model, x, y, args.loss)
    jac = jacobian(model, x)
    np.savez_compressed(args.out, x=x, y=y, logits=logits, loss=loss, grad=g, jacobian=jac,
                        loss_name=np.array(args.loss))
    print(f"wrote {args.out}: logits {logits.shape}, grad {g.shape}, jacobian {jac.shape} "
          f"({dt}; grad is d(sum of per-image {args.loss} losses)/dx)")
    return 0


def cmd_verify(args):
    import json

    if not (math.isfinite(args.tie_rtol) and args.tie_rtol >= 0):
        raise AdvkernError(f"--tie-rtol must be finite and >= 0, got {args.tie_rtol}")


    from .attacks import run_attack
    from .verify import compare

    model = _model(args.model, args.json)
    cand = _npz(args.candidate)
    if "x_adv" not in cand:
        raise AdvkernError(f"{args.candidate}: needs an array 'x_adv', has {sorted(cand)}")
    if "x" in cand and "y" in cand:
        x, y = cand["x"], cand["y"]
    else:
        args.n = len(cand["x_adv"]) if args.n is None else args.n
        x, y = _data(args, model)
    kw = _attack_kwargs(args)
    # a random start given with the candidate (x_start): verify replays the reference from it
    x_start = cand.get("x_start")
    ours = None if x_start is not None else \
        run_attack(model, x.astype(cand["x_adv"].dtype, copy=False)
                   if cand["x_adv"].dtype.kind == "f" else x, y, args.attack, seed=args.seed,
                   progress=False, backend=_backend_arg(args), **kw)
    report = compare(model, x, y, ours, cand["x_adv"], args.attack, kw, args.tie_rtol,
                     x_start=x_start)
    if args.json:
        print(json.dumps(_json_safe(report), default=float))
        return 0 if report["summary"]["agree"] else 1
    # The images that differ come first (in index order); identical ones fill the rest.
    imgs = report["images"]
    shown = ([r for r in imgs if r["n_diff"]] + [r for r in imgs if not r["n_diff"]])[:args.show]
    rows = [(r["index"], r["max_abs_diff"], f"{100 * r['frac_equal']:.2f}%", r["n_diff"],
             r["n_tie"] if r["n_tie"] is not None else "n/a") for r in shown]
    s = report["summary"]
    l2 = s.get("tie_analysis") == "l2"
    print(_table(["image", "max |diff|", "pixels equal", "pixels differ",
                  "of which ties" if l2 else "of which sign ties"], rows))
    print(f"\n{s['images_identical']}/{s['n']} images identical; max |diff| {s['max_abs_diff']:.3g}; "
          f"{100 * s['frac_equal']:.3f}% of pixels equal; "
          + (f"{s['diff_explained_by_ties']}/{s['n_diff']} differing pixels are "
             + ("L2-step ties (float32 rounding bound, zero or saturated steps, ReLU kinks)"
                if l2 else "gradient-sign ties")
             if s["diff_explained_by_ties"] is not None
             else s.get("tie_note") or "tie analysis n/a for this attack"))
    if s.get("ties_by_class") and s["n_diff"]:
        print("ties by class: " + ", ".join(f"{k} {v}" for k, v in s["ties_by_class"].items())
              + " (advkern.verify explains the classes)")
    return 0 if s["agree"] else 1


def cmd_sweep(args):
    from .attacks import run_attack

    if args.png:
        _need_matplotlib("--png")

    try:
        eps_list = [float(e) for e in args.eps.split(",") if e.strip()]
    except ValueError:
        raise AdvkernError(f"--eps must be comma-separated numbers, got {args.eps!r}") from None
    if not eps_list:
        raise AdvkernError("--eps needs at least one value")
    if _on_cluster(args):
        return _sweep_on_cluster(args, eps_list)
    model = _model(args.model)
    x, y = _data(args, model)
    kw = {"alpha": args.alpha, "steps": args.steps, "norm": args.norm} if args.attack == "pgd" else {}
    rows, accs = [], []
    for e in eps_list:
        if e == 0:
            acc = model.accuracy(x, y)
        else:
            kw_e = dict(kw)
            if args.attack == "pgd" and args.alpha is None:
                kw_e["alpha"] = max(e / 10, 1e-4)  # scale the default step with eps
            acc = run_attack(model, x, y, args.attack, seed=args.seed, eps=e,
                             **kw_e).metrics["adversarial_accuracy"]
        accs.append(acc)
        rows.append((f"{e:g}", f"{100 * acc:.2f}%"))
    print(_table(["eps", "accuracy"], rows))
    if args.png:
        _sweep_png(args, eps_list, accs)
    return 0


def _sweep_png(args, eps_list, accs):
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(eps_list, 100 * np.array(accs), "o-")
    ax.set_xlabel("eps")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{args.attack} on {args.model}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)
    print(f"wrote {args.png}")


# -- attack / sweep on a Dask cluster (advkern.distributed) --------------------------------


def _on_cluster(args):
    """True with --scheduler; the cluster-only flags without it are an error."""
    if getattr(args, "scheduler", None):
        return True
    for flag in ("out_dir", "resume", "chunk"):
        if getattr(args, flag, None) not in (None, False):
            raise AdvkernError(f"--{flag.replace('_', '-')} needs --scheduler")
    return False


def _cluster_data(args):
    """--data for advkern.distributed: a split name, FILE.npz, or two files X,Y (.npy or
    IDX); default the bundled test split. Only the workers read the images."""
    spec = getattr(args, "data", None) or "test"
    return tuple(spec.split(",", 1)) if "," in spec else spec


def _cluster_kw(args):
    from .distributed import DEFAULT_CHUNK

    return {"client": args.scheduler, "chunk": DEFAULT_CHUNK if args.chunk is None else args.chunk, "seed": args.seed,
            "out": args.out_dir, "resume": args.resume, "n": args.n, "keep_x_adv": False}


def _attack_on_cluster(args):
    """``advkern attack ... --scheduler``: the attack sharded over a Dask cluster; the same
    report (and JSON) as one process, with each chunk written to --out-dir as it finishes."""
    import json

    from . import distributed

    if args.out or args.png:
        raise AdvkernError("--out and --png are for one process: with --scheduler the "
                           "adversarial images and per-image results go, chunk by chunk, to "
                           "--out-dir")
    model = _model(args.model, args.json)
    params = {k: v for k, v in _attack_kwargs(args).items() if v is not None}
    run = distributed.evaluate(model, _cluster_data(args), args.attack, params,
                               backend=args.backend or "auto",
                               progress=False if args.json else None, **_cluster_kw(args))
    m, n = run.metrics, run.metrics["n"]
    if args.json:
        print(json.dumps(_json_safe({"model": args.model, "params": run.params,
                                     "metrics": _scalar_metrics(m), "seconds": run.seconds,
                                     "scheduler": args.scheduler, "out_dir": args.out_dir}),
                         default=str))
        return 0
    print(f"{args.attack} on {args.model} ({run.params['backend']} backend, Dask "
          f"{args.scheduler}): {n} images, {run.seconds:.2f} s "
          f"({1000 * run.seconds / max(n, 1):.2f} ms/image)")
    print(_table(["clean acc", "adv acc", "success", "success | correct", "mean L0 (px)",
                  "mean L2", "mean Linf"],
                 [(_fmt(m["clean_accuracy"], True), _fmt(m["adversarial_accuracy"], True),
                   _fmt(m["success_rate"], True), _fmt(m["success_rate_on_correct"], True),
                   _fmt(m["mean_l0"]), _fmt(m["mean_l2"]), _fmt(m["mean_linf"]))]))
    if args.out_dir:
        print(f"wrote {args.out_dir} (manifest.json and one .npz per chunk)")
    return 0


def _sweep_on_cluster(args, eps_list):
    """``advkern sweep ... --scheduler``: every eps one run of advkern.distributed.sweep
    (the model shipped once, the images read once); eps 0 is the attack at eps 0 (x itself,
    so the clean accuracy)."""
    from . import distributed

    if args.png:
        _need_matplotlib("--png")
    model = _model(args.model)
    runs = []
    for e in eps_list:
        kw = {"eps": e}
        if args.attack == "pgd":
            kw.update(alpha=args.alpha if args.alpha is not None else max(e / 10, 1e-4),
                      steps=args.steps, norm=args.norm)
        runs.append((args.attack, kw))
    res = distributed.sweep(model, _cluster_data(args), runs, progress=None,
                            **_cluster_kw(args))
    accs = [r.metrics["adversarial_accuracy"] for r in res]
    print(_table(["eps", "accuracy"], [(f"{e:g}", f"{100 * a:.2f}%")
                                       for e, a in zip(eps_list, accs)]))
    if args.out_dir:
        print(f"wrote {args.out_dir} (a folder per eps: manifest.json, one .npz per chunk)")
    if args.png:
        _sweep_png(args, eps_list, accs)
    return 0


def cmd_bench(args):
    """``python -m bench`` (bench/ lives in the source checkout, beside the package)."""
    import importlib
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path and (Path(root) / "bench" / "run.py").exists():
        sys.path.insert(0, root)
    try:
        run = importlib.import_module("bench.run")
    except ImportError:
        if any(a in ("-h", "--help") for a in args.args):
            print("usage: advkern bench [--quick] [--gpu] [--backends B1,B2] [--only ITEMS] "
                  "[--out DIR] ...\n\nValidates every backend against the NumPy reference, "
                  "then times primitives and whole attacks. The benchmark lives in the source "
                  "checkout (bench/, beside the package), which this installation does not "
                  "have: run it from a clone of the repository.")
            return 0
        raise AdvkernError("advkern bench needs a source checkout (the bench/ folder): "
                           "run it from the repository, or use python -m bench there") from None
    return run.main(args.args)


def cmd_experiment(args):
    import json

    from . import experiments

    from ._threads import single_threaded_blas

    mod = experiments.get(args.name)
    out = None if args.no_report else (args.out or os.path.join("advkern-report", args.name))
    # the quick form: the demo's workload, measured (``_threads``); the full form keeps
    # BLAS's threads for its larger reference passes (the VAEs' training)
    with single_threaded_blas() if args.quick else contextlib.nullcontext():
        res = mod.run(models=args.model, out=out, backend=_backend_arg(args), quick=args.quick,
                      seed=args.seed)
    if args.json:
        from .experiments._common import _json_default
        print(json.dumps(res, default=_json_default))
        return 0
    rows = [(t["name"], t["measured"], t["target"],
             "-" if t["pass"] is None else ("pass" if t["pass"] else "FAIL"))
            for t in res["targets"]]
    print(_table(["figure", "measured", "target", "verdict"], rows))
    with_t = [t for t in res["targets"] if t["pass"] is not None]
    print(f"\n{sum(t['pass'] for t in with_t)} of {len(with_t)} targets met; "
          f"{res['seconds']:.0f} s on the {res['backend']} backend")
    if out is not None:
        print(f"wrote {out}/results.json and {len(res['figures'])} pictures")
    return 0


def cmd_demo(args):
    from ._threads import single_threaded_blas
    from .demo import background_compile, run_demo

    backend = _backend_arg(args)
    with single_threaded_blas(), background_compile(backend):
        return run_demo(quick=args.quick, seed=args.seed, backend=backend,
                        out=None if args.no_report else args.out,
                        experiments=args.experiments)


# ----------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with advkern's error format: one 'advkern: error:' line (with the command
    whose arguments were wrong) and exit status 2, as every other CLI error."""

    def error(self, message):
        where = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"advkern: error: {where}{message} (see {self.prog} --help)\n")


def build_parser():
    p = _Parser(prog="advkern", description="The math of adversarial examples, "
                                "framework-free: reference attacks, models and kernels.")
    p.add_argument("--version", action="version", version=f"advkern {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           parser_class=_Parser)

    t = sub.add_parser("train", help="train bundled architectures on the bundled MNIST split")
    t.add_argument("--arch", nargs="+", default=["mlp", "cnn"], metavar="NAME",
                   help="architectures: mlp, cnn, logreg, softmax, maxout, rbf (default: mlp cnn)")
    t.add_argument("--epochs", type=int, help="epochs (default: the architecture's recipe)")
    t.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    t.add_argument("--batch-size", type=int, help="minibatch size (default: 64)")
    t.add_argument("--optimizer", choices=["adam", "sgd"], help="default: adam")
    t.add_argument("--adversarial", choices=["fgsm", "pgd"],
                   help="adversarial training objective (FGSM mixed or PGD)")
    t.add_argument("--eps", type=float, default=0.1, help="adversarial training eps (0.1)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--classes", metavar="A,B", help="train on these digits only, relabelled "
                   "0, 1, ... in the order given (logreg on two: binary logistic regression)")
    t.add_argument("--out", help="weight file to write (.npz), for one architecture "
                                 "(default: the model cache, where --model NAME finds it)")
    t.add_argument("--out-dir", help="folder to write NAME.npz files into")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--backend", default="auto",
                   help="where the gradients run: 'auto' (default: $ADVKERN_BACKEND or the "
                        "fastest here), 'reference' (the NumPy specification) or a backend")
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("info", help="layers, shapes and parameter counts of a model file")
    i.add_argument("model", help="native .npz or .onnx file")
    i.set_defaults(func=cmd_info)

    def attack_flags(a, with_out=True):
        a.add_argument("--model", default="mlp",
                       help="a bundled architecture (mlp, cnn, logreg; trained and cached on "
                            "first use), or a .npz / .onnx file (default: mlp)")
        a.add_argument("--attack", required=True, choices=ATTACK_CHOICES)
        a.add_argument("--norm", choices=["inf", "2", "1"], help="PGD norm (default inf)")
        a.add_argument("--eps", type=float, help="radius (fgsm 0.1, pgd 0.3, ...)")
        a.add_argument("--alpha", type=float, help="step length (pgd 0.01)")
        a.add_argument("--steps", type=int, help="iterations (pgd 40)")
        a.add_argument("--loss", choices=["ce", "cw"], help="cross-entropy or C&W margin")
        a.add_argument("--decay", type=float, help="MI-FGSM momentum decay mu (1.0)")
        a.add_argument("--overshoot", type=float, help="DeepFool overshoot (0.02)")
        a.add_argument("--max-iter", type=int, help="DeepFool iterations at most (50)")
        a.add_argument("--candidates", type=int,
                       help="DeepFool: classes considered, the top logits (10)")
        a.add_argument("--kappa", type=float, help="C&W confidence margin (0)")
        a.add_argument("--initial-const", type=float, help="C&W first c (1.0)")
        a.add_argument("--search-steps", type=int, help="C&W binary-search rounds (9)")
        a.add_argument("--lr", type=float, help="C&W Adam learning rate (0.1)")
        a.add_argument("--random-start", action="store_true")
        a.add_argument("--restarts", type=int)
        a.add_argument("--early-stop", action="store_true",
                       help="stop updating an image once it is adversarial")
        a.add_argument("--targeted", action="store_true")
        a.add_argument("--target", help="target class index, or 'next' = (y + 1) mod 10")
        a.add_argument("--theta", type=float, help="JSMA feature change (1.0)")
        a.add_argument("--gamma", type=float, help="JSMA max fraction of features (0.1)")
        a.add_argument("--pixels", type=int, help="pixel attack: pixels changed (1)")
        a.add_argument("--popsize", type=int, help="pixel attack: population (400)")
        a.add_argument("--generations", type=int, help="pixel attack: generations (100)")
        a.add_argument("--n", type=int, help="first N images (default: all)")
        a.add_argument("--data", help=".npz with arrays x (N,1,28,28) and y (default: "
                                      "the bundled MNIST test split)")
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--json", action="store_true", help="one JSON object on stdout")
        a.add_argument("--backend", default="auto",
                       help="'auto' (default: $ADVKERN_BACKEND or the fastest here: a GPU backend, "
                            "else numba_cpu), 'reference' (the NumPy specification) or a "
                            "backend: numpy, numba_cpu, cupy, numba_cuda")

    def cluster_flags(c):
        c.add_argument("--scheduler", metavar="SPEC",
                       help="shard the images over a Dask cluster: local:N (N worker "
                            "processes here) or a scheduler address tcp://host:port; "
                            "--data may then also be X.npy,Y.npy or an IDX pair "
                            "IMAGES,LABELS (needs advkern[dask])")
        c.add_argument("--out-dir", metavar="DIR",
                       help="with --scheduler: write manifest.json and each chunk's .npz "
                            "here as it finishes")
        c.add_argument("--resume", action="store_true",
                       help="with --scheduler: finish the run in --out-dir (skip the chunks "
                            "already there)")
        c.add_argument("--chunk", type=int, help="with --scheduler: images per task (250)")

    ATTACK_CHOICES = ["fgsm", "fgm", "bim", "pgd", "mifgsm", "deepfool", "cw", "lbfgs",
                      "jsma", "jsma1", "pixel", "linear"]
    a = sub.add_parser("attack", help="run an attack on the bundled test split and report")
    attack_flags(a)
    a.add_argument("--out", help="write x, x_adv, y, pred, pred_adv, success, l0, l2, linf, "
                                 "params to this .npz")
    a.add_argument("--png", metavar="DIR", help="write a panel per image (needs matplotlib)")
    a.add_argument("--png-max", type=int, default=16, help="at most this many panels (16)")
    cluster_flags(a)
    a.set_defaults(func=cmd_attack)

    g = sub.add_parser("grad", help="logits, loss input-gradients and logit Jacobians")
    g.add_argument("--model", default="mlp")
    g.add_argument("--n", type=int, default=10)
    g.add_argument("--data")
    g.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    g.add_argument("--loss", choices=["ce", "cw"], default="ce")
    g.add_argument("--out", required=True)
    g.set_defaults(func=cmd_grad)

    v = sub.add_parser("verify", help="compare another implementation's x_adv with ours")
    attack_flags(v)
    v.add_argument("--candidate", required=True,
                   help=".npz with x_adv (and x, y; else the first len(x_adv) test images; "
                        "for --random-start pgd optionally x_start, the start it drew)")
    v.add_argument("--tie-rtol", type=float, default=1e-4,
                   help="|grad| <= tie_rtol * max|grad| counts as a sign tie (1e-4)")
    v.add_argument("--show", type=int, default=20, help="images listed (20)")
    v.set_defaults(func=cmd_verify)

    w = sub.add_parser("sweep", help="accuracy versus eps (and a PNG plot with matplotlib)")
    w.add_argument("--model", default="mlp")
    w.add_argument("--attack", choices=["fgsm", "pgd"], default="fgsm")
    w.add_argument("--eps", default="0,0.05,0.1,0.15,0.2,0.25,0.3")
    w.add_argument("--alpha", type=float)
    w.add_argument("--steps", type=int, default=20)
    w.add_argument("--norm", choices=["inf", "2", "1"], default="inf")
    w.add_argument("--n", type=int)
    w.add_argument("--data")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--png", metavar="FILE")
    cluster_flags(w)
    w.set_defaults(func=cmd_sweep)

    b = sub.add_parser("bench", add_help=False, prefix_chars="+",
                       help="validate, then time, every backend (source checkout; "
                            "advkern bench --help)")
    b.add_argument("args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("experiment", help="the seeds' other experiments: "
                       "vae-detect, distillation, fooling, representation, transfer, linearity")
    e.add_argument("name", metavar="NAME",
                   help="vae-detect, distillation, fooling, representation, transfer, linearity")
    e.add_argument("--model", nargs="+", metavar="MODEL",
                   help="bundled architectures or model files (default: the experiment's)")
    e.add_argument("--out", metavar="DIR",
                   help="folder for results.json and the PNGs (default ./advkern-report/NAME)")
    e.add_argument("--no-report", action="store_true", help="print the table only")
    e.add_argument("--json", action="store_true", help="the results as one JSON object")
    e.add_argument("--quick", action="store_true", help="the small version the demo runs")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--backend", default="auto",
                   help="'auto' (default), 'reference' or a backend name")
    e.set_defaults(func=cmd_experiment)

    d = sub.add_parser("demo", help="reproduce the seeds' headline results on bundled MNIST")
    d.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    d.add_argument("--out", default="advkern-report", metavar="DIR",
                   help="report folder: results.json, report.md, PNG pictures "
                        "(default ./advkern-report)")
    d.add_argument("--no-report", action="store_true", help="print the table only")
    d.add_argument("--experiments", default="all", metavar="NAMES",
                   help="the seeds' other experiments to run in their quick form after the "
                        "attacks: 'all' (default), 'none', or names separated by commas "
                        "(see advkern experiment)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--backend", default="auto",
                   help="'auto' (default: $ADVKERN_BACKEND or the fastest here: a GPU backend, "
                        "else numba_cpu), 'reference' (the NumPy specification) or a "
                        "backend: numpy, numba_cpu, cupy, numba_cuda")
    d.set_defaults(func=cmd_demo)
    return p


def _version():
    from . import __version__
    return __version__


def _run(args):
    """The command, with the Python warnings it raises printed as one 'advkern: note:' line
    each (not Python's two-line warning format) when it ends."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            return args.func(args)
        finally:
            for w in caught:
                print(f"advkern: note: {w.message}", file=sys.stderr)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (AdvkernError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        msg = str(e) if not isinstance(e, OSError) or not e.filename else \
            f"{e.strerror}: {e.filename}"
        print(f"advkern: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("advkern: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
