"""The ``advkern`` command line (console script and ``python -m advkern``).

Bad input prints one line ``advkern: error: ...`` on stderr and exits with status 2;
no traceback is shown for errors the user can fix.
"""

import argparse
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


def cmd_train(args):
    from .nets import architectures, build, save
    from .nets.datasets import load_mnist
    from .nets.train import train

    if args.out and len(args.arch) > 1:
        raise AdvkernError("--out takes one architecture; use --out-dir for several")
    xtr, ytr = load_mnist("train")
    xte, yte = load_mnist("test")
    rows = []
    for name in args.arch:
        recipe = dict(architectures.RECIPES.get(name, {}))
        for key in ("epochs", "lr", "batch_size", "optimizer"):
            if getattr(args, key) is not None:
                recipe[key] = getattr(args, key)
        adv = {} if args.adversarial is None else {"adversarial": args.adversarial, "eps": args.eps}
        t0 = time.perf_counter()
        model, hist = train(build(name, seed=args.seed), xtr, ytr, seed=args.seed,
                            progress=not args.quiet and None, **recipe, **adv)
        secs = time.perf_counter() - t0
        out = args.out or (f"{args.out_dir.rstrip('/')}/{name}.npz" if args.out_dir else None)
        if out:
            save(model, out)
        rows.append((name + (f"+{args.adversarial}" if args.adversarial else ""),
                     recipe.get("epochs"), f"{100 * model.accuracy(xtr, ytr):.2f}%",
                     f"{100 * model.accuracy(xte, yte):.2f}%", f"{secs:.1f}", out or "-"))
    print(_table(["model", "epochs", "train acc", "test acc", "seconds", "saved to"], rows))
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


# ----------------------------------------------------------------------------- parser


def build_parser():
    p = argparse.ArgumentParser(prog="advkern", description="The math of adversarial examples, "
                                "framework-free: reference attacks, models and kernels.")
    p.add_argument("--version", action="version", version=f"advkern {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train bundled architectures on the bundled MNIST split")
    t.add_argument("--arch", nargs="+", default=["mlp", "cnn"], metavar="NAME",
                   help="architectures: mlp, cnn, logreg (default: mlp cnn)")
    t.add_argument("--epochs", type=int, help="epochs (default: the architecture's recipe)")
    t.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    t.add_argument("--batch-size", type=int, help="minibatch size (default: 64)")
    t.add_argument("--optimizer", choices=["adam", "sgd"], help="default: adam")
    t.add_argument("--adversarial", choices=["fgsm", "pgd"],
                   help="adversarial training objective (FGSM mixed or PGD)")
    t.add_argument("--eps", type=float, default=0.1, help="adversarial training eps (0.1)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="weight file to write (.npz), for one architecture")
    t.add_argument("--out-dir", help="folder to write NAME.npz files into")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("info", help="layers, shapes and parameter counts of a model file")
    i.add_argument("model", help="native .npz or .onnx file")
    i.set_defaults(func=cmd_info)
    return p


def _version():
    from . import __version__
    return __version__


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
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
