"""The numba_cpu network primitives (advkern.kernels.numba_cpu.nn) against the numpy backend.

Every primitive is compared with ``advkern.kernels.numpy_backend`` (the reference):

- float64: to ~1e-10 relative (only the summation order differs);
- float32: against the float64 reference run on the same float32 weights and inputs, to
  ``64 sqrt(L) eps32 max(1, max|ref|)`` with L the longest reduction of the model (the
  bench's tolerance). A ReLU input or a max-pool runner-up within rounding of the decision
  can flip, so random small models are drawn away from kinks (``_margin``), and the real
  mlp/cnn in float32 need the gradient on >= 99.5% of the entries (logits and losses
  everywhere), as the bench does.

``PYTHONPATH=. python tests/test_numba_nn.py`` prints timings (median ms per forward +
input-gradient step) next to the reference and np.dot's sgemm rate; it is not a test.
"""

import threading

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from advkern.errors import AdvkernError, ShapeError
from advkern.kernels import numpy_backend as ref
from advkern.kernels.numba_cpu import nn
from advkern.nets import (Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, Sigmoid, Tanh,
                          build)
from advkern.reference import network

from _helpers import random_batch, random_labels, randomize, seeds, small_models

EPS32 = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------- helpers


def _reduction(model):
    """The longest reduction (GEMM inner dimension, forward or backward) of the model."""
    longest = 2
    for i, layer in enumerate(model.layers):
        src, dst = model.shapes[i], model.shapes[i + 1]
        if layer.type == "dense":
            longest = max(longest, src[0], dst[0])
        elif layer.type == "conv2d":
            kh, kw = layer.kernel
            longest = max(longest, src[0] * kh * kw, dst[0] * kh * kw)
        elif layer.type == "maxpool2d":
            longest = max(longest, layer.kernel[0] * layer.kernel[1])
    return longest


def _tol(model, dtype, ref_arr):
    scale = max(1.0, float(np.max(np.abs(ref_arr)))) if np.size(ref_arr) else 1.0
    if np.dtype(dtype) == np.float64:
        return 1e-10 * scale
    return 64 * np.sqrt(_reduction(model)) * EPS32 * scale


def _close(got, want, model, dtype, what, frac=1.0):
    """Assert got == want to the dtype's tolerance on at least ``frac`` of the entries."""
    got = np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype} != {np.dtype(dtype)}"
    tol = _tol(model, dtype, want)
    bad = np.abs(got.astype(np.float64) - want) > tol
    if frac >= 1.0:
        assert not bad.any(), (f"{what}: max error {np.max(np.abs(got - want)):.3g} > {tol:.3g}"
                               f" at {np.argwhere(bad)[:3].tolist()}")
    else:
        assert bad.mean() <= 1 - frac, f"{what}: {bad.mean():.4f} of the entries off"


