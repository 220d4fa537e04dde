"""Every backend's primitives against the ``numpy`` backend (the reference), through the
contract (``advkern.kernels.contract``) only.

Each test is parametrized over every registered backend that imports here, except ``numpy``
itself: adding a backend to ``advkern.kernels`` adds it to these tests with no new test
code. Only the contract's public primitives are called (``to_device`` in, ``to_host`` out,
as the engine does), never a backend's internals.

Tolerances (the reference runs in float64 on the same weights and inputs, cast up exactly):

- float64: ``1e-9 * max(1, max|ref|)`` (only the summation order may differ);
- float32: ``32 sqrt(L) eps32 * max(1, max|ref|)`` with L the longest reduction of the
  computation (GEMM inner dimension, forward or backward, the batch for parameter
  gradients, K for the loss). The random models keep activations and gradients O(1)
  (weights ~ 1.2 / sqrt(fan_in), inputs in [-1, 1]), so max(1, max|ref|) is the magnitude
  of the summed terms; a K-term sum of float32 roundings is then ~ sqrt(L) eps32 of it, and
  32 covers a few layers of accumulation.
- Discontinuities: gradients jump at ReLU kinks, max-pool ties and the C&W loss's argmax
  of the other classes, predictions at logit ties. Inputs are redrawn until the float64
  reference is clearly away from every kink of the batch (relative margin ``_KINK``), and
  predictions are compared only where the reference's top-2 logit margin is clear.
- Exact (bit for bit): ``linf_step``, ``de_step``; JSMA indices and flags are identical.
"""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from advkern import kernels
from advkern.errors import AdvkernError, ShapeError
from advkern.kernels.contract import composed_momentum_step, composed_pgd_step
from advkern.nets import (RBF, Conv2D, Dense, Flatten, MaxPool2D, Maxout, ReLU, Sequential,
                          Sigmoid, Tanh)
from advkern.reference import gradient_attacks as ga
from advkern.reference import network
from advkern.reference import pixel as rpx

from _helpers import paddings, random_labels, randomize, seeds, small_models

REF = kernels.get("numpy")
BACKENDS = [b for b in kernels.available() if b != "numpy"]
over_backends = pytest.mark.parametrize(
    "name", BACKENDS or [pytest.param(None, marks=pytest.mark.skip(
        reason="no backend other than the numpy reference is available here"))])

EPS = {np.dtype(np.float32): float(np.finfo(np.float32).eps),
       np.dtype(np.float64): float(np.finfo(np.float64).eps)}
dtypes = st.sampled_from([np.float32, np.float64])
# Relative distance to a kink below which a float32 / float64 rounding could flip a ReLU
# mask, a max-pool winner or an argmax: float32 errors here are ~ sqrt(L) eps32 ~ 1e-6.
_KINK = {np.dtype(np.float32): 2e-4, np.dtype(np.float64): 1e-9}

NET = settings(max_examples=40, deadline=None)
STEP = settings(max_examples=60, deadline=None)


def host(be, a):
    """A backend result as a numpy array (asserting to_host gives one)."""
    h = be.to_host(a)
    assert isinstance(h, np.ndarray), f"to_host returned {type(h)}"
    return h


# ============================================================================ tolerances


def _reduction(model, n=1, params=False):
    """Longest reduction of a forward + backward pass (and of the parameter gradients:
    summed over the batch and the conv output positions)."""
    longest = max(2, model.num_classes)
    for i, layer in enumerate(model.layers):
        src, dst = model.shapes[i], model.shapes[i + 1]
        if layer.type == "dense":
            longest = max(longest, src[0], dst[0], n if params else 0)
        elif layer.type == "conv2d":
            kh, kw = layer.kernel
            area = dst[1] * dst[2]
            longest = max(longest, src[0] * kh * kw, dst[0] * kh * kw,
                          n * area if params else 0)
        elif layer.type == "maxpool2d":
            longest = max(longest, layer.kernel[0] * layer.kernel[1])
        elif layer.type == "rbf":
            longest = max(longest, src[0], dst[0], n if params else 0)
    return longest


def _tol(dtype, length, scale):
    if np.dtype(dtype) == np.float64:
        return 1e-9 * scale
    return 32 * np.sqrt(length) * EPS[np.dtype(np.float32)] * scale


def assert_close(got, want, dtype, length, what, scale=None):
    """got (backend, dtype) == want (float64 reference) to the dtype's tolerance."""
    got = np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype} != {np.dtype(dtype)}"
    if scale is None:
        scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    tol = _tol(dtype, length, scale)
    err = np.abs(got.astype(np.float64) - want)
    assert not (err > tol).any(), (f"{what}: max error {err.max():.3g} > {tol:.3g} at "
                                   f"{np.argwhere(err > tol)[:3].tolist()}")


# ============================================================================ kinks


