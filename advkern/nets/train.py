"""Training with the NumPy reference: minibatch SGD with momentum or Adam, optionally adversarial.

Objectives (per minibatch B, mean over its samples):

- standard: J(theta) = mean_i CE(f(x_i), y_i);
- ``adversarial="fgsm"`` (Goodfellow et al. 2015, Eq. in Sec. 6):
  J'(theta) = a * J(theta, x, y) + (1 - a) * J(theta, x + eps * sign(grad_x J(theta, x, y)), y),
  a = ``mix`` (0.5 in the paper); the adversarial point is recomputed with the current
  weights at every step and treated as a constant (no gradient through the sign);
- ``adversarial="pgd"`` (Madry et al. 2018): min_theta mean_i max_{||d||_inf <= eps} CE(f(x_i + d), y_i),
  the inner max approximated by L-inf PGD with a random start (``pgd_steps`` steps of
  ``pgd_alpha``), training on the PGD points only.

Adversarial points are clipped to the box ``clip`` (the valid pixel range).
"""

import time

import numpy as np

from .._progress import Progress
from .._validate import check_box, check_int, check_labels, check_positive
from ..errors import AdvkernError
from ..reference.network import (loss_and_input_grad, loss_and_param_grads,
                                 loss_and_param_grads_soft)


class SGD:
    """v <- momentum * v - lr * g;  theta <- theta + v (heavy-ball momentum)."""

    def __init__(self, lr=0.05, momentum=0.9, weight_decay=0.0):
        self.lr, self.momentum, self.wd = lr, momentum, weight_decay
        self.state = None

    def step(self, params, grads):
        if self.state is None:
            self.state = [{k: np.zeros_like(a) for k, a in p.items()} for p in params]
        for p, g, v in zip(params, grads, self.state):
            for k in p:
                gk = g[k] + self.wd * p[k] if self.wd else g[k]
                v[k] *= self.momentum
                v[k] -= self.lr * gk
                p[k] += v[k]


