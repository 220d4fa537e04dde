"""Backend registry. Each backend implements the same primitives (the contract).

``available()`` lists the backends that import on this machine; ``get(name)`` returns one;
``resolve("auto")`` names the fastest one here.
The primitives, their shapes and dtypes are documented once, in ``advkern.kernels.contract``.
Importing this package never imports numba, CuPy or CUDA: a backend is imported when asked for.
"""

import importlib
import os

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


# Fastest first: a GPU backend with a real device, then the CPU's njit kernels, then the
# NumPy reference's primitives.
PREFERENCE = ("cupy", "numba_cuda", "numba_cpu", "numpy")
# Names that run the reference implementations (advkern.reference) instead of the engine.
REFERENCE_NAMES = ("reference",)


def _fast_enough(name):
    try:
        be = get(name)
    except AdvkernError:
        return False
    # A simulated / emulated GPU backend (CI's stand-ins) is correct but slow: never picked.
    return not getattr(be, "SIMULATED", False)


def resolve(name="auto"):
    """The backend name a request stands for.

    'auto': ``$ADVKERN_BACKEND`` when set, else the first of PREFERENCE that imports here
    with its device (never a simulated one). 'reference': 'reference' (the NumPy
    specification, run without the engine). Any other name is checked with ``get``.
    Returns the resolved name; AdvkernError for an unknown or unavailable backend.
    """
    if name is None:
        name = "auto"
    if not isinstance(name, str):
        raise AdvkernError(f"backend must be a name ('auto', 'reference', or one of "
                           f"{sorted(_BACKENDS)}), got {type(name).__name__}")
    if name == "auto":
        env = os.environ.get("ADVKERN_BACKEND", "").strip()
        if env and env != "auto":
            return resolve(env)
        for cand in PREFERENCE:
            if _fast_enough(cand):
                return cand
        return "numpy"
    if name in REFERENCE_NAMES:
        return "reference"
    get(name)
    return name
