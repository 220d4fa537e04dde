"""Layer-level tests of advkern.reference.layers: finite differences, brute force, properties.

Every backward is checked against central differences in float64 along random unit
directions (see tests/_helpers.py for the tolerance reasoning); conv and max-pool forwards
are checked against naive loops that share no code with the library.
"""

import warnings

import numpy as np
import pytest
from _helpers import (
    away_from_zero,
    check_directional,
    conv_configs,
    distinct_values,
    pool_configs,
    projected,
    seeds,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from advkern.reference import layers as L
from advkern.reference.layers import conv_output_hw, resolve_padding

# ----------------------------------------------------------------------------- brute force


def naive_conv2d(x, w, b, stride, pads):
    """Direct cross-correlation with explicit bounds checks in place of zero padding."""
    n, c, h, wd = x.shape
    f, _, kh, kw = w.shape
    sh, sw = stride
    top, bottom, left, right = pads
    ho = (h + top + bottom - kh) // sh + 1
    wo = (wd + left + right - kw) // sw + 1
    out = np.zeros((n, f, ho, wo))
    for a in range(n):
        for o in range(f):
            for i in range(ho):
                for j in range(wo):
                    s = float(b[o])
                    for ch in range(c):
                        for u in range(kh):
                            for v in range(kw):
                                r, q = i * sh + u - top, j * sw + v - left
                                if 0 <= r < h and 0 <= q < wd:
                                    s += float(w[o, ch, u, v]) * float(x[a, ch, r, q])
                    out[a, o, i, j] = s
    return out


def naive_maxpool(x, kernel, stride):
    n, c, h, w = x.shape
    (kh, kw), (sh, sw) = kernel, stride
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = np.empty((n, c, ho, wo), x.dtype)
    for a in range(n):
        for ch in range(c):
            for i in range(ho):
                for j in range(wo):
                    out[a, ch, i, j] = max(x[a, ch, i * sh + u, j * sw + v]
                                           for u in range(kh) for v in range(kw))
    return out


def _conv_inputs(cfg, rng, dtype=np.float64):
    x = rng.standard_normal((cfg["n"], cfg["c"], cfg["h"], cfg["w"])).astype(dtype)
    w = rng.standard_normal((cfg["f"], cfg["c"], *cfg["kernel"])).astype(dtype)
    b = rng.standard_normal(cfg["f"]).astype(dtype)
    return x, w, b


# ----------------------------------------------------------------------------- padding


@given(h=st.integers(1, 30), w=st.integers(1, 30), kh=st.integers(1, 7), kw=st.integers(1, 7),
       sh=st.integers(1, 4), sw=st.integers(1, 4))
def test_same_padding_gives_ceil_output_with_extra_pixel_bottom_right(h, w, kh, kw, sh, sw):
    t, b, l, r = resolve_padding("same", (h, w), (kh, kw), (sh, sw))
    assert min(t, b, l, r) >= 0
    assert conv_output_hw((h, w), (kh, kw), (sh, sw), (t, b, l, r)) == (-(-h // sh), -(-w // sw))
    assert b - t in (0, 1) and r - l in (0, 1)  # TensorFlow: the odd pixel at bottom/right
    # The minimal padding: one pixel less would lose an output row / column.
    need_h = max((-(-h // sh) - 1) * sh + kh - h, 0)
    need_w = max((-(-w // sw) - 1) * sw + kw - w, 0)
    assert (t + b, l + r) == (need_h, need_w)


def test_padding_spec_forms():
    args = ((5, 6), (3, 3), (1, 1))
    assert resolve_padding("valid", *args) == (0, 0, 0, 0)
    assert resolve_padding(2, *args) == (2, 2, 2, 2)
    assert resolve_padding((1, 2), *args) == (1, 1, 2, 2)
    assert resolve_padding((1, 2, 3, 4), *args) == (1, 2, 3, 4)
    assert resolve_padding([0, 1, 0, 2], *args) == (0, 1, 0, 2)
    assert resolve_padding("same", (28, 28), (3, 3), (1, 1)) == (1, 1, 1, 1)
    assert resolve_padding("same", (5, 5), (2, 2), (1, 1)) == (0, 1, 0, 1)


@pytest.mark.parametrize("bad", ["full", -1, (1, -1), (1, 2, 3), 1.5, (0, 0, 0, 0.5)])
def test_bad_padding_raises(bad):
    with pytest.raises(ValueError, match="padding"):
        resolve_padding(bad, (5, 5), (3, 3), (1, 1))


# ----------------------------------------------------------------------------- dense


@given(n=st.integers(1, 3), d=st.integers(1, 6), m=st.integers(1, 5), seed=seeds)
def test_dense_gradients_match_finite_differences(n, d, m, seed):
    rng = np.random.default_rng(seed)
    x, w, b = rng.standard_normal((n, d)), rng.standard_normal((d, m)), rng.standard_normal(m)
    out, cache = L.dense_forward(x, w, b)
    np.testing.assert_allclose(out, np.einsum("nd,dm->nm", x, w) + b, rtol=1e-12, atol=1e-12)
    dout = rng.standard_normal(out.shape)
    dx, g = L.dense_backward(dout, cache)
    scale = np.abs(out * dout).sum()
    check_directional(projected(lambda x_: L.dense_forward(x_, w, b)[0], dout), x, dx, rng,
                      scale=scale, what="dense dx")
    check_directional(projected(lambda w_: L.dense_forward(x, w_, b)[0], dout), w, g["w"], rng,
                      scale=scale, what="dense dw")
    check_directional(projected(lambda b_: L.dense_forward(x, w, b_)[0], dout), b, g["b"], rng,
                      scale=scale, what="dense db")


# ----------------------------------------------------------------------------- conv


@given(cfg=conv_configs(), seed=seeds)
def test_conv2d_gradients_match_finite_differences(cfg, seed):
    rng = np.random.default_rng(seed)
    x, w, b = _conv_inputs(cfg, rng)
    stride, pads = cfg["stride"], cfg["pads"]

    def fwd(x_=x, w_=w, b_=b):
        return L.conv2d_forward(x_, w_, b_, stride, pads)[0]

    out, cache = L.conv2d_forward(x, w, b, stride, pads)
    assert out.shape == (cfg["n"], cfg["f"], *cfg["out_hw"])
    dout = rng.standard_normal(out.shape)
    dx, g = L.conv2d_backward(dout, cache)
    assert dx.shape == x.shape and g["w"].shape == w.shape and g["b"].shape == b.shape
    scale = np.abs(out * dout).sum()
    check_directional(projected(lambda a: fwd(x_=a), dout), x, dx, rng, scale=scale,
                      what=f"conv dx {cfg}")
    check_directional(projected(lambda a: fwd(w_=a), dout), w, g["w"], rng, scale=scale,
                      what=f"conv dw {cfg}")
    check_directional(projected(lambda a: fwd(b_=a), dout), b, g["b"], rng, scale=scale,
                      what=f"conv db {cfg}")


@settings(max_examples=25)
@given(cfg=conv_configs(max_hw=7, max_n=2), seed=seeds)
def test_conv2d_forward_equals_naive_direct_convolution(cfg, seed):
    rng = np.random.default_rng(seed)
    x, w, b = _conv_inputs(cfg, rng)
    out, _ = L.conv2d_forward(x, w, b, cfg["stride"], cfg["pads"])
    np.testing.assert_allclose(out, naive_conv2d(x, w, b, cfg["stride"], cfg["pads"]),
                               rtol=1e-12, atol=1e-12)


def test_conv2d_asymmetric_pads_and_strides_by_hand():
    # 1 channel, 3x4 input, 2x2 all-ones kernel, pads (top 1, bottom 0, left 0, right 2),
    # stride (2, 1): each output is the sum of a 2x2 window of the padded input.
    x = np.arange(12, dtype=np.float64).reshape(1, 1, 3, 4)
    w = np.ones((1, 1, 2, 2))
    b = np.array([0.5])
    out, _ = L.conv2d_forward(x, w, b, (2, 1), (1, 0, 0, 2))
    xp = np.zeros((4, 6))
    xp[1:, :4] = x[0, 0]
    want = np.array([[xp[i:i + 2, j:j + 2].sum() + 0.5 for j in range(5)] for i in (0, 2)])
    np.testing.assert_array_equal(out[0, 0], want)
    np.testing.assert_allclose(out, naive_conv2d(x, w, b, (2, 1), (1, 0, 0, 2)))


# ----------------------------------------------------------------------------- maxpool


@given(cfg=pool_configs(), seed=seeds)
def test_maxpool_gradient_matches_finite_differences(cfg, seed):
    rng = np.random.default_rng(seed)
    # Distinct values 1e-2 apart: no window has a tie within reach of h = 1e-6.
    x = distinct_values(rng, (cfg["n"], cfg["c"], cfg["h"], cfg["w"]))
    kernel, stride = cfg["kernel"], cfg["stride"]
    out, cache = L.maxpool2d_forward(x, kernel, stride)
    np.testing.assert_array_equal(out, naive_maxpool(x, kernel, stride))
    dout = rng.standard_normal(out.shape)
    dx, g = L.maxpool2d_backward(dout, cache)
    assert g == {}
    check_directional(projected(lambda a: L.maxpool2d_forward(a, kernel, stride)[0], dout), x,
                      dx, rng, n_dirs=3, scale=np.abs(out * dout).sum(),
                      what=f"maxpool dx {cfg}")
    # The gradient mass is conserved: every output sends its dout to exactly one input.
    np.testing.assert_allclose(dx.sum(), dout.sum(), rtol=1e-12, atol=1e-12)


@given(cfg=pool_configs(max_hw=7), seed=seeds)
def test_maxpool_forward_equals_naive_with_ties(cfg, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, (cfg["n"], cfg["c"], cfg["h"], cfg["w"])).astype(np.float64)
    out, _ = L.maxpool2d_forward(x, cfg["kernel"], cfg["stride"])
    np.testing.assert_array_equal(out, naive_maxpool(x, cfg["kernel"], cfg["stride"]))


def test_maxpool_ties_send_gradient_to_first_maximum_row_major():
    x = np.zeros((1, 1, 4, 4))
    out, cache = L.maxpool2d_forward(x, (2, 2), (2, 2))
    dx, _ = L.maxpool2d_backward(np.ones_like(out), cache)
    want = np.zeros((4, 4))
    want[::2, ::2] = 1
    np.testing.assert_array_equal(dx[0, 0], want)
    # Overlapping windows (stride 1 < kernel 2) on a constant 3x3: each window's gradient
    # goes to its own top-left pixel.
    x = np.full((1, 1, 3, 3), 7.0)
    out, cache = L.maxpool2d_forward(x, (2, 2), (1, 1))
    dx, _ = L.maxpool2d_backward(np.arange(1.0, 5.0).reshape(1, 1, 2, 2), cache)
    np.testing.assert_array_equal(dx[0, 0], [[1, 2, 0], [3, 4, 0], [0, 0, 0]])
    # A later, strictly larger value wins over an earlier one.
    x = np.array([[[[1.0, 3.0], [3.0, 2.0]]]])
    out, cache = L.maxpool2d_forward(x, (2, 2), (2, 2))
    dx, _ = L.maxpool2d_backward(np.ones_like(out), cache)
    np.testing.assert_array_equal(dx[0, 0], [[0, 1], [0, 0]])


def test_maxpool_overlapping_windows_accumulate():
    # 1x3 row, kernel (1, 2), stride 1: the middle (largest) value is the max of both windows.
    x = np.array([[[[0.0, 5.0, 1.0]]]])
    out, cache = L.maxpool2d_forward(x, (1, 2), (1, 1))
    np.testing.assert_array_equal(out, [[[[5.0, 5.0]]]])
    dx, _ = L.maxpool2d_backward(np.array([[[[2.0, 3.0]]]]), cache)
    np.testing.assert_array_equal(dx, [[[[0.0, 5.0, 0.0]]]])


# ----------------------------------------------------------------------------- activations

SHAPES = st.sampled_from([(1, 1), (2, 5), (3, 2, 3, 3), (1, 3, 4, 5)])


@given(shape=SHAPES, seed=seeds)
def test_relu_gradient_matches_finite_differences(shape, seed):
    rng = np.random.default_rng(seed)
    x = away_from_zero(rng, shape)
    out, cache = L.relu_forward(x)
    np.testing.assert_array_equal(out, np.maximum(x, 0))
    dout = rng.standard_normal(shape)
    dx, g = L.relu_backward(dout, cache)
    assert g == {}
    check_directional(projected(lambda a: L.relu_forward(a)[0], dout), x, dx, rng,
                      scale=np.abs(out * dout).sum(), what="relu dx")


def test_relu_derivative_at_zero_is_zero():
    x = np.array([[-1.0, 0.0, 2.0]])
    out, cache = L.relu_forward(x)
    dx, _ = L.relu_backward(np.ones_like(x), cache)
    np.testing.assert_array_equal(out, [[0.0, 0.0, 2.0]])
    np.testing.assert_array_equal(dx, [[0.0, 0.0, 1.0]])


@pytest.mark.parametrize("name, ref", [("tanh", np.tanh),
                                       ("sigmoid", lambda x: 1 / (1 + np.exp(-x)))])
@given(shape=SHAPES, seed=seeds, spread=st.sampled_from([0.5, 3.0, 12.0]))
def test_smooth_activation_gradients_match_finite_differences(name, ref, shape, seed, spread):
    rng = np.random.default_rng(seed)
    fwd, bwd = getattr(L, f"{name}_forward"), getattr(L, f"{name}_backward")
    x = rng.standard_normal(shape) * spread
    out, cache = fwd(x)
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(out, ref(x), rtol=1e-12, atol=1e-15)
    dout = rng.standard_normal(shape)
    dx, g = bwd(dout, cache)
    assert g == {}
    check_directional(projected(lambda a: fwd(a)[0], dout), x, dx, rng,
                      scale=np.abs(out * dout).sum(), what=f"{name} dx")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_and_tanh_saturate_without_overflow(dtype):
    x = np.array([[-800.0, -100.0, -30.0, 0.0, 30.0, 100.0, 800.0]], dtype=dtype)
    # Underflow to 0 is the correct result for exp(-800); overflow, 0/0 or inf-inf are not.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise", divide="raise", invalid="raise"):
            s, sc = L.sigmoid_forward(x)
            ds, _ = L.sigmoid_backward(np.ones_like(x), sc)
            t, tc = L.tanh_forward(x)
            dt, _ = L.tanh_backward(np.ones_like(x), tc)
    for a in (s, ds, t, dt):
        assert a.dtype == dtype and np.all(np.isfinite(a))
    assert s[0, 0] == 0 and s[0, -1] == 1 and s[0, 3] == 0.5
    assert np.all(np.diff(s[0]) >= 0)
    np.testing.assert_allclose(s[0, 2], 1 / (1 + np.exp(30.0)), rtol=1e-5)
    np.testing.assert_allclose(ds[0], s[0] * (1 - s[0]), rtol=1e-6)
    assert ds[0, 0] == 0 and ds[0, -1] == 0 and ds[0, 3] == 0.25
    np.testing.assert_array_equal(t[0, [0, -1]], [-1, 1])


def test_sigmoid_gradient_at_large_inputs_matches_finite_differences():
    rng = np.random.default_rng(0)
    x = np.array([[-800.0, -40.0, -20.0, 20.0, 40.0, 800.0]])
    out, cache = L.sigmoid_forward(x)
    dout = rng.standard_normal(x.shape)
    dx, _ = L.sigmoid_backward(dout, cache)
    check_directional(projected(lambda a: L.sigmoid_forward(a)[0], dout), x, dx, rng,
                      scale=np.abs(out * dout).sum(), what="sigmoid dx at large |x|")


# ----------------------------------------------------------------------------- flatten


@given(shape=SHAPES, seed=seeds)
def test_flatten_is_c_order_and_backward_restores_shape(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    out, cache = L.flatten_forward(x)
    assert out.shape == (shape[0], int(np.prod(shape[1:])))
    np.testing.assert_array_equal(out[-1], x[-1].ravel(order="C"))
    dout = rng.standard_normal(out.shape)
    dx, g = L.flatten_backward(dout, cache)
    assert g == {} and dx.shape == x.shape
    check_directional(projected(lambda a: L.flatten_forward(a)[0], dout), x, dx, rng,
                      scale=np.abs(out * dout).sum(), what="flatten dx")


# ----------------------------------------------------------------------------- all layers

def _layer_cases(rng, dtype):
    """(name, forward(x, *params), x, params) for every layer, small arrays of ``dtype``."""
    img = away_from_zero(rng, (2, 2, 5, 4), dtype=dtype)
    return [
        ("dense", L.dense_forward, rng.standard_normal((3, 4)).astype(dtype),
         (rng.standard_normal((4, 2)).astype(dtype), rng.standard_normal(2).astype(dtype))),
        ("conv2d", lambda x, w, b: L.conv2d_forward(x, w, b, (2, 1), (1, 0, 2, 1)), img,
         (rng.standard_normal((3, 2, 3, 2)).astype(dtype), rng.standard_normal(3).astype(dtype))),
        ("maxpool2d", lambda x: L.maxpool2d_forward(x, (3, 2), (1, 2)), img, ()),
        ("relu", L.relu_forward, img, ()),
        ("tanh", L.tanh_forward, img, ()),
        ("sigmoid", L.sigmoid_forward, img, ()),
        ("flatten", L.flatten_forward, img, ()),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_layer_preserves_dtype_and_leaves_arguments_alone(dtype):
    rng = np.random.default_rng(1)
    for name, fwd, x, params in _layer_cases(rng, dtype):
        backward = getattr(L, f"{name}_backward")
        copies = [a.copy() for a in (x, *params)]
        out, cache = fwd(x, *params)
        dout = rng.standard_normal(out.shape).astype(dtype)
        dout_copy = dout.copy()
        dx, grads = backward(dout, cache)
        assert out.dtype == dtype, name
        assert dx.dtype == dtype and dx.shape == x.shape, name
        for k, gk in grads.items():
            assert gk.dtype == dtype, (name, k)
        for a, c in zip((x, *params), copies):
            np.testing.assert_array_equal(a, c, err_msg=f"{name} modified an input")
        np.testing.assert_array_equal(dout, dout_copy, err_msg=f"{name} modified dout")
        # A second backward from the same cache gives the same answer (cache not consumed).
        dx2, grads2 = backward(dout, cache)
        np.testing.assert_array_equal(dx, dx2, err_msg=name)
        for k in grads:
            np.testing.assert_array_equal(grads[k], grads2[k], err_msg=name)


@given(cfg=conv_configs(max_hw=6), seed=seeds)
def test_need_params_false_gives_the_same_dx_and_no_grads(cfg, seed):
    rng = np.random.default_rng(seed)
    x, w, b = _conv_inputs(cfg, rng)
    out, cache = L.conv2d_forward(x, w, b, cfg["stride"], cfg["pads"])
    dout = rng.standard_normal(out.shape)
    dx, g = L.conv2d_backward(dout, cache)
    dx2, g2 = L.conv2d_backward(dout, cache, need_params=False)
    np.testing.assert_array_equal(dx2, dx)
    assert g2 == {} and set(g) == {"w", "b"}
    xd = x.reshape(len(x), -1)
    out, cache = L.dense_forward(xd, rng.standard_normal((xd.shape[1], 2)),
                                 rng.standard_normal(2))
    dout = rng.standard_normal(out.shape)
    dx, g = L.dense_backward(dout, cache)
    dx2, g2 = L.dense_backward(dout, cache, need_params=False)
    np.testing.assert_array_equal(dx2, dx)
    assert g2 == {} and set(g) == {"w", "b"}


@settings(max_examples=15)
@given(cfg=conv_configs(max_hw=7), seed=seeds)
def test_conv2d_float32_matches_float64(cfg, seed):
    rng = np.random.default_rng(seed)
    x, w, b = _conv_inputs(cfg, rng)
    out64, c64 = L.conv2d_forward(x, w, b, cfg["stride"], cfg["pads"])
    out32, c32 = L.conv2d_forward(*(a.astype(np.float32) for a in (x, w, b)), cfg["stride"],
                                  cfg["pads"])
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-4)
    dout = rng.standard_normal(out64.shape)
    dx64, g64 = L.conv2d_backward(dout, c64)
    dx32, g32 = L.conv2d_backward(dout.astype(np.float32), c32)
    assert dx32.dtype == np.float32 and g32["w"].dtype == np.float32
    np.testing.assert_allclose(dx32, dx64, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g32["w"], g64["w"], rtol=1e-4, atol=1e-4)

