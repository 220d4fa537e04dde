"""The maxout and rbf layers: float64 finite-difference gradient checks of the reference,
brute-force forwards, spec round trips, weight files, the architectures that use them, and
the numba_cpu backend against the reference (the GPU backends are held to the reference by
tests/test_backends.py, whose FIXED models include a maxout and an rbf net)."""

import numpy as np
import pytest
from _helpers import check_directional, distinct_values, projected, randomize, seeds
from hypothesis import given, settings
from hypothesis import strategies as st

from advkern import kernels
from advkern.errors import AdvkernError, ModelFileError, ShapeError
from advkern.nets import RBF, Conv2D, Dense, Flatten, Maxout, Sequential, Tanh, build, load, save
from advkern.nets.datasets import select_classes
from advkern.nets.layers import layer_from_config
from advkern.reference import layers as L
from advkern.reference import network

FAST = settings(max_examples=15, deadline=None)


# ----------------------------------------------------------------------------- maxout


@FAST
@given(n=st.integers(1, 3), m=st.integers(1, 4), k=st.integers(1, 4), seed=seeds)
def test_maxout_forward_is_the_group_max_and_gradient_matches(n, m, k, seed):
    rng = np.random.default_rng(seed)
    x = distinct_values(rng, (n, m * k))   # no ties: the max is differentiable
    out, cache = L.maxout_forward(x, k)
    want = np.array([[max(x[a, j * k:(j + 1) * k]) for j in range(m)] for a in range(n)])
    np.testing.assert_array_equal(out, want)
    dout = rng.standard_normal(out.shape)
    dx, g = L.maxout_backward(dout, cache)
    assert g == {} and dx.shape == x.shape
    # each group passes its gradient to its winner only
    assert np.count_nonzero(dx) <= out.size
    check_directional(projected(lambda x_: L.maxout_forward(x_, k)[0], dout), x, dx, rng,
                      scale=np.abs(out * dout).sum(), h=1e-4, what="maxout dx")


