"""Shared test helpers: central-difference gradient checks, tolerances, Hypothesis strategies.

Gradient checks use a random projection: for a unit direction v, the analytic directional
derivative <g, v> is compared with the central difference (f(x + h v) - f(x - h v)) / (2h).
In float64 with h = 1e-6 the truncation error is O(h^2 |f'''|) ~ 1e-12 and the rounding error
O(eps |f| / h) ~ 1e-10 |f|, so rel 1e-6 + abs 1e-8 (scaled by |f|) separates a correct
gradient from a wrong one (a wrong factor, sign or index gives an O(1) error).
"""

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from advkern.errors import ShapeError
from advkern.nets import (
    Conv2D,
    Dense,
    Flatten,
    MaxPool2D,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
)
from advkern.reference import network
from advkern.reference.layers import conv_output_hw, resolve_padding

H = 1e-6
RTOL = 1e-6
ATOL = 1e-8

seeds = st.integers(0, 2**32 - 1)

# 'same', 'valid', int, (ph, pw) and (top, bottom, left, right).
paddings = st.one_of(
    st.sampled_from(["same", "valid"]),
    st.integers(0, 2),
    st.tuples(st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
)


# ----------------------------------------------------------------------------- numerics


def unit(rng, shape, dtype=np.float64):
    """A random direction of unit 2-norm (so each coordinate moves by at most h)."""
    v = rng.standard_normal(shape)
    return (v / max(float(np.linalg.norm(v)), 1e-300)).astype(dtype)


def central_difference(f, x, v, h=H):
    """(f(x + h v) - f(x - h v)) / (2h), f returning a scalar."""
    return (float(f(x + h * v)) - float(f(x - h * v))) / (2 * h)


def assert_scalar_close(analytic, numeric, rtol=RTOL, atol=ATOL, scale=1.0, what="gradient"):
    """|analytic - numeric| <= atol * max(1, scale) + rtol * max(|analytic|, |numeric|)."""
    analytic, numeric = float(analytic), float(numeric)
    tol = atol * max(1.0, abs(scale)) + rtol * max(abs(analytic), abs(numeric))
    err = abs(analytic - numeric)
    assert err <= tol, (f"{what}: analytic {analytic!r} vs finite difference {numeric!r} "
                        f"(error {err:.3g} > tolerance {tol:.3g})")


def check_directional(f, x, grad, rng, n_dirs=2, h=H, rtol=RTOL, atol=ATOL, scale=None,
                      what="gradient", directions=None):
    """Assert <grad, v> equals the central difference of f along n_dirs random unit v.

    ``directions`` (a list of arrays shaped like x) replaces the random ones, e.g. when the
    caller has checked that no kink lies within h along them.
    """
    assert grad.shape == x.shape, f"{what}: gradient shape {grad.shape} != {x.shape}"
    if scale is None:
        scale = abs(float(f(x)))
    if directions is None:
        directions = [unit(rng, x.shape, x.dtype) for _ in range(n_dirs)]
    for v in directions:
        assert_scalar_close(np.vdot(grad, v), central_difference(f, x, v, h), rtol, atol,
                            scale, what)


def projected(forward, dout):
    """f(x) = sum(forward(x) * dout): its gradient is the layer's backward of dout."""
    return lambda x: float(np.sum(forward(x) * dout))


def distinct_values(rng, shape, gap=1e-2, dtype=np.float64):
    """An array of the given shape whose values are pairwise >= gap apart (no max ties)."""
    n = int(np.prod(shape))
    vals = (rng.permutation(n) - n / 2) * gap + rng.uniform(0, gap / 10, n)
    return vals.reshape(shape).astype(dtype)


def away_from_zero(rng, shape, margin=1e-3, dtype=np.float64):
    """Standard normals with |x| > margin (no ReLU kink within reach of h)."""
    x = rng.standard_normal(shape)
    x = np.where(np.abs(x) < margin, np.sign(x + 0.5) * (margin + np.abs(x) + 0.1), x)
    return x.astype(dtype)


# ----------------------------------------------------------------------------- models


def randomize(model, seed, bias_scale=0.3):
    """The same architecture with random weights and non-zero biases (dtype kept).

    Nets are initialised with zero biases; random biases make bias gradients and ReLU
    patterns less special.
    """
    rng = np.random.default_rng(seed)
    params = []
    for p in model.params:
        q = {}
        for k, a in p.items():
            if k == "b":
                q[k] = (rng.standard_normal(a.shape) * bias_scale).astype(a.dtype)
            else:
                fan_in = int(np.prod(a.shape[1:])) if a.ndim == 4 else a.shape[0]
                q[k] = (rng.standard_normal(a.shape) * 1.2 / np.sqrt(fan_in)).astype(a.dtype)
        params.append(q)
    return Sequential(model.layers, model.input_shape, params, name=model.name)


def with_params(model, params):
    return Sequential(model.layers, model.input_shape, params, name=model.name)


def kink_signature(model, x):
    """The piecewise-linear choices of a forward pass: ReLU masks and max-pool argmaxes."""
    _, caches = network.forward(model, x)
    sig = []
    for layer, cache in zip(model.layers, caches):
        if layer.type == "relu":
            sig.append(np.asarray(cache))
        elif layer.type == "maxpool2d":
            sig.append(np.asarray(cache[1]))
    return sig


def same_kinks(a, b):
    return len(a) == len(b) and all(np.array_equal(p, q) for p, q in zip(a, b))


def assume_smooth(pairs):
    """Skip the example unless every (model, x) pair makes the same ReLU/max-pool choices.

    Central differences across a kink do not approximate the one-sided gradient.
    """
    sigs = [kink_signature(m, x) for m, x in pairs]
    assume(all(same_kinks(sigs[0], s) for s in sigs[1:]))


activations = st.sampled_from([ReLU(), Tanh(), Sigmoid()])


@st.composite
def small_models(draw, dtype=np.float64, num_logits=None, kinds=("mlp", "cnn")):
    """A small random Sequential: a dense stack or a conv(+pool) stack, random weights.

    Returns the model (params randomised with non-zero biases).
    """
    seed = draw(seeds)
    kind = draw(st.sampled_from(kinds))
    k = draw(st.integers(1, 4)) if num_logits is None else num_logits
    layers = []
    if kind == "mlp":
        if draw(st.booleans()):
            input_shape = (draw(st.integers(1, 6)),)
        else:
            input_shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)),
                           draw(st.integers(1, 3)))
            layers.append(Flatten())
        for _ in range(draw(st.integers(0, 2))):
            layers += [Dense(draw(st.integers(1, 6))), draw(activations)]
        layers.append(Dense(k))
    else:
        input_shape = (draw(st.integers(1, 2)), draw(st.integers(3, 7)), draw(st.integers(3, 7)))
        shape = input_shape
        for _ in range(draw(st.integers(1, 2))):
            conv = Conv2D(draw(st.integers(1, 3)),
                          (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                          (draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                          draw(paddings))
            try:
                out = conv.output_shape(shape)
            except ShapeError:
                continue
            layers += [conv, draw(activations)]
            shape = out
            if draw(st.booleans()):
                kp = draw(st.integers(1, 3))
                pool = MaxPool2D(kp, draw(st.integers(1, kp)))
                try:
                    shape = pool.output_shape(shape)
                    layers.append(pool)
                except ShapeError:
                    pass
        layers.append(Flatten())
        if draw(st.booleans()):
            layers += [Dense(draw(st.integers(1, 5))), draw(activations)]
        layers.append(Dense(k))
    model = Sequential(layers, input_shape, seed=seed, dtype=dtype)
    return randomize(model, seed + 1)


def random_batch(model, rng, n, dtype=None):
    dtype = model.dtype if dtype is None else dtype
    return rng.uniform(-1, 1, (n, *model.input_shape)).astype(dtype)


def random_labels(model, rng, n):
    return rng.integers(0, model.num_classes, n)


@st.composite
def conv_configs(draw, max_hw=9, max_n=3, max_c=3):
    """(n, c, f, h, w, kernel, stride, padding, pads) with a non-empty output."""
    n = draw(st.integers(1, max_n))
    c = draw(st.integers(1, max_c))
    f = draw(st.integers(1, 3))
    h, w = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(paddings)
    pads = resolve_padding(padding, (h, w), kernel, stride)
    ho, wo = conv_output_hw((h, w), kernel, stride, pads)
    assume(ho >= 1 and wo >= 1)
    return {"n": n, "c": c, "f": f, "h": h, "w": w, "kernel": kernel, "stride": stride,
            "padding": padding, "pads": pads, "out_hw": (ho, wo)}


@st.composite
def pool_configs(draw, max_hw=9):
    """(n, c, h, w, kernel, stride) with stride < kernel (overlapping) allowed."""
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    h, w = draw(st.integers(kernel[0], max_hw)), draw(st.integers(kernel[1], max_hw))
    return {"n": n, "c": c, "h": h, "w": w, "kernel": kernel, "stride": stride}


def mlp_grad32_permuted(model, x, y, seed=0):
    """An independent float32 input gradient of the mlp architecture's cross-entropy in plain
    NumPy (the candidate implementation of the verify tests): features and hidden units in a
    seeded random order, so every GEMM sums in another order than ours; softmax as exp / sum.
    x: (N, 1, 28, 28), y: (N,) -> (N, 784) float32."""
    rng = np.random.default_rng(seed)
    (w1, b1), (w2, b2), (w3, b3) = [(p["w"].astype(np.float32), p["b"].astype(np.float32))
                                    for p in model.params if p]
    pin, h1, h2 = (rng.permutation(n) for n in (w1.shape[0], w1.shape[1], w2.shape[1]))
    w1, b1, w2, b2, w3 = w1[pin][:, h1], b1[h1], w2[h1][:, h2], b2[h2], w3[h2]
    xf = x.reshape(len(x), -1).astype(np.float32)[:, pin]
    a1 = xf @ w1 + b1
    a2 = np.maximum(a1, 0) @ w2 + b2
    z = np.maximum(a2, 0) @ w3 + b3
    e = np.exp(z - z.max(axis=1, keepdims=True))
    dz = e / e.sum(axis=1, keepdims=True)
    dz[np.arange(len(y)), y] -= 1
    gx = (((dz @ w3.T) * (a2 > 0)) @ w2.T * (a1 > 0)) @ w1.T
    g = np.empty_like(gx)
    g[:, pin] = gx
    return g
