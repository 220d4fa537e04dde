"""The ``cupy`` backend: the GPU driver shared with ``numba_cuda`` (``advkern.kernels._gpu``)
with every custom kernel in CUDA C, compiled by NVRTC through CuPy (``ops``); GEMMs through
cuBLAS (``cupy.matmul``) in float32 and float64 with TF32 off (CuPy uses TF32 only when
``CUPY_TF32=1``, which this backend refuses), so float32 results stay comparable with the
reference.

Available (``kernels.available()``) only when CuPy imports and a CUDA device is present, or
under the CPU emulator: with ``ADVKERN_CUPY_EMULATOR=1`` in the environment (the tests set it
when no CUDA driver is found) CuPy is not imported; the same CUDA C runs as host C++ compiled
by g++ (``_emulator``), arrays are NumPy arrays (``xp = numpy``), and ``SIMULATED`` and
``EMULATED`` are True. That checks the kernels' logic and indexing, not NVRTC, the GPU's math
library or the hardware.
"""

from ._cupy_module import EMULATED, cupy

SIMULATED = EMULATED
_KW = {}
if EMULATED:
    import numpy as xp

    _OOM = (MemoryError,)
    # Small chunks, so that the tiny test batches go through the chunked paths: 256 KiB is
    # a few images of the tests' small cnn per chunk (one per chunk multiplied every launch).
    _KW = {"chunk_bytes": 1 << 18}
else:
    xp = cupy
    try:
        _ndev = xp.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError without a driver
        raise ImportError(f"no CUDA device: {e}") from None
    if _ndev < 1:
        raise ImportError("no CUDA device")

    from .._gpu.cuda_env import check_no_tf32

    check_no_tf32()
    _OOM = (xp.cuda.memory.OutOfMemoryError, MemoryError)

from .._gpu.backend import export  # noqa: E402

from . import ops  # noqa: E402

NAME = "cupy"
export(globals(), xp, ops, _OOM, **_KW)