def kink_margin(model64, x64):
    """Per-image relative distance (N,) of the float64 forward pass to a kink: ReLU inputs
    from 0 and max-pool window maxima from their runner-up, each relative to
    max(1, max|layer input|). A tie of exact zeros in a window after a ReLU is harmless (the
    ReLU already blocks those gradients, whichever zero wins) and is not counted."""
    n = len(x64)
    margin = np.full(n, np.inf)
    h = x64
    prev = None
    for i, (layer, p) in enumerate(zip(model64.layers, model64.params)):
        scale = max(1.0, float(np.max(np.abs(h)))) if h.size else 1.0
        if layer.type == "relu":
            margin = np.minimum(margin, np.abs(h).reshape(n, -1).min(axis=1) / scale)
        elif layer.type == "maxpool2d" and layer.kernel[0] * layer.kernel[1] > 1:
            (kh, kw), (sh, sw) = layer.kernel, layer.stride
            win = sliding_window_view(h, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
            win = np.sort(win.reshape(*win.shape[:4], kh * kw), axis=-1)
            top, second = win[..., -1], win[..., -2]
            gap = (top - second) / scale
            if prev == "relu":
                gap = np.where(top == 0, np.inf, gap)
            margin = np.minimum(margin, gap.reshape(n, -1).min(axis=1))
        elif layer.type == "maxout" and layer.pieces > 1:
            g = np.sort(h.reshape(n, -1, layer.pieces), axis=-1)
            margin = np.minimum(margin, ((g[..., -1] - g[..., -2]) / scale).min(axis=1))
        h, _ = network.layer_forward(layer, p, h, model64.shapes[i])
        prev = layer.type
    return margin


def cw_margin(z64, y):
    """Per-image relative gap between the best and second-best logit among the classes
    other than y (the C&W gradient picks the best): inf when there is only one other."""
    z = z64 if z64.shape[1] > 1 else np.concatenate([np.zeros_like(z64), z64], axis=1)
    if z.shape[1] <= 2:
        return np.full(len(z), np.inf)
    others = z.copy()
    others[np.arange(len(z)), y] = -np.inf
    s = np.sort(others, axis=1)
    return (s[:, -1] - s[:, -2]) / np.maximum(1.0, np.abs(z).max(axis=1))


def top2_margin(z64):
    """Per-image relative margin of the predicted class (|z| for a one-logit model)."""
    if z64.shape[1] == 1:
        return np.abs(z64[:, 0]) / np.maximum(1.0, np.abs(z64[:, 0]))
    s = np.sort(z64, axis=1)
    return (s[:, -1] - s[:, -2]) / np.maximum(1.0, np.abs(z64).max(axis=1))


# ============================================================================ models, data


def _fixed(layers, shape, seed):
    return randomize(Sequential(layers, shape, seed=seed, dtype=np.float64), seed + 1)


# Architectures the random strategy might miss: strided 'same' (asymmetric) and explicit
# asymmetric pads, overlapping pools after ReLU and tanh, every activation, one-logit models.
FIXED = {
    "mlp": lambda: _fixed([Flatten(), Dense(7), ReLU(), Dense(5), Tanh(), Dense(4)],
                          (1, 4, 4), 10),
    "conv_same_s2_pool": lambda: _fixed([Conv2D(3, 3, 2, "same"), ReLU(), MaxPool2D(2, 1),
                                         Flatten(), Dense(3)], (2, 7, 6), 20),
    "conv_asym_pads": lambda: _fixed([Conv2D(2, (2, 3), (1, 2), (0, 1, 2, 0)), Sigmoid(),
                                      Conv2D(3, 2, 1, "valid"), ReLU(), Flatten(), Dense(5),
                                      Tanh(), Dense(4)], (1, 6, 7), 30),
    "conv_overlap_pool": lambda: _fixed([Conv2D(3, 3, 1, "valid"), Tanh(), MaxPool2D(3, 2),
                                         Flatten(), Dense(3)], (3, 8, 8), 40),
    "binary_cnn": lambda: _fixed([Conv2D(2, 3, 2, "same"), ReLU(), Flatten(), Dense(1)],
                                 (1, 5, 5), 50),
    "binary_logreg": lambda: _fixed([Flatten(), Dense(1)], (1, 3, 3), 60),
    # maxout after a multi-channel conv's flatten (a backend holding NHWC rows must group
    # the caller's features); rbf units between dense layers, and as the logits.
    "maxout": lambda: _fixed([Conv2D(2, 2, 1, "valid"), Flatten(), Maxout(3), Dense(6),
                              Maxout(2), Dense(4)], (1, 4, 4), 80),
    "rbf": lambda: _fixed([Flatten(), RBF(5), Dense(4), Tanh(), RBF(3)], (2, 2, 2), 90),
}


def clear_batch(model64, rng, n, dtype, loss=None, tries=30):
    """(x (N, *S) in dtype, labels) whose float64 forward pass is clearly away from every
    kink (redrawn until it is); None when no draw is clear."""
    for _ in range(tries):
        x = rng.uniform(-1, 1, (n, *model64.input_shape)).astype(dtype)
        y = random_labels(model64, rng, n)
        x64 = x.astype(np.float64)
        ok = kink_margin(model64, x64) > _KINK[np.dtype(dtype)]
        if loss == "cw":
            ok &= cw_margin(REF.logits(model64, x64), y) > _KINK[np.dtype(dtype)]
        if ok.all():
            return x, y
    return None


def _case(model, dtype, rng, n, loss=None):
    """The model in dtype, the same weights in float64, and a kink-free batch (or None)."""
    dt = np.dtype(dtype)
    m_dt = model.astype(dt) if model.dtype != dt else model
    m64 = m_dt.astype(np.float64) if dt != np.float64 else m_dt
    batch = clear_batch(m64, rng, n, dt, loss)
    return m_dt, m64, batch


def _snapshot(model):
    return [{k: a.copy() for k, a in p.items()} for p in model.params]


def _same_params(model, snap):
    return all(np.array_equal(a, snap[i][k]) for i, p in enumerate(model.params)
               for k, a in p.items())


# ============================================================================ network checks


def check_forward_and_grad(be, model, m_dt, m64, x, y, loss, cast_in_prepare):
    """prepare + logits + loss_grad against the reference; dtype kept, inputs untouched."""
    dt = x.dtype
    snap = _snapshot(model)
    net = be.prepare(model if cast_in_prepare else m_dt, dt)
    xd, yd = be.to_device(x), be.to_device(y)
    x64 = x.astype(np.float64)
    length = _reduction(m64)

    z_ref = REF.logits(m64, x64)
    z = host(be, be.logits(net, xd))
    assert_close(z, z_ref, dt, length, "logits")

    v_ref, dx_ref, z2_ref = REF.loss_grad(m64, x64, y, loss)
    v, dx, z2 = (host(be, a) for a in be.loss_grad(net, xd, yd, loss))
    assert_close(v, v_ref, dt, length, f"{loss} loss values")
    assert_close(dx, dx_ref, dt, length, f"{loss} input gradient")
    assert_close(z2, z2_ref, dt, length, "loss_grad logits")

    np.testing.assert_array_equal(host(be, xd), x)
    np.testing.assert_array_equal(host(be, yd), y)
    assert _same_params(model, snap), "prepare modified the model"


def check_jacobian(be, m_dt, m64, x, rng):
    """Full Jacobian (seeds None) and seeded rows (N, 2, K) against the reference and
    against the einsum of the seeds with the backend's own full Jacobian."""
    dt = x.dtype
    n, k = len(x), m64.num_logits
    d = int(np.prod(m64.input_shape))
    net = be.prepare(m_dt, dt)
    xd = be.to_device(x)
    x64 = x.astype(np.float64)
    length = _reduction(m64)

    j_ref, z_ref = REF.jacobian(m64, x64)
    j, z = (host(be, a) for a in be.jacobian(net, xd))
    assert j.shape == (n, k, d)
    assert_close(j, j_ref, dt, length, "jacobian")
    assert_close(z, z_ref, dt, length, "jacobian logits")

    seeds_ = rng.standard_normal((n, 2, k)).astype(dt)
    sd = be.to_device(seeds_)
    js, zs = (host(be, a) for a in be.jacobian(net, xd, sd))
    assert js.shape == (n, 2, d)
    s64 = seeds_.astype(np.float64)
    # the magnitude of the K summed terms s_k J_kd, not of their (possibly cancelling) sum
    scale = max(1.0, float(np.max(np.einsum("nrk,nkd->nrd", np.abs(s64), np.abs(j_ref)))))
    assert_close(js, np.einsum("nrk,nkd->nrd", s64, j_ref), dt, length * k, "seeded jacobian",
                 scale)
    assert_close(js, np.einsum("nrk,nkd->nrd", s64, j.astype(np.float64)), dt, length * k,
                 "seeded jacobian vs einsum of the backend's own full jacobian", scale)
    assert_close(zs, z_ref, dt, length, "seeded jacobian logits")
    np.testing.assert_array_equal(host(be, sd), seeds_)
    np.testing.assert_array_equal(host(be, xd), x)


def check_param_grads(be, m_dt, m64, x, y, loss):
    dt = x.dtype
    net = be.prepare(m_dt, dt)
    xd, yd = be.to_device(x), be.to_device(y)
    length = _reduction(m64, len(x), params=True)
    l_ref, g_ref = REF.param_grads(m64, x.astype(np.float64), y, loss)
    l, g = be.param_grads(net, xd, yd, loss)
    assert np.ndim(l) == 0
    assert_close(np.asarray(float(l), dtype=dt), l_ref, dt, length, "mean loss")
    assert len(g) == len(g_ref)
    for i, (gi, ri) in enumerate(zip(g, g_ref)):
        assert sorted(gi) == sorted(ri), f"layer {i}: grads {sorted(gi)} != {sorted(ri)}"
        for key in ri:
            assert_close(host(be, gi[key]), ri[key], dt, length, f"layer {i} d{key}")
    np.testing.assert_array_equal(host(be, xd), x)


# ---------------------------------------------------------------------------- random models


@over_backends
@NET
@given(model=small_models(), seed=seeds, n=st.integers(1, 4), dtype=dtypes,
       loss=st.sampled_from(["ce", "cw"]), cast_in_prepare=st.booleans())
def test_logits_and_loss_grad_random_models(name, model, seed, n, dtype, loss, cast_in_prepare):
    rng = np.random.default_rng(seed)
    m_dt, m64, batch = _case(model, dtype, rng, n, loss)
    assume(batch is not None)
    check_forward_and_grad(kernels.get(name), model, m_dt, m64, *batch, loss, cast_in_prepare)


@over_backends
@NET
@given(model=small_models(), seed=seeds, n=st.integers(1, 4), dtype=dtypes)
def test_jacobian_random_models(name, model, seed, n, dtype):
    rng = np.random.default_rng(seed)
    m_dt, m64, batch = _case(model, dtype, rng, n)
    assume(batch is not None)
    check_jacobian(kernels.get(name), m_dt, m64, batch[0], rng)


@over_backends
@NET
@given(model=small_models(), seed=seeds, n=st.integers(1, 5), dtype=dtypes,
       loss=st.sampled_from(["ce", "cw"]))
def test_param_grads_random_models(name, model, seed, n, dtype, loss):
    rng = np.random.default_rng(seed)
    m_dt, m64, batch = _case(model, dtype, rng, n, loss)
    assume(batch is not None)
    check_param_grads(kernels.get(name), m_dt, m64, *batch, loss)


# ---------------------------------------------------------------------------- fixed models


@over_backends
@pytest.mark.parametrize("arch", sorted(FIXED))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_network_primitives_fixed_models(name, arch, dtype, loss):
    be = kernels.get(name)
    model = FIXED[arch]()
    rng = np.random.default_rng(7)
    m_dt, m64, batch = _case(model, dtype, rng, 9, loss)
    assert batch is not None, "no kink-free batch in 30 draws"
    check_forward_and_grad(be, model, m_dt, m64, *batch, loss, cast_in_prepare=True)
    check_jacobian(be, m_dt, m64, batch[0], rng)
    check_param_grads(be, m_dt, m64, *batch, loss)


@over_backends
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_network_primitives_large_batch(name, dtype):
    """A batch big enough (~2e7 FLOPs a forward pass) that a backend may split it into chunks
    or threads. Redrawing 300 images until all clear their ReLU kinks would rarely succeed,
    so this model is smooth (tanh, sigmoid; no ReLU, no pool)."""
    be = kernels.get(name)
    model = _fixed([Conv2D(8, 3, 1, "same"), Tanh(), Conv2D(8, 3, 2, "valid"), Sigmoid(),
                    Flatten(), Dense(10)], (2, 12, 12), 70)
    rng = np.random.default_rng(8)
    # A simulated GPU backend runs every kernel thread in Python: 300 images would take
    # minutes there, and it chunks at 256 KiB, a row or two of this model's activations, so
    # 16 images already span 8-16 chunks.
    m_dt, m64, batch = _case(model, dtype, rng, 16 if getattr(be, "SIMULATED", False) else 300)
    x, y = batch
    check_forward_and_grad(be, model, m_dt, m64, x, y, "ce", cast_in_prepare=False)
    check_jacobian(be, m_dt, m64, x[:40], rng)
    check_param_grads(be, m_dt, m64, x, y, "ce")


_EMPTY_ARCHS = ["mlp", "conv_asym_pads", "binary_cnn",
                "conv_same_s2_pool", "maxout", "rbf"]


def _empty(name, arch):
    be = kernels.get(name)
    model = FIXED[arch]()
    x = np.zeros((0, *model.input_shape))
    return be, model, be.prepare(model, np.float64), x, be.to_device(x)


def _check_empty(be, got, ref, shapes):
    assert [r.shape for r in ref] == shapes
    assert [host(be, g).shape for g in got] == shapes
    assert all(host(be, g).dtype == np.float64 for g in got)


@over_backends
@pytest.mark.parametrize("arch", _EMPTY_ARCHS)
def test_logits_and_loss_grad_empty_batch(name, arch):
    """N = 0 (the projections accept empty batches): empty results of the right shapes."""
    be, model, net, x, xd = _empty(name, arch)
    y = np.zeros(0, dtype=np.int64)
    k = model.num_logits
    ref = [REF.logits(model, x), *REF.loss_grad(model, x, y, "ce")]
    got = [be.logits(net, xd), *be.loss_grad(net, xd, be.to_device(y), "ce")]
    _check_empty(be, got, ref, [(0, k), (0,), (0, *model.input_shape), (0, k)])


@over_backends
@pytest.mark.parametrize("arch", _EMPTY_ARCHS)
def test_jacobian_empty_batch(name, arch):
    be, model, net, x, xd = _empty(name, arch)
    k, d = model.num_logits, int(np.prod(model.input_shape))
    seeds_ = np.zeros((0, 2, k))
    ref = [*REF.jacobian(model, x), *REF.jacobian(model, x, seeds_)]
    got = [*be.jacobian(net, xd), *be.jacobian(net, xd, be.to_device(seeds_))]
    _check_empty(be, got, ref, [(0, k, d), (0, k), (0, 2, d), (0, k)])


# ============================================================================ steps


_BOXES = [(0.0, 1.0), (-1.0, 1.0), (-0.5, 2.0)]
_SHAPES = [(1,), (5,), (1, 4, 4), (2, 3, 5), (3, 1, 7)]


def step_inputs(rng, n, shape, dtype, box, int_grad=False):
    """(xa, g, x0, eps, alpha, active) with the corner cases of a projected step: points on
    the box faces, x0 on the faces, steps leaving the ball and the box, zero and -0.0
    gradient entries, an all-zero and a tiny gradient image, eps == 0 / alpha == 0 images,
    inactive images. eps, alpha are (N,) arrays in dtype (as the engine passes them)."""
    lo, hi = box
    dt = np.dtype(dtype)
    size = (n, *shape)
    x0 = rng.uniform(lo, hi, size)
    x0 = np.where(rng.random(size) < 0.15, lo, x0)
    x0 = np.where(rng.random(size) < 0.15, hi, x0)
    xa = np.clip(x0 + rng.uniform(-0.6, 0.6, size), lo, hi)
    xa = np.where(rng.random(size) < 0.15, lo, xa)
    xa = np.where(rng.random(size) < 0.15, hi, xa)
    if int_grad:  # many exactly equal |g| (quantile ties for the L1 step)
        g = rng.integers(-3, 4, size).astype(np.float64)
    else:
        g = rng.standard_normal(size)
        g = np.where(rng.random(size) < 0.2, 0.0, g)
        g = np.where(rng.random(size) < 0.05, -0.0, g)
    kind = rng.integers(0, 4, n)
    g[kind == 1] = 0.0                                   # no gradient at all
    g[kind == 2] *= 1e-30                                # tiny (squares underflow in float32)
    eps = rng.uniform(0, 0.5, n) * (rng.random(n) > 0.15)
    alpha = rng.uniform(0, 0.4, n) * (rng.random(n) > 0.1)
    active = rng.random(n) < 0.75
    return (xa.astype(dt), g.astype(dt), x0.astype(dt), eps.astype(dt), alpha.astype(dt),
            active)


def run_step(be, prim, args, extra=()):
    """Call a step primitive on device copies; return the result and assert that the device
    inputs are untouched."""
    dev = [be.to_device(a) for a in args]
    out = host(be, getattr(be, prim)(dev[0], dev[1], dev[2], dev[3], dev[4], *extra[:2],
                                     dev[5], *extra[2:]))
    for a, d in zip(args, dev):
        np.testing.assert_array_equal(host(be, d), a, err_msg=f"{prim} modified an input")
    return out


def bits(a):
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


@over_backends
@STEP
@given(seed=seeds, n=st.integers(0, 6), shape=st.sampled_from(_SHAPES), dtype=dtypes,
       box=st.sampled_from(_BOXES))
def test_linf_step_is_bit_exact(name, seed, n, shape, dtype, box):
    be = kernels.get(name)
    args = step_inputs(np.random.default_rng(seed), n, shape, dtype, box)
    lo, hi = box
    got = run_step(be, "linf_step", args, (lo, hi))
    ref = REF.linf_step(*args[:5], lo, hi, args[5])
    assert got.dtype == np.dtype(dtype) and got.shape == ref.shape
    np.testing.assert_array_equal(bits(got), bits(ref))


def _check_ball_box(got, ref, args, box, ord_, what):
    xa, _, x0, eps, _, active = args
    dt = xa.dtype
    lo, hi = box
    assert got.dtype == dt and got.shape == ref.shape
    assert ((got >= dt.type(lo)) & (got <= dt.type(hi))).all(), f"{what}: left the box"
    np.testing.assert_array_equal(bits(got[~active]), bits(xa[~active]))
    scale = max(1.0, abs(lo), abs(hi))
    tol = (4 if dt == np.float64 else 8) * EPS[dt] * scale
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    assert (err <= tol).all(), f"{what}: max error {err.max():.3g} > {tol:.3g}"
    d = int(np.prod(xa.shape[1:]))
    delta = (got.astype(np.float64) - x0.astype(np.float64)).reshape(len(xa), d)
    norms = np.linalg.norm(delta, ord=ord_, axis=1)
    slack = (np.sqrt(d) if ord_ == 2 else d) * 4 * EPS[dt] * scale
    inside = norms <= eps.astype(np.float64) * (1 + 4 * EPS[dt]) + slack
    # an inactive image keeps xa, which need not be in the ball
    assert (inside | ~active).all(), f"{what}: left the ball: {norms} > {eps}"


@over_backends
@STEP
@given(seed=seeds, n=st.integers(0, 6), shape=st.sampled_from(_SHAPES), dtype=dtypes,
       box=st.sampled_from(_BOXES))
def test_l2_step_matches_and_stays_in_ball_and_box(name, seed, n, shape, dtype, box):
    be = kernels.get(name)
    args = step_inputs(np.random.default_rng(seed), n, shape, dtype, box)
    lo, hi = box
    got = run_step(be, "l2_step", args, (lo, hi))
    ref = REF.l2_step(*args[:5], lo, hi, args[5])
    _check_ball_box(got, ref, args, box, 2, "l2_step")


@over_backends
@STEP
@given(seed=seeds, n=st.integers(0, 6), shape=st.sampled_from(_SHAPES), dtype=dtypes,
       box=st.sampled_from(_BOXES), sparsity=st.sampled_from([0.0, 0.5, 0.8, 0.95, 1.0]),
       int_grad=st.booleans())
def test_l1_step_matches_and_stays_in_ball_and_box(name, seed, n, shape, dtype, box, sparsity,
                                                   int_grad):
    be = kernels.get(name)
    args = step_inputs(np.random.default_rng(seed), n, shape, dtype, box, int_grad)
    lo, hi = box
    got = run_step(be, "l1_step", args, (lo, hi, sparsity))
    ref = REF.l1_step(*args[:5], lo, hi, args[5], sparsity)
    _check_ball_box(got, ref, args, box, 1, "l1_step")


@over_backends
@STEP
@given(seed=seeds, n=st.integers(0, 6), shape=st.sampled_from(_SHAPES), dtype=dtypes,
       box=st.sampled_from(_BOXES), decay=st.sampled_from([0.0, 0.5, 1.0]), flip=st.booleans())
def test_momentum_step_is_the_composed_step_and_the_reference(name, seed, n, shape, dtype, box,
                                                              decay, flip):
    """momentum_step equals composed_momentum_step on the same backend bit for bit, and the
    reference (momentum_update, then the L-inf step): exactly where the backend's arrays are
    NumPy's (numpy's pairwise L1 sum replicated), else the momentum to a D-term sum's
    rounding and the image wherever the momentum's sign is clear. Inputs untouched."""
    be = kernels.get(name)
    rng = np.random.default_rng(seed)
    xa, g, x0, eps, alpha, active = step_inputs(rng, n, shape, dtype, box)
    d = int(np.prod(shape))
    mom = rng.standard_normal((n, d)) * rng.choice([0.0, 1e-3, 1.0], size=(n, 1))
    lo, hi = box
    args = (xa, g, mom, x0, eps, alpha, active)
    dev = [be.to_device(a) for a in args]

    def call(fn):
        out_x, out_m = fn(dev[0], dev[1], dev[2], decay, flip, dev[3], dev[4], dev[5], lo, hi,
                          dev[6])
        return host(be, out_x), host(be, out_m)

    got_x, got_m = call(be.momentum_step)
    for a, dv in zip(args, dev):
        np.testing.assert_array_equal(host(be, dv), a, err_msg="momentum_step modified an input")
    want_x, want_m = call(lambda *a: composed_momentum_step(be, *a))
    assert got_x.dtype == np.dtype(dtype) and got_x.shape == xa.shape
    assert got_m.dtype == np.float64 and got_m.shape == (n, d)
    np.testing.assert_array_equal(bits(got_m), bits(want_m))
    np.testing.assert_array_equal(bits(got_x), bits(want_x))
    ref_m = ga.momentum_update((-g if flip else g).reshape(n, d), mom, decay)
    ref_x = REF.linf_step(xa, ref_m.reshape(xa.shape).astype(dtype), x0, eps, alpha, lo, hi,
                          active)
    if be.xp is np:
        np.testing.assert_array_equal(bits(got_m), bits(ref_m))
        np.testing.assert_array_equal(bits(got_x), bits(ref_x))
    else:
        np.testing.assert_allclose(got_m, ref_m, rtol=4 * np.sqrt(d) * EPS[np.dtype(np.float64)],
                                   atol=1e-300)
        scale = np.abs(ref_m).max(axis=1, keepdims=True) if n else ref_m
        clear = (np.abs(ref_m) > 1e-9 * scale).reshape(xa.shape)
        np.testing.assert_array_equal(got_x[clear], ref_x[clear])


@pytest.mark.parametrize("name", kernels.available())
def test_momentum_step_bad_input_names_the_argument(name):
    be = kernels.get(name)
    xa = np.full((2, 3), 0.5)
    g = np.array([[1.0, -2.0, 0.0], [0.0, 0.0, 0.0]])
    mom, eps, alpha, active = np.zeros((2, 3)), np.full(2, 0.1), np.full(2, 0.01), np.ones(2, bool)

    def call(g=g, mom=mom, decay=1.0):
        d = [be.to_device(a) for a in (xa, g, mom, xa, eps, alpha, active)]
        return be.momentum_step(d[0], d[1], d[2], decay, False, d[3], d[4], d[5], 0.0, 1.0, d[6])

    for bad, err, msg in [(dict(mom=np.zeros((2, 4))), ShapeError, "mom must have shape"),
                          (dict(mom=np.zeros((2, 3), np.float32)), AdvkernError, "mom must be"),
                          (dict(decay=-1.0), AdvkernError, "decay must be"),
                          (dict(decay=float("nan")), AdvkernError, "decay must be"),
                          (dict(g=np.array([[np.nan, 1.0, 0.0], [0.0] * 3])), AdvkernError,
                           r"contains 1 NaN/Inf")]:
        with pytest.raises(err, match=msg):
            call(**bad)
    x2, m2 = call()          # the zero-gradient image: no momentum, no step
    assert np.array_equal(host(be, m2), [[1 / 3, -2 / 3, 0.0], [0.0, 0.0, 0.0]])
    assert np.array_equal(host(be, x2), [[0.51, 0.49, 0.5], [0.5, 0.5, 0.5]])


@over_backends
@NET
@given(model=small_models(), seed=seeds, n=st.integers(0, 4), dtype=dtypes,
       loss=st.sampled_from(["ce", "cw"]), norm=st.sampled_from(["linf", "l2", "l1"]),
       flip=st.booleans())
def test_pgd_step_is_loss_grad_then_step(name, model, seed, n, dtype, loss, norm, flip):
    """pgd_step (fused on some backends) is the backend's own loss_grad, then its step along
    -g when flip, bit for bit; inputs untouched."""
    be = kernels.get(name)
    rng = np.random.default_rng(seed)
    m = model.astype(dtype)
    net = be.prepare(m, dtype)
    x0 = rng.random((n, *m.input_shape)).astype(dtype)
    xa = np.clip(x0 + rng.uniform(-0.2, 0.2, x0.shape), 0, 1).astype(dtype)
    args = (xa, random_labels(m, rng, n), x0, rng.uniform(0, 0.3, n).astype(dtype),
            rng.uniform(0, 0.1, n).astype(dtype), rng.random(n) < 0.8)
    dev = [be.to_device(a) for a in args]

    def call(fn):
        return host(be, fn(net, dev[0], dev[1], loss, flip, dev[2], dev[3], dev[4], 0.0, 1.0,
                           dev[5], norm, 0.9))

    got = call(be.pgd_step)
    want = call(lambda *a: composed_pgd_step(be, *a))
    assert got.dtype == np.dtype(dtype) and got.shape == xa.shape
    np.testing.assert_array_equal(bits(got), bits(want))
    for a, d in zip(args, dev):
        np.testing.assert_array_equal(host(be, d), a, err_msg="pgd_step modified an input")


@pytest.mark.parametrize("name", kernels.available())
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_rejects_nonfinite_like_the_step(name, norm):
    be = kernels.get(name)
    m = Sequential([Flatten(), Dense(3)], (1, 2, 2), seed=0, dtype=np.float32)
    net = be.prepare(m, np.float32)
    x0 = np.full((2, 1, 2, 2), 0.5, np.float32)
    xa = x0.copy()
    xa[1, 0, 0, 1] = np.nan
    args = (net, be.to_device(xa), be.to_device(np.array([0, 1])), "ce", False,
            be.to_device(x0), 0.1, 0.01, 0.0, 1.0, be.to_device(np.ones(2, bool)), norm, 0.9)
    with pytest.raises(AdvkernError) as fused:
        be.pgd_step(*args)
    with pytest.raises(AdvkernError) as composed:
        composed_pgd_step(be, *args)
    assert str(fused.value) == str(composed.value)
    assert "NaN/Inf" in str(fused.value)


# ============================================================================ JSMA search


def jsma_inputs(rng, n, d, dtype, values):
    """a, b (N, d) and a domain with empty, single-feature, sparse and full rows."""
    if values == "int":          # many exact ties of sums and products, and zeros
        a = rng.integers(-3, 4, (n, d)).astype(dtype)
        b = rng.integers(-3, 4, (n, d)).astype(dtype)
    elif values == "few":        # a handful of distinct non-integer values
        choices = np.array([-1.5, -0.25, 0.0, 0.125, 0.75, 2.5])
        a, b = (rng.choice(choices, (n, d)).astype(dtype) for _ in range(2))
    else:
        a, b = (rng.standard_normal((n, d)).astype(dtype) for _ in range(2))
    density = rng.choice([0.0, 0.1, 0.5, 1.0], n)
    domain = rng.random((n, d)) < density[:, None]
    if n > 1 and d > 0:          # exactly one feature: no pair, maybe a single feature
        domain[1] = False
        domain[1, rng.integers(0, d)] = True
    return a, b, domain


def _jsma(be, a, b, domain, theta):
    dev = [be.to_device(v) for v in (a, b, domain)]
    pair = [host(be, v) for v in be.jsma_best_pair(*dev, theta)]
    single = [host(be, v) for v in be.jsma_best_feature(*dev, theta)]
    for v, dv in zip((a, b, domain), dev):
        np.testing.assert_array_equal(host(be, dv), v)
    return pair, single


def check_jsma(be, a, b, domain, theta):
    pair, single = _jsma(be, a, b, domain, theta)
    pr = REF.jsma_best_pair(a, b, domain, theta)
    sr = REF.jsma_best_feature(a, b, domain, theta)
    for what, got, ref in (("pair p", pair[0], pr[0]), ("pair q", pair[1], pr[1]),
                           ("pair found", pair[2], pr[2]), ("feature i", single[0], sr[0]),
                           ("feature found", single[1], sr[1])):
        assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} != {ref.dtype}"
        np.testing.assert_array_equal(got, ref, err_msg=f"{what} (theta={theta})")


