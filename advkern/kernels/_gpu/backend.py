"""Module-level primitives of a GPU backend from one GpuBackend (what each backend exports)."""

from .core import GpuBackend

EXPORTS = ("to_device", "to_host", "prepare", "logits", "loss_grad", "jacobian", "param_grads",
           "linf_step", "l2_step", "l1_step", "pgd_step", "momentum_step", "jsma_best_pair",
           "jsma_best_feature", "de_step", "de_score")


def export(namespace, xp, ops, oom, **kw):
    """Fill a backend module's namespace with the contract's primitives."""
    be = GpuBackend(xp, ops, oom, **kw)
    for name in EXPORTS:
        namespace[name] = getattr(be, name)
    namespace["_backend"] = be
    return be
