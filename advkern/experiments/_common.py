"""What every experiment shares: the output folder, targets, figures, results.json."""

import datetime
import json
import os
import sys
import time

import numpy as np

from ..errors import AdvkernError


def _stderr(msg):
    print(msg, file=sys.stderr, flush=True)


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def writable_folder(out, what="the results"):
    """Create ``out`` (and parents) or raise AdvkernError: checked before any work."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise AdvkernError(f"cannot write {what} to {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise AdvkernError(f"cannot write {what} to {out}: not writable")


def load_models(models, default):
    """{name: model} from bundled architecture names or model files (None: ``default``)."""
    from ..nets import ARCHITECTURES, load_model
    from ..nets.zoo import pretrained

    specs = list(default if models is None else models)
    if not specs:
        raise AdvkernError("models: give at least one model")
    out = {}
    for s in specs:
        if not isinstance(s, str):
            raise AdvkernError(f"models: expected architecture names or model files, got {s!r}")
        out[s] = pretrained(s) if s in ARCHITECTURES else load_model(s)
    return out


class Context:
    """One experiment's bookkeeping: ``ctx = Context(NAME, SUMMARY, out, backend, quick,
    seed, log)``; ``ctx.stage(msg)`` logs a progress line with the elapsed time;
    ``ctx.target(...)`` records a figure and its verdict; ``ctx.figure(key)`` gives the PNG
    path to draw (None when nothing is written); ``ctx.finish(**numbers)`` returns the
    results dict and writes results.json."""

    def __init__(self, name, summary, out=None, backend="auto", quick=False, seed=0,
                 log=None):
        from .. import kernels
        from .._validate import check_int

        self.t0 = time.perf_counter()
        self.name, self.summary = name, summary
        self.backend = kernels.resolve("reference" if backend is None else backend)
        self.engine_backend = None if self.backend == "reference" else self.backend
        self.quick, self.seed = bool(quick), check_int(seed, "seed", minimum=0)
        self.log = _stderr if log is None else log
        self.out = None if out is None else os.fspath(out)
        if self.out is not None:
            writable_folder(self.out)
        self.targets, self.figures = [], {}

    def stage(self, msg):
        self.log(f"advkern experiment {self.name}: {msg} "
                 f"({time.perf_counter() - self.t0:.1f} s)")

    def target(self, name, measured, target, ok=None, **values):
        """Record a figure: ``measured`` and ``target`` as text, ``ok`` True/False/None,
        ``values`` the numbers behind the text."""
        rec = {"name": name, "measured": measured, "target": target,
               "pass": None if ok is None else bool(ok), "values": values}
        self.targets.append(rec)
        mark = "" if ok is None else ("  [pass]" if ok else "  [FAIL]")
        self.log(f"  {name}: {measured}{mark}")
        return rec

    def figure(self, key, filename=None):
        """Path for the figure ``key`` under out (None without out); recorded in figures."""
        if self.out is None:
            return None
        fn = filename or f"{key}.png"
        self.figures[key] = fn
        return os.path.join(self.out, fn)

    def finish(self, **numbers):
        from ..demo import _machine
        from .. import __version__

        res = {"experiment": self.name, "summary": self.summary, "backend": self.backend,
               "quick": self.quick, "seed": self.seed,
               "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "seconds": round(time.perf_counter() - self.t0, 2), "advkern": __version__,
               "machine": _machine(), "targets": self.targets, "figures": self.figures,
               **numbers}
        if self.out is not None:
            with open(os.path.join(self.out, "results.json"), "w") as f:
                json.dump(res, f, indent=1, default=_json_default)
        return res
