"""The ``numba_cuda`` backend: the GPU driver shared with ``cupy`` (``advkern.kernels._gpu``)
with every custom kernel written in Python as a ``numba.cuda.jit`` kernel (``ops``).

On a GPU: arrays are CuPy arrays (``xp = cupy``), GEMMs go through cuBLAS via
``cupy.matmul`` on the same device arrays, and the numba kernels read and write those arrays
through ``__cuda_array_interface__``. Needs a CUDA driver, numba-cuda and CuPy.

Under the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported): arrays
are NumPy arrays (``xp = numpy``), every kernel runs in Python thread by thread, and the
backend is available without a GPU, slowly; this is how CI exercises every kernel. It is
listed by ``kernels.available()`` only then or when a GPU is present.
"""

import os

# numba synchronises on the producer's stream each time it imports a CuPy array through
# __cuda_array_interface__ (one sync per kernel launch) unless told not to; both libraries
# use the same default stream here, so the sync orders nothing and only stalls the queue.
os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")

import numpy as np  # noqa: E402

from .._gpu.backend import export  # noqa: E402

NAME = "numba_cuda"

from . import ops  # noqa: E402

SIMULATED = ops.SIM
_KW = {}
if ops.SIM:
    xp = np
    _OOM = (MemoryError,)
    # Small chunks, so that the tiny test batches go through the chunked paths: 256 KiB is
    # a few images of the tests' small cnn per chunk (one per chunk multiplied every launch).
    _KW = {"chunk_bytes": 1 << 18}
else:
    from numba import cuda

    try:
        cuda.config.CUDA_ARRAY_INTERFACE_SYNC = False  # numba imported before us
    except AttributeError:
        pass
    if not cuda.is_available():
        raise ImportError("no CUDA GPU or driver found (numba.cuda.is_available() is False); "
                          "set NUMBA_ENABLE_CUDASIM=1 for the simulator")
    try:
        import cupy as xp
    except ImportError as e:
        raise ImportError(f"the numba_cuda backend needs CuPy for its arrays and GEMMs: {e}") \
            from None
    from .._gpu.cuda_env import check_no_tf32
    check_no_tf32()
    _OOM = (xp.cuda.memory.OutOfMemoryError, MemoryError)

export(globals(), xp, ops, _OOM, **_KW)
