"""The same attacks from the PyTorch attack library torchattacks (3.5.1), for ``python -m bench
--gpu``: ``torchattacks.PGD``, ``torchattacks.JSMA`` and ``torchattacks.OnePixel`` on the
``bench/torch_pgd.py`` module built from advkern's weights.

torchattacks is not a dependency of advkern (nor of the CPU benchmark): it is imported only by
:func:`load`, which the GPU mode calls; its wheel is pure Python (bench/gpu_check.sh installs
the copy carried in ``.whl/``). What its attacks do, read from its 3.5.1 source:

- ``PGD(model, eps, alpha, steps, random_start)``: all images of the call in one batch; per
  step the MEAN cross-entropy's input gradient (the same sign as advkern's summed loss),
  ``x + alpha * sign(g)``, the eps-ball, the [0, 1] box. No final scoring forward.
- ``JSMA(model, theta, gamma)``: one image at a time; in its default mode the target is
  ``(y + 1) % 10`` (the benchmark's target). Per iteration the full K-row Jacobian (K
  backward passes, copied to the host row by row), a dense D x D saliency table on the
  device and its argmax; at most ``ceil(D * gamma / 2)`` iterations; the domain is the
  pixels < 0.99 (theta > 0).
- ``OnePixel(model, pixels, steps, popsize, inf_batch)``: one image at a time through its own
  copy of scipy's differential evolution (``popsize`` is divided by the parameters per
  candidate, 2 + C: popsize 400 on MNIST gives 133 * 3 = 399 members), ``maxiter = steps``
  generations after the initial population, so ``(steps + 1) * 399`` candidates per image;
  each candidate image is written by a Python loop, scored in chunks of ``inf_batch``. It
  stops early when the best member fools the model (its callback); ``early_stop=False``
  here keeps the callback's work but never stops, as advkern's ``early_stop=False``.

Every function takes numpy arrays and returns numpy arrays (the transfers are timed, as with
advkern's engine).
"""

import numpy as np

VERSION = "3.5.1"


def load():
    """(torchattacks, None) when it imports, else (None, the reason)."""
    try:
        import torchattacks
    except Exception as e:  # ImportError, or a broken install
        return None, f"torchattacks not importable: {e}"
    return torchattacks, None


def _tensors(torch, net, x, y):
    dev = next(net.parameters()).device
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(dev)
    yt = torch.from_numpy(np.asarray(y, np.int64)).to(dev)
    return xt, yt


def pgd(ta, torch, net, x, y, eps, alpha, steps):
    """torchattacks.PGD without random start on the whole batch; returns x_adv."""
    xt, yt = _tensors(torch, net, x, y)
    atk = ta.PGD(net, eps=eps, alpha=alpha, steps=steps, random_start=False)
    return atk(xt, yt).detach().cpu().numpy()


def jsma(ta, torch, net, x, y, theta, gamma):
    """torchattacks.JSMA (default mode: target (y + 1) % 10); returns (x_adv, info) with
    info['jacobians']: the Jacobians it computed (one per iteration)."""
    count = [0]

    class CountingJSMA(ta.JSMA):
        def compute_jacobian(self, image):
            count[0] += 1
            return super().compute_jacobian(image)

    xt, yt = _tensors(torch, net, x, y)
    atk = CountingJSMA(net, theta=theta, gamma=gamma)
    adv = atk(xt, yt).detach().cpu().numpy().reshape(np.shape(x))
    return adv, {"jacobians": count[0]}


def onepixel(ta, torch, net, x, y, steps, popsize, inf_batch, early_stop=False):
    """torchattacks.OnePixel (1 pixel); returns (x_adv, info) with info['candidates']: the
    candidates its fitness function scored, and info['members']: the population size."""
    count = [0]

    class CountingOnePixel(ta.OnePixel):
        def _loss(self, image, label, delta):
            d = np.asarray(delta)
            count[0] += 1 if d.ndim < 2 else len(d)
            return super()._loss(image, label, delta)

        def _attack_success(self, image, label, delta):
            hit = super()._attack_success(image, label, delta)  # its work stays in the time
            return hit if early_stop else False

    xt, yt = _tensors(torch, net, x, y)
    atk = CountingOnePixel(net, pixels=1, steps=steps, popsize=popsize, inf_batch=inf_batch)
    adv = atk(xt, yt).detach().cpu().numpy()
    params = 2 + int(np.shape(x)[1])
    return adv, {"candidates": count[0],
                 "members": max(5, max(1, popsize // params) * params)}
