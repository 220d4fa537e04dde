"""Whole-model forward and backward passes, input gradients and logit Jacobians (NumPy).

``model`` is an ``advkern.nets.Sequential`` (any object with ``layers``, ``params`` and
``shapes`` works). The computation runs in the dtype of ``x``: float64 input gives a float64
pass even through a float32 model (its weights are cast), which is what gradient checks need.
"""

import numpy as np

from . import layers as L
from .._validate import check_labels, check_model
from .losses import get_loss


def _cast(params, dtype):
    return {k: np.asarray(a, dtype=dtype) for k, a in params.items()}


def layer_forward(layer, params, x, in_shape):
    """Run one layer spec: returns (out, cache)."""
    kind = layer.type
    if kind == "dense":
        return L.dense_forward(x, params["w"], params["b"])
    if kind == "conv2d":
        return L.conv2d_forward(x, params["w"], params["b"], layer.stride, layer.pads(in_shape))
    if kind == "maxpool2d":
        return L.maxpool2d_forward(x, layer.kernel, layer.stride)
    if kind == "relu":
        return L.relu_forward(x)
    if kind == "tanh":
        return L.tanh_forward(x)
    if kind == "sigmoid":
        return L.sigmoid_forward(x)
    if kind == "flatten":
        return L.flatten_forward(x)
    if kind == "maxout":
        return L.maxout_forward(x, layer.pieces)
    if kind == "rbf":
        return L.rbf_forward(x, params["c"], params["log_beta"])
    if kind == "conv2d_transpose":
        pads, extra = layer.pads(in_shape)
        return L.conv2d_transpose_forward(x, params["w"], params["b"], layer.stride, pads, extra)
    if kind == "reshape":
        return L.reshape_forward(x, layer.shape)
    raise ValueError(f"unknown layer type {kind!r}")


_BACKWARD = {
    "conv2d_transpose": L.conv2d_transpose_backward, "reshape": L.reshape_backward,
    "dense": L.dense_backward, "conv2d": L.conv2d_backward, "maxpool2d": L.maxpool2d_backward,
    "relu": L.relu_backward, "tanh": L.tanh_backward, "sigmoid": L.sigmoid_backward,
    "flatten": L.flatten_backward, "maxout": L.maxout_backward, "rbf": L.rbf_backward,
}


def forward(model, x):
    """x: (N, *input_shape) -> logits (N, K), caches (one per layer)."""
    caches = []
    h = x
    for i, (layer, p) in enumerate(zip(model.layers, model.params)):
        h, cache = layer_forward(layer, _cast(p, x.dtype), h, model.shapes[i])
        caches.append(cache)
    return h, caches


def backward(model, dlogits, caches, need_params=True):
    """dlogits: (N, K) -> dx: (N, *input_shape), grads: list of per-layer dicts.

    With need_params=False the parameter gradients are skipped (an attack only needs dx);
    the list then holds empty dicts.
    """
    grads = [None] * len(model.layers)
    d = dlogits
    for i in range(len(model.layers) - 1, -1, -1):
        layer = model.layers[i]
        if layer.params:
            d, g = _BACKWARD[layer.type](d, caches[i], need_params=need_params)
        else:
            d, g = _BACKWARD[layer.type](d, caches[i])
        grads[i] = g
    return d, grads


def _checked(model, x, y, loss):
    """The public entry points' inputs checked (model, finite float x of the model's shape,
    labels in range, a known loss), as the attacks check them."""
    from ..errors import AdvkernError
    if loss not in ("ce", "cw"):
        raise AdvkernError(f"unknown loss {loss!r}: use one of ['ce', 'cw']")
    x = check_model(model).check_input(x)
    return x, check_labels(y, len(x), model.num_classes)


def loss_and_input_grad(model, x, y, loss="ce"):
    """Per-sample loss (N,) and the input gradient d(sum_n J_n)/dx: (N, *input_shape).

    Summing (not averaging) over the batch makes each image's gradient independent of the
    batch size. loss: 'ce' (softmax cross-entropy) or 'cw' (Carlini-Wagner margin).
    """
    x, y = _checked(model, x, y, loss)
    logits, caches = forward(model, x)
    values, dlogits = get_loss(loss)(logits, y)
    dx, _ = backward(model, dlogits, caches, need_params=False)
    return values, dx


def loss_and_param_grads(model, x, y, loss="ce"):
    """Mean loss over the batch (a float) and its parameter gradients (list of dicts)."""
    x, y = _checked(model, x, y, loss)
    logits, caches = forward(model, x)
    values, dlogits = get_loss(loss)(logits, y)
    n = len(x)
    _, grads = backward(model, dlogits / n, caches)
    return float(values.mean()), grads


def jacobian(model, x):
    """Jacobian of the logits with respect to the input: J[n, k, :] = d z_k(x_n) / d x_n.

    x: (N, *input_shape) -> (N, K, D) with D = prod(input_shape).
    One batched pass: every image is repeated K times and the backward pass is seeded with
    the K one-hot rows, so the N*K rows of dx are the N*K rows of the Jacobian. Costs one
    forward and one backward of batch N*K (what K separate backward passes would cost in
    FLOPs, without the per-pass overhead).
    """
    x = check_model(model).check_input(x)
    n = len(x)
    k = model.shapes[-1][0]
    xr = np.repeat(x, k, axis=0)
    logits, caches = forward(model, xr)
    seeds = np.tile(np.eye(k, dtype=x.dtype), (n, 1))
    dx, _ = backward(model, seeds, caches, need_params=False)
    return dx.reshape(n, k, int(np.prod(model.shapes[0])))


def loss_and_param_grads_soft(model, x, q, temperature=1.0):
    """Mean soft-label loss at temperature T (``losses.soft_cross_entropy``) over the batch
    (a float) and its parameter gradients (list of dicts), as ``loss_and_param_grads``.

    x: (N, *input_shape); q: (N, max(K, 2)) target distributions; temperature: T > 0.
    """
    from .losses import soft_cross_entropy
    x = check_model(model).check_input(x)
    logits, caches = forward(model, x)
    values, dlogits = soft_cross_entropy(logits, q, temperature)
    _, grads = backward(model, dlogits / len(x), caches)
    return float(values.mean()), grads


def activations(model, x):
    """Every layer's output: x (N, *input_shape) -> [a_1, .., a_L], a_l of shape
    (N, *model.shapes[l]) in x's dtype (a_L: the logits).

    The same layer calls as ``forward``; the hidden outputs are kept instead of the caches
    (a layer's cache holds its input only for some layer types).
    """
    x = check_model(model).check_input(x)
    outs = []
    h = x
    for i, (layer, p) in enumerate(zip(model.layers, model.params)):
        h, _ = layer_forward(layer, _cast(p, x.dtype), h, model.shapes[i])
        outs.append(h)
    return outs
