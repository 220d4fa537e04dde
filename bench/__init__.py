"""The advkern benchmark harness: ``python -m bench`` (see bench/README.md and bench/run.py).

Validates every available backend against the reference, then times its primitives and
whole attacks beside the ``numpy`` backend, the GEMM bound and (when installed) PyTorch.
Not part of the installed library.
"""
