"""advkern: the math of adversarial examples, framework-free.

A pure-NumPy reference (``advkern.reference``: layers, losses, networks, attacks — the
executable specification), models and data (``advkern.nets``), and fast backends
(``advkern.kernels``) validated against the reference.
"""

__version__ = "0.1.0"

from .errors import AdvkernError, ModelFileError, ShapeError, UnsupportedOpError  # noqa: E402
from .nets import Sequential, build, load, load_model, save  # noqa: E402

__all__ = ["AdvkernError", "ModelFileError", "ShapeError", "UnsupportedOpError", "Sequential",
           "build", "load", "load_model", "save", "__version__"]