def test_maxout_tie_goes_to_the_first_piece():
    x = np.array([[1.0, 3.0, 3.0, 0.0]])
    out, cache = L.maxout_forward(x, 4)
    dx, _ = L.maxout_backward(np.array([[2.0]]), cache)
    assert out[0, 0] == 3.0
    np.testing.assert_array_equal(dx, [[0.0, 2.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------- rbf


def _rbf_inputs(rng, n, d, m):
    x = rng.standard_normal((n, d))
    c = x[rng.integers(0, n, m)] + 0.7 * rng.standard_normal((m, d))
    log_beta = rng.uniform(-1.5, 0.0, m) - np.log(d)
    return x, c, log_beta


@FAST
@given(n=st.integers(1, 4), d=st.integers(1, 6), m=st.integers(1, 5), seed=seeds)
def test_rbf_gradients_match_finite_differences(n, d, m, seed):
    rng = np.random.default_rng(seed)
    x, c, lb = _rbf_inputs(rng, n, d, m)
    out, cache = L.rbf_forward(x, c, lb)
    want = np.exp(-np.exp(lb) * ((x[:, None, :] - c[None]) ** 2).sum(axis=2))
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-14)
    dout = rng.standard_normal(out.shape)
    dx, g = L.rbf_backward(dout, cache)
    assert sorted(g) == ["c", "log_beta"]
    scale = np.abs(out * dout).sum()
    check_directional(projected(lambda x_: L.rbf_forward(x_, c, lb)[0], dout), x, dx, rng,
                      scale=scale, what="rbf dx")
    check_directional(projected(lambda c_: L.rbf_forward(x, c_, lb)[0], dout), c, g["c"], rng,
                      scale=scale, what="rbf dc")
    check_directional(projected(lambda b_: L.rbf_forward(x, c, b_)[0], dout), lb,
                      g["log_beta"], rng, scale=scale, what="rbf dlog_beta")
    dx2, g2 = L.rbf_backward(dout, cache, need_params=False)
    assert g2 == {}
    np.testing.assert_array_equal(dx2, dx)


def test_rbf_clamps_the_squared_distance_at_zero():
    """At a centre the expansion cancels to -1.1e-13 for this x: the clamp keeps the unit
    at exactly 1 (never above) with a zero gradient there."""
    x = np.array([[13.04, 9.47, -7.04]])
    raw = np.sum(x * x, axis=1)[:, None] - 2 * (x @ x.T) + np.sum(x * x, axis=1)
    assert raw[0, 0] < 0  # the unclamped sum is off by rounding
    out, cache = L.rbf_forward(x, x.copy(), np.array([3.0]))
    assert out[0, 0] == 1.0
    dx, g = L.rbf_backward(np.ones((1, 1)), cache)
    np.testing.assert_array_equal(dx, 0)
    np.testing.assert_array_equal(g["c"], 0)


def test_rbf_beta_is_positive_for_any_log_beta():
    rng = np.random.default_rng(0)
    x, c, _ = _rbf_inputs(rng, 3, 4, 2)
    near, _ = L.rbf_forward(c[:1], c, np.array([-50.0, 50.0]))
    far, _ = L.rbf_forward(c[:1] + 10, c, np.array([-50.0, 50.0]))
    assert (far <= near).all() and (far >= 0).all()


# ----------------------------------------------------------------------------- specs


def _net(seed=3, dtype=np.float64):
    layers = [Conv2D(2, 2, 1, "valid"), Flatten(), Maxout(3), Dense(8), Maxout(2), RBF(5),
              Tanh(), Dense(3)]
    return randomize(Sequential(layers, (1, 4, 4), seed=seed, dtype=dtype), seed + 1)


def test_specs_shapes_params_and_config_round_trip():
    for layer in (Maxout(4), RBF(7)):
        assert layer_from_config(layer.to_config()) == layer
    assert Maxout(4).output_shape((12,)) == (3,)
    assert RBF(7).output_shape((5,)) == (7,)
    assert RBF(7).param_shapes((5,)) == {"c": (7, 5), "log_beta": (7,)}
    p = RBF(7).init_params((5,), np.random.default_rng(0), np.float32, "glorot")
    assert p["c"].shape == (7, 5) and p["c"].dtype == np.float32
    np.testing.assert_allclose(np.exp(p["log_beta"]), 1 / 10, rtol=1e-6)
    with pytest.raises(ShapeError, match="multiple of 3"):
        Maxout(3).output_shape((10,))
    with pytest.raises(ShapeError, match="flat"):
        RBF(2).output_shape((1, 3, 3))
    with pytest.raises(ShapeError, match="pieces"):
        Maxout(0)
    with pytest.raises(ShapeError, match="units"):
        RBF(True)
    with pytest.raises(ModelFileError, match="rbf"):
        layer_from_config({"type": "rbf", "units": 3, "width": 2})
    model = _net()
    again = Sequential.from_config(model.config(), model.params)
    x = np.random.default_rng(1).uniform(0, 1, (4, 1, 4, 4))
    np.testing.assert_array_equal(again.logits(x), model.logits(x))


def test_save_load_is_bit_exact(tmp_path):
    model = _net(dtype=np.float32)
    path = save(model, tmp_path / "m.npz")
    back = load(path)
    assert [layer.to_config() for layer in back.layers] == \
        [layer.to_config() for layer in model.layers]
    for p, q in zip(model.params, back.params):
        assert sorted(p) == sorted(q)
        for k in p:
            np.testing.assert_array_equal(p[k], q[k])


def test_whole_network_gradients_match_finite_differences():
    rng = np.random.default_rng(5)
    model = _net()
    x = rng.uniform(0, 1, (3, 1, 4, 4))
    y = np.array([0, 2, 1])
    _, dx = network.loss_and_input_grad(model, x, y)
    f = lambda x_: float(network.loss_and_input_grad(model, x_, y)[0].sum())  # noqa: E731
    check_directional(f, x, dx, rng, h=1e-5, rtol=1e-5, what="loss dx")
    _, grads = network.loss_and_param_grads(model, x, y)
    for i in (5,):  # the rbf layer's c and log_beta
        for k in ("c", "log_beta"):
            def f(a, i=i, k=k):
                params = [dict(p) for p in model.params]
                params[i][k] = a
                m = Sequential(model.layers, model.input_shape, params)
                return network.loss_and_param_grads(m, x, y)[0]
            check_directional(f, model.params[i][k], grads[i][k], rng, h=1e-5, rtol=1e-5,
                              what=f"loss d{k}")


# ----------------------------------------------------------------------------- numba_cpu


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_numba_cpu_matches_the_reference(dtype):
    """The conv's (F, H, W) rows are held NHWC inside numba_cpu: the maxout groups and the rbf
    centres must follow the caller's (C, H, W) order."""
    be = kernels.get("numba_cpu")
    ref = kernels.get("numpy")
    model = _net(seed=11)
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (7, 1, 4, 4))
    y = rng.integers(0, 3, 7)
    tol = {np.float64: 1e-10, np.float32: 2e-5}[dtype]
    net = be.prepare(model.astype(dtype), dtype)
    xd = x.astype(dtype)
    for loss in ("ce", "cw"):
        v, dx, z = ref.loss_grad(model, x, y, loss)
        v2, dx2, z2 = be.loss_grad(net, xd, y, loss)
        for a, b in ((v, v2), (dx, dx2), (z, z2)):
            assert b.dtype == dtype
            np.testing.assert_allclose(b, a, rtol=tol, atol=tol)
        lm, g = ref.param_grads(model, x, y, loss)
        lm2, g2 = be.param_grads(net, xd, y, loss)
        assert abs(lm - lm2) < tol * 10
        for gi, gi2 in zip(g, g2):
            assert sorted(gi) == sorted(gi2)
            for k in gi:
                np.testing.assert_allclose(gi2[k], gi[k], rtol=tol, atol=tol)
    j, _ = ref.jacobian(model, x)
    j2, _ = be.jacobian(net, xd)
    np.testing.assert_allclose(j2, j, rtol=tol, atol=tol)
    np.testing.assert_allclose(be.logits(net, xd), ref.logits(model, x), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- architectures


def test_architectures_and_the_rbf_data_init():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (60, 1, 28, 28)).astype(np.float32)
    y = np.repeat(np.arange(10), 6)
    assert [layer.type for layer in build("softmax").layers] == ["flatten", "dense"]
    mo = build("maxout")
    assert [layer.type for layer in mo.layers].count("maxout") == 2
    assert mo.shapes[-1] == (10,)
    a = build("rbf", seed=4, data=(x, y))
    b = build("rbf", seed=4, data=(x, y))
    c = build("rbf", seed=5, data=(x, y))
    centres = a.params[1]["c"]
    np.testing.assert_array_equal(centres, b.params[1]["c"])
    assert not np.array_equal(centres, c.params[1]["c"])
    flat = x.reshape(60, -1)
    # every centre is a training image, the images of one class in one block
    idx = [int(np.flatnonzero((flat == row).all(axis=1))[0]) for row in centres]
    per = len(idx) // 10
    assert [y[i] for i in idx] == list(np.repeat(np.arange(10), per))
    assert np.all(np.isfinite(a.params[1]["log_beta"]))
    assert a.logits(x[:3]).shape == (3, 10)


def test_select_classes_relabels_in_the_order_given():
    x = np.arange(6, dtype=np.float32).reshape(6, 1)
    y = np.array([7, 3, 1, 3, 7, 0])
    xs, ys = select_classes(x, y, (3, 7))
    np.testing.assert_array_equal(xs[:, 0], [0, 1, 3, 4])
    np.testing.assert_array_equal(ys, [1, 0, 0, 1])
    for bad in ((3,), (3, 3), ("a", 1)):
        with pytest.raises(AdvkernError, match="classes"):
            select_classes(x, y, bad)
    with pytest.raises(AdvkernError, match="no examples"):
        select_classes(x, y, (3, 9))
