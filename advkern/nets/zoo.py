"""Bundled models: the named architectures trained on the bundled MNIST split, cached on disk.

``pretrained(name)`` trains on first use (the recipe in ``architectures.RECIPES``, seeded)
and caches the weight file under ``$ADVKERN_CACHE`` (default ``~/.cache/advkern``); later
calls load the file. The cache key holds the architecture, seed, recipe and library version,
so a changed recipe never serves stale weights.
"""

import hashlib
import json
import os
from pathlib import Path

from .. import __version__
from .architectures import ARCHITECTURES, RECIPES, build
from .datasets import load_mnist
from .io import load, save
from .train import train


def cache_dir():
    """The model cache folder ($ADVKERN_CACHE, default ~/.cache/advkern), created if needed."""
    d = Path(os.environ.get("ADVKERN_CACHE", Path.home() / ".cache" / "advkern"))
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:   # a regular file there, no permission, ...
        from ..errors import AdvkernError
        raise AdvkernError(f"cannot use {d} as the model cache (ADVKERN_CACHE): "
                           f"{e.strerror}") from None
    return d


def cache_path(name, seed=0, **train_kw):
    # The backend that computed the gradients is not part of the key: the backends agree
    # with the reference to float rounding, and a model is the recipe's whatever ran it.
    train_kw.pop("backend", None)
    key = json.dumps({"name": name, "seed": seed, "recipe": {**RECIPES[name], **train_kw},
                      "version": __version__}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / f"{name}-s{seed}-{digest}.npz"


def pretrained(name, seed=0, progress=None, refresh=False, **train_kw):
    """A bundled architecture trained on the bundled train split (cached). Returns a model.

    train_kw override the recipe (e.g. adversarial="fgsm", eps=0.1 for an adversarially
    trained model; they are part of the cache key).
    """
    if name not in ARCHITECTURES:
        build(name)  # raises the unknown-architecture error
    path = cache_path(name, seed, **train_kw)
    if path.exists() and not refresh:
        return load(path)
    x, y = load_mnist("train")
    if progress is not False:
        import sys
        print(f"advkern: training the bundled {name!r} model on first use (cached at {path})",
              file=sys.stderr, flush=True)
    model, _ = train(build(name, seed=seed, data=(x, y)), x, y, seed=seed, progress=progress,
                     label=f"training {name}", **{**RECIPES[name], **train_kw})
    tmp = path.with_suffix(".tmp.npz")
    save(model, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees a half-written file
    return model