def _margin(model, x, y=None, loss=None):
    """Smallest relative distance of the forward pass to a kink (float64 arithmetic).

    ReLU inputs from 0, max-pool window maxima from their runner-up (exact zeros and ties,
    e.g. of ReLU zeros, are decided identically by every implementation and do not count), and for
    the CW margin the best other logit from the runner-up.
    """
    h = np.asarray(x, np.float64)
    m = np.inf
    for i, (layer, p) in enumerate(zip(model.layers, model.params)):
        scale = max(1.0, float(np.max(np.abs(h))))
        if layer.type == "relu":
            nz = np.abs(h[h != 0])  # exact zeros (a ReLU before) are exact everywhere
            if nz.size:
                m = min(m, float(nz.min()) / scale)
        elif layer.type == "maxpool2d":
            (kh, kw), (sh, sw) = layer.kernel, layer.stride
            win = sliding_window_view(h, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
            win = np.sort(win.reshape(*win.shape[:4], -1), axis=-1)
            if win.shape[-1] > 1:
                gap = win[..., -1] - win[..., -2]
                gap = gap[gap > 0]
                if gap.size:
                    m = min(m, float(gap.min()) / scale)
        h, _ = network.layer_forward(layer, {k: a.astype(np.float64) for k, a in p.items()},
                                     h, model.shapes[i])
    if loss == "cw" and h.shape[1] > 2:
        others = h.copy()
        others[np.arange(len(y)), y] = -np.inf
        top = np.sort(others, axis=1)[:, -2:]
        m = min(m, float(np.min(top[:, 1] - top[:, 0])) / max(1.0, float(np.abs(h).max())))
    return m


def _check_all(model, x, y, dtype, frac=1.0):
    """Every primitive of nn on (model, x, y) in dtype equals the numpy backend."""
    model_t = model.astype(dtype)
    xt = np.ascontiguousarray(x, dtype=dtype)
    # float64 reference on the very same (dtype-rounded) weights and inputs
    model_r = model_t.astype(np.float64)
    xr = xt.astype(np.float64)
    net = nn.prepare(model_t, dtype)
    assert net.dtype == np.dtype(dtype)
    x_before = xt.copy()
    y_before = y.copy()

    z = nn.logits(net, xt)
    z_ref = ref.logits(model_r, xr)
    _close(z, z_ref, model_t, dtype, "logits")

    for loss in ("ce", "cw"):
        values, dx, z2 = nn.loss_grad(net, xt, y, loss)
        v_ref, dx_ref, _ = ref.loss_grad(model_r, xr, y, loss)
        _close(values, v_ref, model_t, dtype, f"{loss} values")
        _close(z2, z_ref, model_t, dtype, f"{loss} logits")
        _close(dx, dx_ref, model_t, dtype, f"{loss} dx", frac)
        assert dx.shape == xt.shape

        mean, grads = nn.param_grads(net, xt, y, loss)
        m_ref, g_ref = ref.param_grads(model_r, xr, y, loss)
        assert isinstance(mean, float)
        assert abs(mean - m_ref) <= _tol(model_t, dtype, m_ref), f"{loss} mean loss"
        assert len(grads) == len(g_ref)
        for i, (g, gr) in enumerate(zip(grads, g_ref)):
            assert sorted(g) == sorted(gr), f"layer {i}: grads {sorted(g)} != {sorted(gr)}"
            for k in gr:
                _close(g[k], gr[k], model_t, dtype, f"{loss} layer {i} d{k}", frac)

    jac, z3 = nn.jacobian(net, xt)
    j_ref, _ = ref.jacobian(model_r, xr)
    _close(jac, j_ref, model_t, dtype, "jacobian", frac)
    _close(z3, z_ref, model_t, dtype, "jacobian logits")

    np.testing.assert_array_equal(xt, x_before)
    np.testing.assert_array_equal(y, y_before)


# ----------------------------------------------------------------------------- models


def _m(layers, shape, k_seed):
    return randomize(Sequential(layers, shape, seed=k_seed, dtype=np.float64), k_seed + 1)


def _zoo():
    """Hand-built models covering every layout and fusion path of the kernels."""
    return {
        # C > 1 input read in NHWC by an im2col conv with stride 3 and asymmetric pads, an
        # F that is no multiple of 8, relu fused, flatten -> dense (permuted weight rows)
        "conv_s3_asym": _m([Conv2D(5, (3, 2), (3, 2), (1, 0, 2, 1)), ReLU(), Flatten(),
                            Dense(4)], (3, 8, 7), 1),
        # C = 2 stride-1 conv, tanh fused; overlapping max-pool; a standalone sigmoid after
        # the pool; an im2col conv with a 'same' stride 2
        "direct_pool_sig": _m([Conv2D(4, 3, 1, "same"), Tanh(), MaxPool2D(3, 1), Sigmoid(),
                               Conv2D(6, 2, 2, "same"), ReLU(), Flatten(), Dense(3)],
                              (2, 7, 6), 2),
        # one-channel convs (the transposed im2col): after a standalone tanh, with stride
        # (2, 1) and asymmetric pads; and in the middle of the net after a fused sigmoid
        # (its derivative is applied inside the transposed col2im), stride (1, 2)
        "one_channel": _m([Tanh(), Conv2D(4, (2, 3), (2, 1), (0, 1, 2, 0)), ReLU(),
                           Conv2D(1, 2, 1, "same"), Sigmoid(), Conv2D(3, 3, (1, 2), 1),
                           Flatten(), Dense(3)], (1, 6, 5), 9),
        # a model starting with an activation, max-pool directly on the input, pool 2 stride 1
        "act_first": _m([Tanh(), MaxPool2D(2, 1), Conv2D(3, (2, 3), (1, 2), 1), Sigmoid(),
                         Flatten(), Dense(5), ReLU(), Dense(3)], (2, 5, 6), 3),
        # flatten as the last layer: the logits are the conv's NHWC output read back in CHW
        "flatten_logits": _m([Conv2D(2, 2, 2, "valid"), Flatten()], (3, 4, 4), 4),
        # a 1-logit (binary) conv model; relu straight after flatten (not fused)
        "binary_conv": _m([Conv2D(3, 3, 2, 1), Flatten(), ReLU(), Dense(1)], (1, 6, 6), 5),
        # binary logistic regression on vectors, and a relu -> relu chain
        "binary_dense": _m([Dense(3), ReLU(), ReLU(), Dense(1)], (4,), 6),
        # nothing but reshapes and an activation
        "no_gemm": _m([Flatten(), Sigmoid()], (2, 2, 2), 7),
        # 1-D output of a pool (H*W = 1), stride 3 pool, large C*KH*KW (im2col, stride 1)
        "pool_to_point": _m([Conv2D(3, 4, 1, "valid"), ReLU(), MaxPool2D(3, 3), Flatten(),
                             Dense(2)], (3, 6, 6), 8),
    }


ZOO = _zoo()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_match_reference(name, dtype):
    model = ZOO[name]
    rng = np.random.default_rng(sorted(ZOO).index(name))
    for attempt in range(20):
        x = random_batch(model, rng, 5, np.float64)
        y = random_labels(model, rng, 5)
        mt = model.astype(dtype)
        if _margin(mt, x.astype(dtype), y, "cw") > (1e-8 if dtype == np.float64 else 1e-3):
            break
    else:
        pytest.fail("no kink-free batch found")
    _check_all(model, x, y, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(model=small_models(), n=st.integers(1, 4), seed=seeds)
@settings(max_examples=25)
def test_random_models_match_reference(model, n, seed, dtype):
    rng = np.random.default_rng(seed)
    x = random_batch(model, rng, n, np.float64)
    y = random_labels(model, rng, n)
    assume(_margin(model.astype(dtype), x.astype(dtype), y, "cw")
           > (1e-8 if dtype == np.float64 else 1e-3))
    _check_all(model, x, y, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(model=small_models(num_logits=1), seed=seeds)
@settings(max_examples=10)
def test_binary_models_match_reference(model, seed, dtype):
    rng = np.random.default_rng(seed)
    x = random_batch(model, rng, 3, np.float64)
    y = rng.integers(0, 2, 3)
    assume(_margin(model.astype(dtype), x.astype(dtype)) > (1e-8 if dtype == np.float64
                                                             else 1e-3))
    _check_all(model, x, y, dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_real_architectures_match_reference(name, dtype):
    model = randomize(build(name, seed=3), 4, bias_scale=0.1)
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, (6, 1, 28, 28))
    y = rng.integers(0, 10, 6)
    # float64: a flip needs a ReLU input within ~1e-13 of 0; float32 is held to the bench's
    # 99.5% rule for gradients (thousands of ReLUs per image: some sit within rounding of 0).
    _check_all(model, x, y, dtype, frac=1.0 if dtype == np.float64 else 0.995)


def test_chunking_and_threads_do_not_change_results(monkeypatch):
    """Many small chunks, split over the two threads, give the one-chunk results."""
    model = ZOO["direct_pool_sig"].astype(np.float64)
    rng = np.random.default_rng(0)
    x = random_batch(model, rng, 37)
    y = random_labels(model, rng, 37)
    net = nn.prepare(model, np.float64)
    whole = nn.loss_grad(net, x, y, "ce"), nn.jacobian(net, x), nn.param_grads(net, x, y, "cw")
    monkeypatch.setattr(nn, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(nn, "_MIN_CHUNK", 3)
    if nn._blas_controller():
        blas_threads = [i["num_threads"]
                        for i in nn._blas_controller().select(user_api="blas").info()]
    monkeypatch.setattr(nn, "_PAR_MIN_FLOPS", 1)
    monkeypatch.setattr(nn, "_MAX_WORKERS", 2)
    threads = set()
    run_logits = nn._run_logits

    def spy(*args):
        threads.add(threading.get_ident())
        return run_logits(*args)

    monkeypatch.setattr(nn, "_run_logits", spy)
    net2 = nn.prepare(model, np.float64)
    assert net2._numba_plans[np.dtype(np.float64)].chunk(37) == 3
    parts = nn.loss_grad(net2, x, y, "ce"), nn.jacobian(net2, x), nn.param_grads(net2, x, y,
                                                                                  "cw")
    # two threads when threadpoolctl can make BLAS single-threaded, else the caller's alone
    assert len(threads) == (2 if nn._blas_controller() else 1)
    if nn._blas_controller():  # and BLAS gets its thread count back
        info = nn._blas_controller().select(user_api="blas").info()
        assert [i["num_threads"] for i in info] == blas_threads
    for a, b in zip(whole[0] + whole[1], parts[0] + parts[1]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)
    assert abs(whole[2][0] - parts[2][0]) < 1e-12
    for ga, gb in zip(whole[2][1], parts[2][1]):
        for k in ga:
            np.testing.assert_allclose(ga[k], gb[k], rtol=1e-12, atol=1e-13)


# ----------------------------------------------------------------------------- forward_from


def _ref_from(model, start, h):
    for i in range(start, len(model.layers)):
        h, _ = network.layer_forward(model.layers[i], model.params[i], h, model.shapes[i])
    return h


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", ["direct_pool_sig", "act_first", "flatten_logits", "one_channel",
                                  "binary_conv", "conv_s3_asym", "mlp", "cnn"])
def test_forward_from_every_layer(name, dtype):
    model = (build(name, seed=1) if name in ("mlp", "cnn") else ZOO[name]).astype(dtype)
    net = nn.prepare(model, dtype)
    rng = np.random.default_rng(1)
    x = random_batch(model, rng, 4, dtype)
    # the activations of a real pass, and random ones (negative values reach the ReLUs)
    acts = [x]
    for i, layer in enumerate(model.layers):
        acts.append(network.layer_forward(layer, model.params[i], acts[-1],
                                          model.shapes[i])[0])
    for start in range(len(model.layers) + 1):
        for h in (acts[start], rng.standard_normal(acts[start].shape).astype(dtype)):
            h_before = h.copy()
            z = nn.forward_from(net, start, h)
            want = _ref_from(model.astype(np.float64), start, h.astype(np.float64))
            _close(z, want, model, dtype, f"forward_from({start})")
            np.testing.assert_array_equal(h, h_before)
    np.testing.assert_allclose(nn.forward_from(net, 0, x), nn.logits(net, x), rtol=0, atol=0)


def test_forward_from_large_batch_after_first_dense():
    """The DE use: many candidates, starting at the ReLU after the first dense layer."""
    model = build("mlp", seed=2)
    net = nn.prepare(model, np.float32)
    h = np.random.default_rng(0).standard_normal((3000, 256)).astype(np.float32)
    z = nn.forward_from(net, 2, h)
    want = _ref_from(model.astype(np.float64), 2, h.astype(np.float64))
    _close(z, want, model, np.float32, "forward_from(2)")


def test_forward_from_rejects_bad_input():
    net = nn.prepare(ZOO["binary_conv"], np.float64)
    with pytest.raises(AdvkernError):
        nn.forward_from(net, 99, np.zeros((1, 1)))
    with pytest.raises(AdvkernError):
        nn.forward_from(net, 1.5, np.zeros((1, 1)))
    with pytest.raises(ShapeError):
        nn.forward_from(net, 1, np.zeros((2, 3, 3)))


# ----------------------------------------------------------------------------- contract


def test_to_device_and_to_host():
    a = np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2]
    d = nn.to_device(a, np.float32)
    assert d.dtype == np.float32 and d.flags.c_contiguous
    np.testing.assert_array_equal(d, a)
    d[0, 0] = 99
    assert a[0, 0] == 0
    e = nn.to_device(a)
    assert e.dtype == np.float64 and e is not a and e.flags.c_contiguous
    assert nn.to_host(d) is d


def test_prepare_keeps_model_and_dtype():
    model = build("cnn", seed=0)
    w_before = model.params[0]["w"].copy()
    net = nn.prepare(model, np.float64)
    assert net.dtype == np.float64 and net.params[0]["w"].dtype == np.float64
    np.testing.assert_array_equal(model.params[0]["w"], w_before)
    assert model.dtype == np.float32


def test_x_dtype_rules_the_computation():
    """A float64 batch through a float32 net computes in float64 (as the reference)."""
    model = ZOO["conv_s3_asym"].astype(np.float32)
    net = nn.prepare(model, np.float32)
    x = random_batch(model, np.random.default_rng(0), 3, np.float64)
    z = nn.logits(net, x)
    assert z.dtype == np.float64
    np.testing.assert_allclose(z, ref.logits(model, x), rtol=1e-10, atol=1e-10)


def test_empty_batch():
    model = ZOO["direct_pool_sig"]
    net = nn.prepare(model, np.float64)
    x = np.zeros((0, *model.input_shape))
    assert nn.logits(net, x).shape == (0, 3)
    values, dx, z = nn.loss_grad(net, x, np.zeros(0, np.int64), "ce")
    assert values.shape == (0,) and dx.shape == x.shape and z.shape == (0, 3)
    jac, z = nn.jacobian(net, x)
    assert jac.shape == (0, 3, int(np.prod(model.input_shape)))


def test_bad_inputs_raise():
    model = ZOO["binary_dense"]
    net = nn.prepare(model, np.float64)
    x = np.zeros((2, 4))
    with pytest.raises(ShapeError):
        nn.logits(net, np.zeros((2, 5)))
    with pytest.raises(AdvkernError):
        nn.loss_grad(net, x, np.array([0, 1]), "hinge")
    with pytest.raises(AdvkernError):
        nn.loss_grad(net, x, np.array([0, 2]), "ce")  # a binary model has classes {0, 1}
    with pytest.raises(ShapeError):
        nn.loss_grad(net, x, np.array([0, 1, 1]), "ce")


# ----------------------------------------------------------------------------- timings


def _forward_flops(model):
    """GEMM FLOPs of one image's forward pass (dense 2*D*M, conv 2*F*C*KH*KW*Ho*Wo)."""
    total = 0
    for i, layer in enumerate(model.layers):
        src, dst = model.shapes[i], model.shapes[i + 1]
        if layer.type == "dense":
            total += 2 * src[0] * dst[0]
        elif layer.type == "conv2d":
            total += 2 * int(np.prod(dst)) * src[0] * layer.kernel[0] * layer.kernel[1]
    return total


def _timings():  # pragma: no cover - a measurement helper, not a test
    """Median wall ms per forward + input-gradient step, and the CPU ms of all threads.

    The CPU time (time.process_time) is what a loaded machine does not inflate as much: on
    an idle machine with T cores the wall time approaches CPU / T.
    """
    import time

    def median_ms(f, repeats=7):
        f()
        wall, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return 1e3 * float(np.median(wall)), 1e3 * float(np.median(cpu))

    rng = np.random.default_rng(0)
    a = rng.standard_normal((1000, 784), dtype=np.float32)
    b = rng.standard_normal((784, 256), dtype=np.float32)
    out = np.empty((1000, 256), np.float32)
    rate = 2 * 1000 * 784 * 256 / median_ms(lambda: np.dot(a, b, out=out), 20)[0] / 1e6
    sq = rng.standard_normal((1024, 1024), dtype=np.float32)
    rate_sq = 2 * 1024 ** 3 / median_ms(lambda: sq @ sq, 5)[0] / 1e6
    print(f"np.dot sgemm: {rate:.1f} GFLOP/s (1000x784x256), {rate_sq:.1f} (1024^3)")
    for name, n in (("mlp", 1000), ("cnn", 250), ("cnn", 1000)):
        model = build(name)
        net = nn.prepare(model, np.float32)
        x = rng.uniform(0, 1, (n, 1, 28, 28)).astype(np.float32)
        y = np.arange(n) % 10
        t, c = median_ms(lambda net=net, x=x, y=y: nn.loss_grad(net, x, y, "ce"))
        t_ref, _ = median_ms(lambda m=model, x=x, y=y: ref.loss_grad(m, x, y, "ce"), 3)
        flops = 2 * n * _forward_flops(model)
        print(f"{name} batch {n}: numba {t:.1f} ms/step ({1e3 * t / n:.1f} us/image; CPU "
              f"{c:.1f} ms), reference {t_ref:.1f} ms, GEMM bound {flops / rate / 1e6:.1f} ms "
              f"at {rate:.0f} GFLOP/s")


if __name__ == "__main__":  # pragma: no cover
    _timings()
