"""Whole-model tests of advkern.reference.network: gradients, Jacobians, batch/dtype properties."""

import numpy as np
import pytest
from _helpers import (
    H,
    assume_smooth,
    check_directional,
    random_batch,
    random_labels,
    randomize,
    seeds,
    small_models,
    unit,
    with_params,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from advkern.nets import (
    Conv2D,
    Dense,
    Flatten,
    MaxPool2D,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
    build,
)
from advkern.reference import network
from advkern.reference.losses import as_two_class, get_loss, predict


def conv_stack(k=3, dtype=np.float64, seed=0):
    """conv + maxpool (overlapping) + tanh + sigmoid + relu + dense: every layer type."""
    layers = [Conv2D(3, (3, 2), (1, 1), "same"), Tanh(), MaxPool2D(2, 1),
              Conv2D(2, 2, (2, 1), (1, 0, 0, 1)), Sigmoid(), Flatten(), Dense(5), ReLU(),
              Dense(k)]
    return randomize(Sequential(layers, (2, 6, 5), seed=seed, dtype=dtype), seed + 100)


def tiny_mlp(k=4, dtype=np.float64, seed=0):
    return randomize(Sequential([Flatten(), Dense(7), ReLU(), Dense(k)], (1, 3, 3), seed=seed,
                                dtype=dtype), seed + 100)


def tiny_conv(k=3, dtype=np.float64, seed=0):
    layers = [Conv2D(2, 2, 1, "same"), Tanh(), MaxPool2D(2, 1), Flatten(), Dense(k)]
    return randomize(Sequential(layers, (1, 3, 3), seed=seed, dtype=dtype), seed + 100)


def _assume_unique_best_other(model, x, y, gap=1e-4):
    """The C&W margin is smooth only where its best other class is unique."""
    z = as_two_class(network.forward(model, x)[0])
    if z.shape[1] <= 2:
        return
    others = z.copy()
    others[np.arange(len(y)), y] = -np.inf
    top = np.sort(others, axis=1)[:, -2:]
    assume(np.all(top[:, 1] - top[:, 0] > gap))


# ----------------------------------------------------------------------------- input gradients


@pytest.mark.parametrize("loss", ["ce", "cw"])
@given(model=small_models(), n=st.integers(1, 3), seed=seeds)
def test_input_gradient_matches_finite_differences(loss, model, n, seed):
    rng = np.random.default_rng(seed)
    x, y = random_batch(model, rng, n), random_labels(model, rng, n)
    values, dx = network.loss_and_input_grad(model, x, y, loss)
    logits, _ = network.forward(model, x)
    np.testing.assert_array_equal(values, get_loss(loss)(logits, y)[0])
    assert dx.shape == x.shape and values.shape == (n,)
    v = unit(rng, x.shape)
    assume_smooth([(model, x), (model, x + H * v), (model, x - H * v)])
    if loss == "cw":
        _assume_unique_best_other(model, x, y)

    def f(a):
        return network.loss_and_input_grad(model, a, y, loss)[0].sum()

    check_directional(f, x, dx, rng, directions=[v], scale=np.abs(values).sum(),
                      what=f"{loss} input gradient of {model}")


@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("make", [conv_stack, tiny_conv, tiny_mlp])
@pytest.mark.parametrize("k", [1, 3])
def test_input_gradient_on_fixed_stacks_including_binary(loss, make, k):
    model = make(k=k)
    assert model.num_logits == k and model.num_classes == max(k, 2)
    rng = np.random.default_rng(3)
    x, y = random_batch(model, rng, 3), random_labels(model, rng, 3)
    values, dx = network.loss_and_input_grad(model, x, y, loss)
    def f(a):
        return network.loss_and_input_grad(model, a, y, loss)[0].sum()

    check_directional(f, x, dx, rng, n_dirs=3, scale=np.abs(values).sum(),
                      what=f"{loss} dx of {model}")


# ----------------------------------------------------------------------------- param gradients


@settings(max_examples=20)
@pytest.mark.parametrize("loss", ["ce", "cw"])
@given(model=small_models(), n=st.integers(1, 3), seed=seeds)
def test_param_gradients_match_finite_differences(loss, model, n, seed):
    rng = np.random.default_rng(seed)
    x, y = random_batch(model, rng, n), random_labels(model, rng, n)
    if loss == "cw":
        _assume_unique_best_other(model, x, y)
    mean, grads = network.loss_and_param_grads(model, x, y, loss)
    assert isinstance(mean, float)
    np.testing.assert_allclose(mean, network.loss_and_input_grad(model, x, y, loss)[0].mean(),
                               rtol=1e-12, atol=1e-15)
    assert len(grads) == len(model.layers)
    for i, (p, g) in enumerate(zip(model.params, grads)):
        assert set(g) == set(p), f"layer {i}"
        for key, a in p.items():
            assert g[key].shape == a.shape
            v = unit(rng, a.shape)

            def moved(t, i=i, key=key):
                params = [dict(q) for q in model.params]
                params[i][key] = t
                return with_params(model, params)

            assume_smooth([(model, x), (moved(a + H * v), x), (moved(a - H * v), x)])

            def f(t, moved=moved):
                return network.loss_and_param_grads(moved(t), x, y, loss)[0]

            check_directional(f, a, g[key], rng, directions=[v], scale=abs(mean),
                              what=f"{loss} d/d layer{i}.{key} of {model}")


@pytest.mark.parametrize("make, k", [(conv_stack, 3), (conv_stack, 1), (tiny_mlp, 1)])
def test_param_gradients_on_fixed_stacks_including_binary(make, k):
    model = make(k=k)
    rng = np.random.default_rng(5)
    x, y = random_batch(model, rng, 4), random_labels(model, rng, 4)
    mean, grads = network.loss_and_param_grads(model, x, y, "ce")
    for i, p in enumerate(model.params):
        for key, a in p.items():
            def f(t, i=i, key=key):
                params = [dict(q) for q in model.params]
                params[i][key] = t
                return network.loss_and_param_grads(with_params(model, params), x, y)[0]

            check_directional(f, a, grads[i][key], rng, n_dirs=2, scale=abs(mean),
                              what=f"d/d layer{i}.{key}")


def test_param_gradient_is_the_mean_of_per_sample_gradients():
    model = conv_stack()
    rng = np.random.default_rng(8)
    x, y = random_batch(model, rng, 3), random_labels(model, rng, 3)
    mean, grads = network.loss_and_param_grads(model, x, y)
    singles = [network.loss_and_param_grads(model, x[i:i + 1], y[i:i + 1]) for i in range(3)]
    np.testing.assert_allclose(mean, np.mean([s[0] for s in singles]), rtol=1e-12)
    for i, p in enumerate(model.params):
        for key in p:
            np.testing.assert_allclose(grads[i][key], np.mean([s[1][i][key] for s in singles], 0),
                                       rtol=1e-10, atol=1e-13)


def test_backward_without_param_grads():
    model = conv_stack()
    rng = np.random.default_rng(2)
    x = random_batch(model, rng, 2)
    logits, caches = network.forward(model, x)
    seed = rng.standard_normal(logits.shape)
    dx1, g1 = network.backward(model, seed, caches, need_params=True)
    dx2, g2 = network.backward(model, seed, caches, need_params=False)
    np.testing.assert_array_equal(dx1, dx2)
    assert all(g == {} for g in g2)
    assert [set(g) for g in g1] == [set(p) for p in model.params]


# ----------------------------------------------------------------------------- jacobian


def _fd_jacobian(model, x, h=H):
    """Column by column: J[n, :, d] = (z(x + h e_d) - z(x - h e_d)) / 2h."""
    n = len(x)
    flat = x.reshape(n, -1)
    cols = []
    for d in range(flat.shape[1]):
        e = np.zeros_like(flat)
        e[:, d] = h
        zp = network.forward(model, (flat + e).reshape(x.shape))[0]
        zm = network.forward(model, (flat - e).reshape(x.shape))[0]
        cols.append((zp - zm) / (2 * h))
    return np.stack(cols, axis=2)


@pytest.mark.parametrize("make, k", [(tiny_mlp, 4), (tiny_conv, 3), (tiny_conv, 1),
                                     (conv_stack, 2)])
def test_jacobian_matches_finite_differences_entrywise(make, k):
    model = make(k=k)
    rng = np.random.default_rng(11)
    x = random_batch(model, rng, 2)
    jac = network.jacobian(model, x)
    d = int(np.prod(model.input_shape))
    assert jac.shape == (2, k, d) and jac.dtype == np.float64
    np.testing.assert_allclose(jac, _fd_jacobian(model, x), rtol=1e-6, atol=1e-8)


@given(model=small_models(), n=st.integers(1, 3), seed=seeds)
def test_jacobian_rows_are_one_hot_backward_passes(model, n, seed):
    rng = np.random.default_rng(seed)
    x = random_batch(model, rng, n)
    jac = network.jacobian(model, x)
    k = model.num_logits
    assert jac.shape == (n, k, int(np.prod(model.input_shape)))
    logits, caches = network.forward(model, x)
    for c in range(k):
        seed_rows = np.zeros_like(logits)
        seed_rows[:, c] = 1
        dx, _ = network.backward(model, seed_rows, caches, need_params=False)
        np.testing.assert_allclose(jac[:, c, :], dx.reshape(n, -1), rtol=1e-12, atol=1e-14)
    # A random seed is the matching combination of rows (the chain rule is linear in dlogits).
    w = rng.standard_normal(logits.shape)
    dx, _ = network.backward(model, w, caches)
    np.testing.assert_allclose(np.einsum("nk,nkd->nd", w, jac), dx.reshape(n, -1), rtol=1e-10,
                               atol=1e-12)


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(model=small_models(), n=st.integers(2, 4), seed=seeds, data=st.data())
def test_batch_equals_each_sample(dtype, model, n, seed, data):
    model = model.astype(dtype)
    rng = np.random.default_rng(seed)
    x, y = random_batch(model, rng, n), random_labels(model, rng, n)
    loss = data.draw(st.sampled_from(["ce", "cw"]))
    logits, _ = network.forward(model, x)
    values, dx = network.loss_and_input_grad(model, x, y, loss)
    jac = network.jacobian(model, x)
    tol = ({"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32
           else {"rtol": 1e-12, "atol": 1e-13})
    for i in range(n):
        xi, yi = x[i:i + 1], y[i:i + 1]
        np.testing.assert_allclose(logits[i:i + 1], network.forward(model, xi)[0], **tol)
        vi, dxi = network.loss_and_input_grad(model, xi, yi, loss)
        np.testing.assert_allclose(values[i:i + 1], vi, **tol)
        if loss == "cw":
            # The margin's gradient jumps at ties; float noise between batch sizes can only
            # flip it when two other-class logits are within rounding of each other.
            z = as_two_class(logits[i:i + 1])
            others = np.sort(np.delete(z[0], yi[0]))
            if len(others) > 1 and others[-1] - others[-2] < 1e-3:
                continue
        np.testing.assert_allclose(dx[i:i + 1], dxi, **tol)
        np.testing.assert_allclose(jac[i:i + 1], network.jacobian(model, xi), **tol)


@pytest.mark.parametrize("name", ["mlp", "cnn", "logreg"])
def test_named_architectures_batch_equals_each_sample(name):
    model = build(name, seed=1)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (3, 1, 28, 28)).astype(np.float32)
    y = np.array([1, 2, 3])
    logits = model.logits(x)
    _, dx = network.loss_and_input_grad(model, x, y)
    for i in range(3):
        np.testing.assert_allclose(logits[i:i + 1], model.logits(x[i:i + 1]), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(dx[i:i + 1],
                                   network.loss_and_input_grad(model, x[i:i + 1], y[i:i + 1])[1],
                                   rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(model.predict(x), predict(logits))
    np.testing.assert_array_equal(model.predict(x, batch_size=2), predict(logits))


@pytest.mark.parametrize("model_dtype, x_dtype", [(np.float32, np.float32),
                                                  (np.float64, np.float64),
                                                  (np.float32, np.float64),
                                                  (np.float64, np.float32)])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_computation_runs_in_the_dtype_of_x(model_dtype, x_dtype, k, loss):
    model = conv_stack(k=k, dtype=model_dtype)
    assert model.dtype == model_dtype
    rng = np.random.default_rng(4)
    x, y = random_batch(model, rng, 2, dtype=x_dtype), random_labels(model, rng, 2)
    logits, caches = network.forward(model, x)
    assert logits.dtype == x_dtype
    dx, grads = network.backward(model, np.ones_like(logits), caches)
    assert dx.dtype == x_dtype
    values, dx = network.loss_and_input_grad(model, x, y, loss)
    assert values.dtype == x_dtype and dx.dtype == x_dtype
    _, grads = network.loss_and_param_grads(model, x, y, loss)
    for g in grads:
        for key, a in g.items():
            assert a.dtype == x_dtype, key
    assert network.jacobian(model, x).dtype == x_dtype
    if x_dtype == np.float64:
        # A float32 model with float64 input is exactly its float64 copy (the casts are exact).
        m64 = model.astype(np.float64)
        np.testing.assert_array_equal(logits, network.forward(m64, x)[0])
        np.testing.assert_array_equal(dx, network.loss_and_input_grad(m64, x, y, loss)[1])


@pytest.mark.parametrize("k", [1, 3])
def test_caller_arrays_are_never_modified(k):
    model = conv_stack(k=k, dtype=np.float32)
    rng = np.random.default_rng(6)
    x, y = random_batch(model, rng, 3), random_labels(model, rng, 3)
    xc, yc = x.copy(), y.copy()
    pc = [{key: a.copy() for key, a in p.items()} for p in model.params]
    logits, caches = network.forward(model, x)
    seed = rng.standard_normal(logits.shape).astype(np.float32)
    sc = seed.copy()
    network.backward(model, seed, caches)
    np.testing.assert_array_equal(seed, sc)
    for loss in ("ce", "cw"):
        network.loss_and_input_grad(model, x, y, loss)
        network.loss_and_param_grads(model, x, y, loss)
    network.jacobian(model, x)
    model.logits(x)
    model.predict(x)
    model.accuracy(x, y)
    network.loss_and_input_grad(model, x.astype(np.float64), y)
    np.testing.assert_array_equal(x, xc)
    np.testing.assert_array_equal(y, yc)
    for p, q in zip(model.params, pc):
        for key in p:
            np.testing.assert_array_equal(p[key], q[key])
            assert p[key].dtype == np.float32


def test_model_methods_agree_with_the_reference():
    model = conv_stack(k=3, dtype=np.float32)
    rng = np.random.default_rng(9)
    x = random_batch(model, rng, 5)
    logits = network.forward(model, x)[0]
    np.testing.assert_array_equal(model.logits(x), logits)
    np.testing.assert_array_equal(model.predict(x), logits.argmax(axis=1))
    y = logits.argmax(axis=1)
    y[:2] = (y[:2] + 1) % 3
    assert model.accuracy(x, y) == pytest.approx(0.6)