@over_backends
@settings(max_examples=100, deadline=None)
@given(seed=seeds, n=st.integers(0, 5), d=st.integers(0, 40), dtype=dtypes,
       theta=st.sampled_from([1.0, -1.0, 0.3, -2.5]), values=st.sampled_from(["int", "few",
                                                                              "normal"]))
def test_jsma_search_is_identical(name, seed, n, d, dtype, theta, values):
    a, b, domain = jsma_inputs(np.random.default_rng(seed), n, d, dtype, values)
    check_jsma(kernels.get(name), a, b, domain, theta)


@over_backends
@pytest.mark.parametrize("d", [150, 700])
@pytest.mark.parametrize("values", ["int", "normal"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_jsma_search_large_domains(name, d, values, dtype):
    """Domains longer than any block a streamed or pruned search would use."""
    rng = np.random.default_rng(d)
    a, b, domain = jsma_inputs(rng, 4, d, dtype, values)
    be = kernels.get(name)
    for theta in (1.0, -1.0):
        check_jsma(be, a, b, domain, theta)


@over_backends
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_jsma_search_all_empty_and_no_admissible(name, dtype):
    be = kernels.get(name)
    a = np.array([[1, -2, 3, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=dtype)
    b = np.array([[-1, 2, -3, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=dtype)
    for domain in (np.zeros(a.shape, bool), np.ones(a.shape, bool)):
        for theta in (1.0, -1.0):
            check_jsma(be, a, b, domain, theta)
    for n, d in ((0, 5), (3, 0), (0, 0)):        # empty batch, no features
        z = np.zeros((n, d), dtype)
        check_jsma(be, z, z, np.ones((n, d), bool), 1.0)


# ============================================================================ DE


@st.composite
def de_cases(draw):
    """(pop (N, P, dim), lower, upper, input shape) for k = 1..3 pixels: coordinates drawn
    uniformly, on the borders (row = H, col = W exactly, 0) and colliding (the same floor
    as an earlier pixel), values anywhere in the box or on its faces."""
    c = draw(st.sampled_from([1, 3]))
    h, w = draw(st.integers(2, 6)), draw(st.integers(2, 6))
    k = draw(st.integers(1, 3))
    n, p = draw(st.integers(1, 3)), draw(st.integers(4, 7))
    dtype = np.dtype(draw(dtypes))
    rng = np.random.default_rng(draw(seeds))
    lower, upper = rpx.candidate_bounds((c, h, w), k, (0.0, 1.0), dtype)
    pop = np.stack([rpx.init_population(rng, p, lower, upper) for _ in range(n)])
    cand = pop.reshape(n, p, k, 2 + c)
    for j in range(k):
        for axis, size in ((0, h), (1, w)):
            u = rng.random((n, p))
            cand[..., j, axis] = np.where(u < 0.15, size, cand[..., j, axis])
            cand[..., j, axis] = np.where((u >= 0.15) & (u < 0.25), 0, cand[..., j, axis])
            cand[..., j, axis] = np.where((u >= 0.25) & (u < 0.35),
                                          rng.integers(0, size + 1, (n, p)), cand[..., j, axis])
        if j:
            same = rng.random((n, p)) < 0.3
            src = cand[..., j - 1, :2]
            # the same pixel, possibly at a different fraction within it
            moved = np.minimum(np.floor(src) + rng.random((n, p, 2)).astype(dtype),
                               np.array([h, w], dtype))
            cand[..., j, :2] = np.where(same[..., None], moved, cand[..., j, :2])
        v = rng.random((n, p, c))
        cand[..., j, 2:] = np.where(v < 0.1, lower[2], np.where(v > 0.9, upper[2],
                                                                 cand[..., j, 2:]))
    return np.clip(pop, lower, upper).astype(dtype), lower, upper, (c, h, w)


@over_backends
@STEP
@given(case=de_cases(), seed=seeds, F=st.sampled_from([0.5, 1.3]),
       CR=st.sampled_from([None, 0.0, 0.7, 1.0]))
def test_de_step_is_bit_exact(name, case, seed, F, CR):
    be = kernels.get(name)
    pop, lower, upper, _ = case
    n, p, dim = pop.shape
    rng = np.random.default_rng(seed)
    draws = rpx.stack_draws([rpx.de_draws(rng, p, dim, CR) for _ in range(n)])
    pd, ld, ud = be.to_device(pop), be.to_device(lower), be.to_device(upper)
    dd = {key: be.to_device(v) for key, v in draws.items()}
    got = host(be, be.de_step(pd, dd, F, CR, ld, ud))
    ref = REF.de_step(pop, draws, F, CR, lower, upper)
    assert got.dtype == pop.dtype and got.shape == ref.shape
    np.testing.assert_array_equal(bits(got), bits(ref))
    np.testing.assert_array_equal(host(be, pd), pop)
    for key, v in draws.items():
        np.testing.assert_array_equal(host(be, dd[key]), v)


@st.composite
def de_models(draw, shape):
    """A small random model on images of ``shape`` whose first layer is dense (after
    Flatten) or a conv (stride 1-2, any padding), with K = 1..4 logits."""
    _, h, w = shape
    k = draw(st.integers(1, 4))
    act = draw(st.sampled_from([ReLU(), Tanh(), Sigmoid()]))
    if draw(st.booleans()):
        layers = [Flatten(), Dense(draw(st.integers(2, 6))), act, Dense(k)]
    else:
        conv = Conv2D(draw(st.integers(1, 3)), (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                      (draw(st.integers(1, 2)), draw(st.integers(1, 2))), draw(paddings))
        try:
            out = conv.output_shape(shape)
        except ShapeError:
            conv, out = Conv2D(2, 1), (2, h, w)
        layers = [conv, act]
        if draw(st.booleans()) and min(out[1:]) >= 2:
            layers.append(MaxPool2D(2, draw(st.integers(1, 2))))
        layers += [Flatten(), Dense(k)]
    return _fixed(layers, shape, draw(seeds) % 1000)


@over_backends
@settings(max_examples=60, deadline=None)
@given(data=st.data(), case=de_cases(), targeted=st.booleans())
def test_de_score_matches_full_scoring(name, data, case, targeted):
    be = kernels.get(name)
    pop, _, _, shape = case
    dt = pop.dtype
    n, p, _ = pop.shape
    model = data.draw(de_models(shape))
    m_dt = model.astype(dt)
    m64 = m_dt.astype(np.float64)
    rng = np.random.default_rng(data.draw(seeds))
    x = rng.random((n, *shape)).astype(dt)
    labels = random_labels(m64, rng, n)

    net = be.prepare(m_dt, dt)
    xd, ld, pd = be.to_device(x), be.to_device(labels), be.to_device(pop)
    fit, pred = (host(be, a) for a in be.de_score(net, xd, ld, pd, targeted))
    x64, pop64 = x.astype(np.float64), pop.astype(np.float64)
    f_ref, p_ref = REF.de_score(m64, x64, labels, pop64, targeted)
    z_ref = REF.logits(m64, rpx.apply_candidates(x64, pop64)).reshape(n, p, -1)

    scale = max(1.0, float(np.max(np.abs(z_ref))), float(np.max(np.abs(f_ref))))
    assert_close(fit, f_ref, dt, _reduction(m64), "de_score fitness", scale)
    assert pred.dtype == np.int64 and pred.shape == (n, p)
    clear = top2_margin(z_ref.reshape(n * p, -1)).reshape(n, p) > _KINK[dt]
    np.testing.assert_array_equal(pred[clear], p_ref[clear])
    np.testing.assert_array_equal(host(be, xd), x)
    np.testing.assert_array_equal(host(be, pd), pop)
    np.testing.assert_array_equal(host(be, ld), labels)


# ============================================================================ data movement


@over_backends
@pytest.mark.parametrize("dtype", [None, np.float32, np.float64])
def test_to_device_copies_and_to_host_returns_numpy(name, dtype):
    be = kernels.get(name)
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    for a in (base, base[:, ::2], base.T, np.arange(5), np.array([True, False, True])):
        before = a.copy()
        d = be.to_device(a, dtype) if a.dtype.kind == "f" else be.to_device(a)
        want_dt = np.dtype(dtype) if dtype is not None and a.dtype.kind == "f" else a.dtype
        h = be.to_host(d)
        assert isinstance(h, np.ndarray) and h.dtype == want_dt and h.shape == a.shape
        np.testing.assert_array_equal(h, a.astype(want_dt))
        d[0] = not a.flat[0] if a.dtype == bool else a.flat[0] + 99   # write into the result
        np.testing.assert_array_equal(a, before)                       # the input is untouched
        assert not np.array_equal(be.to_host(d), before)