class Adam:
    """Kingma & Ba 2015: m, v moment estimates with bias correction."""

    def __init__(self, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        self.lr, self.b1, self.b2, self.eps, self.wd = lr, beta1, beta2, eps, weight_decay
        self.state, self.t = None, 0

    def step(self, params, grads):
        if self.state is None:
            self.state = [{k: (np.zeros_like(a), np.zeros_like(a)) for k, a in p.items()}
                          for p in params]
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, g, s in zip(params, grads, self.state):
            for k in p:
                gk = g[k] + self.wd * p[k] if self.wd else g[k]
                m, v = s[k]
                m *= self.b1
                m += (1 - self.b1) * gk
                v *= self.b2
                v += (1 - self.b2) * gk * gk
                p[k] -= (self.lr / c1) * m / (np.sqrt(v / c2) + self.eps)


OPTIMIZERS = {"sgd": SGD, "adam": Adam}


def make_optimizer(name, lr=None, **kw):
    if name not in OPTIMIZERS:
        raise AdvkernError(f"unknown optimizer {name!r}: use one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](**({} if lr is None else {"lr": lr}), **kw)


def _fgsm_point(model, xb, yb, eps, clip):
    _, g = loss_and_input_grad(model, xb, yb)
    return np.clip(xb + eps * np.sign(g), *clip).astype(xb.dtype, copy=False)


def _pgd_point(model, xb, yb, eps, alpha, steps, rng, clip):
    x = np.clip(xb + rng.uniform(-eps, eps, xb.shape).astype(xb.dtype), *clip)
    for _ in range(steps):
        _, g = loss_and_input_grad(model, x, yb)
        x = np.clip(np.clip(x + alpha * np.sign(g), xb - eps, xb + eps), *clip)
    return x.astype(xb.dtype, copy=False)


class _Reference:
    """The NumPy reference in the shape of the backend primitives training needs."""

    @staticmethod
    def prepare(model, dtype):
        return model

    @staticmethod
    def param_grads(model, x, y, loss):
        return loss_and_param_grads(model, x, y, loss)

    @staticmethod
    def fgsm_point(model, xb, yb, eps, clip):
        return _fgsm_point(model, xb, yb, eps, clip)

    @staticmethod
    def pgd_point(model, xb, yb, eps, alpha, steps, rng, clip):
        return _pgd_point(model, xb, yb, eps, alpha, steps, rng, clip)


class _OnBackend:
    """Training's adversarial points and parameter gradients on a backend (kernels.get)."""

    def __init__(self, be):
        self.be = be

    def prepare(self, model, dtype):
        return self.be.prepare(model, dtype)

    def param_grads(self, net, x, y, loss):
        return self.be.param_grads(net, x, y, loss)

    def _step(self, net, x, x0, yb, eps, alpha, clip):
        n = len(x)
        _, g, _ = self.be.loss_grad(net, x, yb, "ce")
        e = np.full(n, eps, x.dtype)
        return self.be.linf_step(x, g, x0, e, np.full(n, alpha, x.dtype), clip[0], clip[1],
                                 np.ones(n, bool))

    def fgsm_point(self, net, xb, yb, eps, clip):
        return self._step(net, xb, xb, yb, eps, eps, clip)

    def pgd_point(self, net, xb, yb, eps, alpha, steps, rng, clip):
        x = np.clip(xb + rng.uniform(-eps, eps, xb.shape).astype(xb.dtype), *clip)
        for _ in range(steps):
            x = self._step(net, x, xb, yb, eps, alpha, clip)
        return x


def minibatch_grads(model, xb, yb, *, adversarial=None, eps=0.1, mix=0.5, pgd_steps=7,
                    pgd_alpha=None, rng=None, clip=(0.0, 1.0), ops=None, soft=None,
                    temperature=1.0):
    """Loss (float) and parameter gradients of one minibatch under the chosen objective.

    ops: where the math runs (None: the NumPy reference; see ``train(backend=...)``).
    soft: None, or (B, max(K, 2)) target distributions: the soft-label cross-entropy at
    ``temperature`` (``reference.losses.soft_cross_entropy``) on the NumPy reference; yb
    and the adversarial options are then unused.
    """
    if soft is not None:
        return loss_and_param_grads_soft(model, xb, soft, temperature)
    ops = ops or _Reference
    net = ops.prepare(model, xb.dtype)
    if adversarial is None:
        return ops.param_grads(net, xb, yb, "ce")
    if adversarial == "fgsm":
        x_adv = ops.fgsm_point(net, xb, yb, eps, clip)
        l_clean, g_clean = ops.param_grads(net, xb, yb, "ce")
        l_adv, g_adv = ops.param_grads(net, x_adv, yb, "ce")
        grads = [{k: mix * gc[k] + (1 - mix) * ga[k] for k in gc} for gc, ga in zip(g_clean, g_adv)]
        return mix * l_clean + (1 - mix) * l_adv, grads
    if adversarial == "pgd":
        alpha = pgd_alpha if pgd_alpha is not None else 2.5 * eps / pgd_steps
        x_adv = ops.pgd_point(net, xb, yb, eps, alpha, pgd_steps, rng, clip)
        return ops.param_grads(net, x_adv, yb, "ce")
    raise AdvkernError(f"unknown adversarial objective {adversarial!r}: use None, 'fgsm' or 'pgd'")


def train(model, x, y, *, epochs=10, batch_size=64, optimizer="adam", lr=None, momentum=0.9,
          weight_decay=0.0, seed=0, adversarial=None, eps=0.1, mix=0.5, pgd_steps=7,
          pgd_alpha=None, clip=(0.0, 1.0), schedule="cosine", x_val=None, y_val=None,
          progress=None, backend="auto", label="train", temperature=1.0, soft_labels=None):
    """Train a copy of ``model`` on (x, y); the caller's model and arrays are not modified.

    x: (N, *model.input_shape) float32/float64, y: (N,) int labels. Each epoch visits the
    data in a seeded random order in minibatches of ``batch_size``. Returns
    ``(trained_model, history)`` where history is a list of per-epoch dicts
    (epoch, loss, seconds, and val_accuracy when validation data are given).
    backend: where the parameter gradients and adversarial points are computed: 'auto'
    (default: ``$ADVKERN_BACKEND`` or the fastest backend here, see
    ``advkern.kernels.resolve``), 'reference' (or None) for the NumPy reference, or a backend
    name ('numpy', 'numba_cpu', ...). Each epoch's record names the backend that ran. The
    backends agree with the reference to float rounding (their reductions sum in another
    order), so the trained weights are bit-reproducible for a given backend and machine, and
    agree across them to rounding that training amplifies only slightly (mlp/cnn: 1e-5).
    label: the progress line's name of what is trained.
    temperature, soft_labels: distillation (Papernot et al. 2016). With soft_labels (N,
    max(K, 2)) (rows: distributions, e.g. a teacher's softmax(z / T)) or temperature != 1,
    the objective is mean_i -sum_k q_ik log softmax(f(x_i) / T)_k with q = soft_labels, or
    one-hot(y) when soft_labels is None (a teacher trained at temperature T). Its gradients
    come from the NumPy reference whatever ``backend`` says (the backends' primitives take
    hard labels), recorded as 'reference'; not combined with ``adversarial``. At the
    defaults (1.0, None) training is exactly the hard-label path above.
    schedule: 'cosine' decays the learning rate as lr * (1 + cos(pi * t / T)) / 2 over the
    T steps of training (steadier final accuracy on small data); 'constant' keeps it.
    """
    x = model.check_input(x)
    y = check_labels(y, len(x), model.num_classes)
    epochs = check_int(epochs, "epochs")
    batch_size = check_int(batch_size, "batch_size")
    clip = check_box(clip)
    if adversarial is not None:
        eps = check_positive(eps, "eps")
        if not 0 <= mix <= 1:
            raise AdvkernError(f"mix must be in [0, 1], got {mix}")
        if adversarial == "pgd":
            pgd_steps = check_int(pgd_steps, "pgd_steps")
    from .. import kernels
    backend = kernels.resolve("reference" if backend is None else backend)
    ops = _Reference if backend == "reference" else _OnBackend(kernels.get(backend))
    soft = _soft_targets(soft_labels, temperature, y, model.num_classes, adversarial, x.dtype)
    if soft is not None:
        backend, ops = "reference", _Reference
    opt_kw = {"momentum": momentum} if optimizer == "sgd" else {}
    if schedule not in ("cosine", "constant"):
        raise AdvkernError(f"unknown schedule {schedule!r}: use 'cosine' or 'constant'")
    opt = make_optimizer(optimizer, lr, weight_decay=weight_decay, **opt_kw)
    base_lr = opt.lr
    model = model.astype(x.dtype) if model.dtype != x.dtype else model.copy()
    rng = np.random.default_rng(seed)
    history = []
    steps_per_epoch = -(-len(x) // batch_size)
    total_steps, step = epochs * steps_per_epoch, 0
    with Progress(epochs * steps_per_epoch, label, enabled=progress) as bar:
        for epoch in range(epochs):
            t0 = time.perf_counter()
            order = rng.permutation(len(x))
            total = 0.0
            for s in range(0, len(x), batch_size):
                idx = order[s: s + batch_size]
                loss, grads = minibatch_grads(model, x[idx], y[idx], adversarial=adversarial,
                                              eps=eps, mix=mix, pgd_steps=pgd_steps,
                                              pgd_alpha=pgd_alpha, rng=rng, clip=clip,
                                              ops=ops, temperature=temperature,
                                              soft=None if soft is None else soft[idx])
                if not np.isfinite(loss):
                    raise AdvkernError(f"training diverged at epoch {epoch + 1} (loss {loss}): "
                                       "lower the learning rate")
                if schedule == "cosine":
                    opt.lr = base_lr * 0.5 * (1 + np.cos(np.pi * step / total_steps))
                opt.step(model.params, grads)
                step += 1
                total += loss * len(idx)
                bar.update(1, epoch=epoch + 1, loss=float(loss))
            rec = {"epoch": epoch + 1, "loss": total / len(x),
                   "seconds": time.perf_counter() - t0, "backend": backend}
            if x_val is not None:
                rec["val_accuracy"] = model.accuracy(x_val, y_val)
            history.append(rec)
    return model, history


def _soft_targets(soft_labels, temperature, y, num_classes, adversarial, dtype):
    """The (N, max(K, 2)) targets of distillation training, or None for the hard-label path
    (temperature 1 and no soft labels). Checks the arguments; returns a new array."""
    temperature = check_positive(temperature, "temperature")
    if soft_labels is None and temperature == 1.0:
        return None
    if adversarial is not None:
        raise AdvkernError("temperature / soft_labels (distillation) cannot be combined with "
                           "adversarial training")
    if soft_labels is None:
        q = np.zeros((len(y), num_classes), dtype)
        q[np.arange(len(y)), y] = 1
        return q
    from .._validate import check_float_array
    from ..errors import ShapeError
    q = check_float_array(soft_labels, "soft_labels", ndim=2)
    if q.shape != (len(y), num_classes):
        raise ShapeError(f"soft_labels must have shape {(len(y), num_classes)} (one "
                         f"distribution per training sample), got {q.shape}")
    if np.any(q < 0) or not np.allclose(q.sum(axis=1), 1, atol=1e-3):
        raise AdvkernError("soft_labels rows must be probability distributions (>= 0, summing "
                           "to 1)")
    return q.astype(dtype)  # a copy: the caller's array is never modified
