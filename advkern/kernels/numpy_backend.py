"""The ``numpy`` backend: the contract's primitives as the plain NumPy reference.

Every primitive delegates to ``advkern.reference`` (the specification), so this backend is the
yardstick the engine and every fast backend are measured against. Arrays are numpy arrays;
``to_device`` copies, ``to_host`` is the identity.
"""

import sys

import numpy as np

from ..reference import jsma as _jsma
from ..reference import network as _net
from ..reference import pixel as _pixel
from ..reference.losses import get_loss
from ..reference.projections import project, steepest_step
from .contract import composed_momentum_step, composed_pgd_step

NAME = "numpy"
xp = np


def to_device(a, dtype=None):
    return np.array(a, dtype=dtype, copy=True)


def to_host(a):
    return np.asarray(a)


def prepare(model, dtype):
    return model.astype(dtype) if model.dtype != np.dtype(dtype) else model


def logits(net, x):
    return _net.forward(net, x)[0]


def loss_grad(net, x, labels, loss):
    z, caches = _net.forward(net, x)
    values, dz = get_loss(loss)(z, labels)
    dx, _ = _net.backward(net, dz, caches, need_params=False)
    return values, dx, z


def jacobian(net, x, seeds=None):
    jac = _net.jacobian(net, x)
    if seeds is not None:
        jac = np.einsum("nrk,nkd->nrd", np.asarray(seeds, dtype=jac.dtype), jac)
    return jac, logits(net, x)


def param_grads(net, x, labels, loss):
    return _net.loss_and_param_grads(net, x, labels, loss)


def _masked(xa, new, active):
    return np.where(active.reshape((-1,) + (1,) * (xa.ndim - 1)), new, xa)


def linf_step(xa, g, x0, eps, alpha, lo, hi, active):
    new = project(xa + steepest_step(g, alpha, "linf"), x0, eps, "linf", (lo, hi))
    return _masked(xa, new, active)


def l2_step(xa, g, x0, eps, alpha, lo, hi, active):
    new = project(xa + steepest_step(g, alpha, "l2"), x0, eps, "l2", (lo, hi))
    return _masked(xa, new, active)


def l1_step(xa, g, x0, eps, alpha, lo, hi, active, sparsity):
    step = steepest_step(g, alpha, "l1", x=xa, clip=(lo, hi), l1_sparsity=sparsity)
    return _masked(xa, project(xa + step, x0, eps, "l1", (lo, hi)), active)


def pgd_step(net, xa, labels, loss, flip, x0, eps, alpha, lo, hi, active, norm, sparsity=0.95):
    return composed_pgd_step(sys.modules[__name__], net, xa, labels, loss, flip, x0, eps,
                             alpha, lo, hi, active, norm, sparsity)


def momentum_step(xa, g, mom, decay, flip, x0, eps, alpha, lo, hi, active):
    return composed_momentum_step(sys.modules[__name__], np.asarray(xa), np.asarray(g),
                                  np.asarray(mom), decay, flip, x0, eps, alpha, lo, hi, active)


def jsma_best_pair(a, b, domain, theta):
    return _jsma.best_pair(a, b, domain, theta)


def jsma_best_feature(a, b, domain, theta):
    return _jsma.best_feature(a, b, domain, theta)


def de_step(pop, draws, F, CR, lower, upper):
    return _pixel.de_step(pop, draws, F, CR, lower, upper)


def de_score(net, x, labels, pop, targeted):
    n, p = pop.shape[:2]
    images = _pixel.apply_candidates(x, pop)
    fit, pred = _pixel.score_candidates(net, images, np.repeat(labels, p), targeted)
    return fit.reshape(n, p), pred.reshape(n, p)
