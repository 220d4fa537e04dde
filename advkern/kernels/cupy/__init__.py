"""The ``cupy`` backend: the GPU driver shared with ``numba_cuda`` (``advkern.kernels._gpu``)
with every custom kernel in CUDA C, compiled by NVRTC through CuPy (``ops``); GEMMs through
cuBLAS (``cupy.matmul``) in float32 and float64 with TF32 off (CuPy uses TF32 only when
``CUPY_TF32=1``, which this backend refuses), so float32 results stay comparable with the
reference.

Available (``kernels.available()``) only when CuPy imports and a CUDA device is present.
"""

try:
    import cupy as xp
except ImportError as e:
    raise ImportError(f"CuPy is not installed: {e}") from None

try:
    _ndev = xp.cuda.runtime.getDeviceCount()
except Exception as e:  # CUDARuntimeError without a driver
    raise ImportError(f"no CUDA device: {e}") from None
if _ndev < 1:
    raise ImportError("no CUDA device")

from .._gpu.backend import export  # noqa: E402
from .._gpu.cuda_env import check_no_tf32  # noqa: E402

check_no_tf32()

from . import ops  # noqa: E402

NAME = "cupy"
export(globals(), xp, ops, (xp.cuda.memory.OutOfMemoryError, MemoryError))
