"""advkern: the math of adversarial examples, framework-free.

A pure-NumPy reference (``advkern.reference``: layers, losses, networks, attacks — the
executable specification), models and data (``advkern.nets``), and fast backends
(``advkern.kernels``) validated against the reference.
"""

__version__ = "0.1.0"

from .errors import AdvkernError, ModelFileError, ShapeError, UnsupportedOpError  # noqa: E402
from .nets import Sequential, build, load, load_model, save  # noqa: E402


def pretrained(name, seed=0, **train_kw):
    """A bundled model ('mlp', 'cnn', 'logreg', 'softmax', 'maxout', 'rbf'; see
    ``advkern.nets.architectures``) trained on the bundled MNIST split: trained on
    first use (one progress line on stderr says what and where) and cached under
    ``$ADVKERN_CACHE`` (default ``~/.cache/advkern``). See ``advkern.nets.zoo.pretrained``."""
    from .nets.zoo import pretrained as _pretrained
    return _pretrained(name, seed=seed, **train_kw)


def attack(model, x, y, name, *, backend="auto", seed=0, progress=False, **params):
    """Run the attack ``name`` ('fgsm', 'fgm', 'bim', 'pgd', 'jsma', 'jsma1', 'pixel',
    'linear') on (x, y) and evaluate it: an ``AttackRun`` with x_adv, metrics, info, seconds
    and params (``params['backend']`` names the backend that ran). backend: 'auto' (the
    fastest here), 'reference' (the NumPy specification) or a backend name. The attack's
    parameters as keywords (eps, alpha, steps, norm, ...); see ``advkern.attacks.run_attack``.
    """
    from .attacks import run_attack
    return run_attack(model, x, y, name, seed=seed, progress=progress, backend=backend,
                      **params)


__all__ = ["AdvkernError", "ModelFileError", "ShapeError", "UnsupportedOpError", "Sequential",
           "attack", "build", "load", "load_model", "pretrained", "save", "__version__"]
