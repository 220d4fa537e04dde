"""The ``numba_cpu`` backend: njit kernels (fused elementwise steps, convolutions, JSMA search,
incremental DE scoring) and BLAS GEMMs, on numpy arrays in host memory.

Implements every primitive of ``advkern.kernels.contract``; tests compare each one, and every
attack run through the engine, with the ``numpy`` backend (the reference).
"""

import os

# With OpenMP's default active waiting, each prange region costs 16-20 ms when the cores are
# contended (measured); passive waiting must be set before numba starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402

import numpy as np  # noqa: E402

from ..contract import composed_pgd_step  # noqa: E402
from .de import de_score, de_step  # noqa: E402
from .nn import (forward_from, jacobian, logits, loss_grad, param_grads,  # noqa: E402
                 pgd_linf_step, prepare, to_device, to_host)
from .steps import (jsma_best_feature, jsma_best_pair, l1_step, l2_step, linf_step,  # noqa: E402
                    momentum_step)

NAME = "numba_cpu"
xp = np

__all__ = ["NAME", "xp", "de_score", "de_step", "forward_from", "jacobian", "logits",
           "loss_grad", "param_grads", "pgd_step", "prepare", "to_device", "to_host",
           "jsma_best_feature", "jsma_best_pair", "l1_step", "l2_step", "linf_step",
           "momentum_step"]


def pgd_step(net, xa, labels, loss, flip, x0, eps, alpha, lo, hi, active, norm, sparsity=0.95):
    """The contract's PGD iteration: L-inf fused (``nn.pgd_linf_step``), L2 / L1 composed
    (their per-image norms need the whole gradient row first)."""
    if norm == "linf":
        return pgd_linf_step(net, xa, labels, loss, flip, x0, eps, alpha, lo, hi, active)
    return composed_pgd_step(sys.modules[__name__], net, xa, labels, loss, flip, x0, eps,
                             alpha, lo, hi, active, norm, sparsity)
