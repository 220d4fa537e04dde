"""Checks shared by the GPU backends on a real device."""

import os


def check_no_tf32():
    """Refuse CuPy's TF32 mode: its float32 GEMMs keep 10 mantissa bits and would not be
    comparable with the reference (CuPy uses TF32 only when CUPY_TF32=1 is set)."""
    if os.environ.get("CUPY_TF32", "0") not in ("", "0"):
        raise ImportError("CUPY_TF32 is set: advkern's GPU backends need full float32 GEMMs "
                          "(unset CUPY_TF32)")
