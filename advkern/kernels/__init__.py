"""Backend registry. Each backend implements the same primitives (the contract).

``available()`` lists the backends that import on this machine; ``get(name)`` returns one.
The primitives, their shapes and dtypes are documented once, in ``advkern.kernels.contract``.
Importing this package never imports numba, CuPy or CUDA: a backend is imported when asked for.
"""

import importlib

from ..errors import AdvkernError

# name -> module path; a backend is imported only when asked for.
_BACKENDS = {
    "numpy": "advkern.kernels.numpy_backend",
    "numba_cpu": "advkern.kernels.numba_cpu",
    "cupy": "advkern.kernels.cupy",
    "numba_cuda": "advkern.kernels.numba_cuda",
}


def register(name, module):
    _BACKENDS[name] = module


def get(name):
    """The backend module called ``name``; AdvkernError if unknown or not importable here."""
    if name not in _BACKENDS:
        raise AdvkernError(f"unknown backend {name!r}: known backends are {sorted(_BACKENDS)}")
    try:
        return importlib.import_module(_BACKENDS[name])
    except ImportError as e:
        raise AdvkernError(f"backend {name!r} is not available here: {e}") from None


def available():
    """Names of the backends that import on this machine."""
    out = []
    for name in _BACKENDS:
        try:
            get(name)
        except AdvkernError:
            continue
        out.append(name)
    return out
