"""The seeds' experiments beyond the headline attacks, one module each.

``advkern experiment NAME`` (CLI) or ``advkern.experiments.run(NAME, ...)`` runs one and
writes ``results.json`` and its PNG figures into a folder. Every experiment module has

- ``NAME`` (the CLI name) and ``SUMMARY`` (one line);
- ``MODELS``: the default ``models`` argument (names of bundled classifiers, or ``()``);
- ``run(*, models=None, out=None, backend="auto", quick=False, seed=0, log=None) -> dict``:
  ``models`` a sequence of bundled architecture names or model files (None: ``MODELS``),
  ``out`` the folder for results.json and figures (None: nothing written), ``backend`` where
  the attacks run ('auto', 'reference' or a backend name), ``quick`` the small version the
  demo runs (<= 60 s on two cores), ``log`` a callable taking one progress line (None:
  stderr). The returned dict is what results.json holds: the common keys written by
  ``advkern.experiments._common.Context.finish`` (experiment, summary, backend, quick, seed,
  seconds, machine, targets, figures) plus the experiment's own numbers.

A target is a dict {name, measured, target, pass, values}: ``pass`` is True / False, or
None for a figure reported without a target.
"""

import importlib

from ..errors import AdvkernError

# CLI name -> module
EXPERIMENTS = {
    "vae-detect": "vae_detect",
    "distillation": "distillation",
    "fooling": "fooling",
    "representation": "representation",
    "transfer": "transfer",
    "linearity": "linearity",
}


def available():
    """Names of the experiments whose module is present (in CLI order)."""
    out = []
    for name, mod in EXPERIMENTS.items():
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise
            continue
        out.append(name)
    return out


def get(name):
    """The module of experiment ``name`` (raises AdvkernError for an unknown name)."""
    if name not in EXPERIMENTS or name not in available():
        raise AdvkernError(f"unknown experiment {name!r}: use one of {available()}")
    return importlib.import_module(f"{__name__}.{EXPERIMENTS[name]}")


def run(name, **kw):
    """Run experiment ``name``; keywords as the module's ``run``. Returns its results dict."""
    return get(name).run(**kw)
