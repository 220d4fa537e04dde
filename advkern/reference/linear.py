"""Exact adversarial robustness of binary linear models (logistic regression).

Model: f(x) = tau(theta^T x + theta_0), labels y in {-1, +1} (advkern's binary models use
{0, 1}; s = 2y - 1 below). Logistic loss L = Psi(s (theta^T x + theta_0)) with
Psi(z) = log(1 + exp(-z)), which is monotonically decreasing, so the inner maximisation
over the L-inf ball is solved exactly:

    max_{||d||_inf <= eps} Psi(s (theta^T (x + d) + theta_0))
        = Psi(s (theta^T x + theta_0) + min_d s theta^T d)
        = Psi(s (theta^T x + theta_0) - eps ||theta||_1),

attained at d* = -s eps sign(theta) (this is FGSM: the optimal attack on a linear model).
Inside the valid box [lo, hi] the objective is still separable per coordinate, so the exact
worst case is d*_j = clip(x_j - s eps sign(theta_j), lo, hi) - x_j.

Robust training minimises the exact robust risk (convex in theta, theta_0):

    min_{theta, theta_0} (1/N) sum_i Psi(s_i (theta^T x_i + theta_0) - eps ||theta||_1).
"""

import numpy as np

from .._validate import check_box, check_float_array, check_int, check_labels, check_positive
from ..errors import AdvkernError


def linear_params(model):
    """(theta (D,), theta_0) of a binary linear model: Flatten? -> Dense(1)."""
    kinds = [layer.type for layer in model.layers]
    if kinds not in (["dense"], ["flatten", "dense"]) or model.num_logits != 1:
        raise AdvkernError("exact linear robustness needs a binary linear model "
                           "(flatten -> dense with 1 output, e.g. build('logreg', num_classes=2)), "
                           f"got layers {kinds} with {model.num_logits} logits")
    p = model.params[-1]
    return p["w"][:, 0], p["b"][0]


def psi(z):
    """Psi(z) = log(1 + exp(-z)), computed with logaddexp (no overflow)."""
    return np.logaddexp(0, -z)


def _signed(y):
    return 2.0 * y - 1.0


def worst_case_delta(theta, x, y, eps, clip=None):
    """Exact maximiser d* of the logistic loss over ||d||_inf <= eps (and the box, if given).

    theta: (D,), x: (N, D), y: (N,) in {0, 1} -> d*: (N, D) = -s eps sign(theta), clipped so
    x + d* stays in [lo, hi] when ``clip`` is given. sign(0) = 0: a zero weight leaves the
    coordinate alone (any value there is optimal).
    """
    s = _signed(y)[:, None]
    d = -s * eps * np.sign(theta)[None, :]
    if clip is not None:
        lo, hi = clip
        d = np.clip(x + d, lo, hi) - x
    return d.astype(x.dtype, copy=False)


def robust_loss(theta, theta0, x, y, eps, clip=None):
    """Exact worst-case logistic loss per sample, (N,).

    Without a box: Psi(s (theta^T x + theta_0) - eps ||theta||_1). With a box: the loss at
    x + worst_case_delta (the closed form above no longer holds once coordinates saturate).
    """
    s = _signed(y)
    if clip is None:
        return psi(s * (x @ theta + theta0) - eps * np.abs(theta).sum())
    d = worst_case_delta(theta, x, y, eps, clip)
    return psi(s * ((x + d) @ theta + theta0))


def robust_loss_grad(theta, theta0, x, y, eps):
    """Mean exact robust loss (no box) and its gradient in (theta, theta_0).

    With m_i = s_i (theta^T x_i + theta_0) - eps ||theta||_1 and Psi'(m) = -sigmoid(-m):
    dR/dtheta = (1/N) sum_i Psi'(m_i) (s_i x_i - eps sign(theta)),
    dR/dtheta_0 = (1/N) sum_i Psi'(m_i) s_i.
    """
    s = _signed(y)
    m = s * (x @ theta + theta0) - eps * np.abs(theta).sum()
    dpsi = -np.exp(-np.logaddexp(0, m))  # -sigmoid(-m), stable
    n = len(x)
    g_theta = (x.T @ (dpsi * s) - eps * np.sign(theta) * dpsi.sum()) / n
    g_theta0 = float((dpsi * s).sum() / n)
    return float(psi(m).mean()), g_theta, g_theta0


def train_robust_linear(model, x, y, eps, *, epochs=10, lr=0.1, batch_size=64, seed=0):
    """Exact robust training of a binary linear model by minibatch SGD on the robust risk.

    eps = 0 is ordinary logistic regression. x: (N, *input_shape), y: (N,) in {0, 1}.
    Returns a trained copy of ``model`` (the caller's model is not modified).
    """
    theta, theta0 = linear_params(model)
    x = model.check_input(x)
    y = check_labels(y, len(x), 2)
    eps = check_positive(eps, "eps", allow_zero=True)
    epochs, batch_size = check_int(epochs, "epochs"), check_int(batch_size, "batch_size")
    lr = check_positive(lr, "lr")
    xf = x.reshape(len(x), -1)
    theta, theta0 = theta.astype(x.dtype).copy(), x.dtype.type(theta0)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(0, len(x), batch_size):
            idx = order[i: i + batch_size]
            _, g, g0 = robust_loss_grad(theta, theta0, xf[idx], y[idx], eps)
            theta -= lr * g.astype(x.dtype)
            theta0 -= x.dtype.type(lr * g0)
    out = model.astype(x.dtype)
    out.params[-1]["w"][:, 0] = theta
    out.params[-1]["b"][0] = theta0
    return out


def linear_attack(model, x, y, eps, clip=(0.0, 1.0)):
    """The exact L-inf worst case x + d* for a binary linear model (FGSM is optimal here).

    x: (N, *input_shape) -> x_adv of the same shape and dtype. clip=None attacks without the
    box (the seed's setting); by default x_adv stays in [lo, hi].
    """
    theta, _ = linear_params(model)
    x = check_float_array(x, "x")
    x = model.check_input(x)
    y = check_labels(y, len(x), 2)
    eps = check_positive(eps, "eps", allow_zero=True)
    if clip is not None:
        clip = check_box(clip)
    xf = x.reshape(len(x), -1)
    d = worst_case_delta(theta.astype(x.dtype), xf, y, eps, clip)
    return (xf + d).reshape(x.shape)
