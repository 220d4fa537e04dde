"""The CuPy the ``cupy`` backend runs on, chosen once per process: the real ``cupy``, or with
``ADVKERN_CUPY_EMULATOR=1`` in the environment the CPU emulator
(``advkern.kernels.cupy._emulator``: the backend's CUDA C compiled by g++ as host C++, on
NumPy arrays; what CI uses without a GPU). ``EMULATED`` says which."""

import os

EMULATED = os.environ.get("ADVKERN_CUPY_EMULATOR", "0").strip() not in ("", "0")

if EMULATED:
    from . import _emulator as cupy
else:
    try:
        import cupy
    except ImportError as e:
        raise ImportError(f"CuPy is not installed: {e}") from None

__all__ = ["cupy", "EMULATED"]
