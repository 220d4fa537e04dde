"""Tests of advkern.reference.losses: values against naive formulas, stability, gradients."""

import warnings

import numpy as np
import pytest
from _helpers import check_directional, seeds
from hypothesis import assume, given
from hypothesis import strategies as st

from advkern.reference import losses
from advkern.reference.losses import (
    cross_entropy,
    get_loss,
    log_softmax,
    margin,
    predict,
    softmax,
)

batch = st.tuples(st.integers(1, 5), st.integers(1, 6), seeds)  # (n, k, seed)


def _logits(n, k, seed, scale=3.0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, k)) * scale).astype(dtype), rng.integers(0, max(k, 2), n), rng


def _naive_softmax(z):
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _strict():
    """No overflow, 0/0 or inf-inf (underflow of exp to 0 is fine and expected)."""
    return np.errstate(over="raise", divide="raise", invalid="raise")


# ----------------------------------------------------------------------------- cross-entropy


@given(batch)
def test_cross_entropy_equals_naive_minus_log_softmax(nks):
    z, y, _ = _logits(*nks)
    loss, d = cross_entropy(z, y)
    z2 = np.concatenate([np.zeros_like(z), z], 1) if z.shape[1] == 1 else z
    p = _naive_softmax(z2)
    rows = np.arange(len(y))
    np.testing.assert_allclose(loss, -np.log(p[rows, y]), rtol=1e-12, atol=1e-14)
    onehot = np.eye(z2.shape[1])[y]
    want = p - onehot
    np.testing.assert_allclose(d, want[:, 1:] if z.shape[1] == 1 else want, rtol=1e-12,
                               atol=1e-14)
    assert loss.shape == (len(y),) and d.shape == z.shape
    assert np.all(loss >= 0)


@given(batch)
def test_cross_entropy_gradient_matches_finite_differences(nks):
    z, y, rng = _logits(*nks)
    _, d = cross_entropy(z, y)
    check_directional(lambda a: cross_entropy(a, y)[0].sum(), z, d, rng, n_dirs=3,
                      what="cross-entropy dlogits")


@given(batch, st.floats(-1e3, 1e3))
def test_cross_entropy_invariant_to_a_constant_per_row(nks, c0):
    z, y, rng = _logits(*nks)
    assume(z.shape[1] >= 2)  # a binary model's implicit logit 0 is not shifted
    shift = c0 + rng.uniform(-100, 100, (len(z), 1))
    l1, d1 = cross_entropy(z, y)
    l2, d2 = cross_entropy(z + shift, y)
    np.testing.assert_allclose(l2, l1, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(d2, d1, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(d1.sum(axis=1), 0, atol=1e-12)  # softmax - onehot sums to 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_is_stable_for_huge_logits(dtype):
    z = np.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0], [1e4, -1e4, 0.0], [-1e4, -1e4, -1e4],
                  [1e4, 1e4, -1e4]], dtype=dtype)
    y = np.array([0, 1, 2, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with _strict():
            loss, d = cross_entropy(z, y)
            lsm = log_softmax(z)
    assert loss.dtype == dtype and d.dtype == dtype
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(d)) and np.all(np.isfinite(lsm))
    # Shifting by the row max first keeps the result exact to the dtype's precision even
    # when |z| ~ 1e4 (see also test_softmax_of_shifted_logits_is_exact_in_float32).
    atol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(loss, [0.0, 2e4, 1e4, np.log(3), np.log(2)], rtol=1e-6, atol=atol)
    np.testing.assert_allclose(d[0], [0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(d[1], [1, -1, 0], atol=1e-7)
    np.testing.assert_allclose(d[3], [1 / 3, -2 / 3, 1 / 3], rtol=1e-6, atol=atol)
    np.testing.assert_allclose(d[4], [0.5, -0.5, 0], atol=max(atol, 1e-7))


# Regression: z - (m + log(sum exp(z - m))) rounds m + log(...) and loses ~|m| * eps
# (2e-5 absolute at |z| = 1e3 in float32); (z - m) - log(...) does not.
@pytest.mark.parametrize("offset", [1e3, -1e4])
def test_softmax_of_shifted_logits_is_exact_in_float32(offset):
    base = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, -2.0]])
    z = (base + offset).astype(np.float32)
    want = np.exp(base - np.log(np.exp(base).sum(axis=1, keepdims=True)))
    np.testing.assert_allclose(softmax(z), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(cross_entropy(z, np.array([0, 2]))[0],
                               -np.log(want[[0, 1], [0, 2]]), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binary_cross_entropy_is_the_logistic_loss(dtype):
    z = np.array([[-1e4], [-30.0], [-2.0], [-1e-3], [0.0], [0.5], [3.0], [40.0], [1e4]] * 2,
                 dtype=dtype)
    y = np.repeat([0, 1], 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with _strict():
            loss, d = cross_entropy(z, y)
    assert d.shape == (18, 1) and loss.dtype == dtype and d.dtype == dtype
    s = 2 * y - 1
    z64 = z[:, 0].astype(np.float64)
    # log1p keeps a confident sample's tiny loss log(1 + e^-30) ~ 9.4e-14 to full relative
    # precision (log(1 + tiny) would round it to a multiple of eps).
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(loss, np.logaddexp(0, -s * z64), rtol=rtol, atol=1e-300)
    # d/dz log(1 + exp(-s z)) = sigmoid(z) - y
    sig = np.exp(-np.logaddexp(0, -z64))
    np.testing.assert_allclose(d[:, 0], sig - y, rtol=1e-6, atol=1e-7)
    # Moderate values against the textbook formula.
    zz, yy, rng = _logits(6, 1, 3)
    ll, dd = cross_entropy(zz, yy)
    np.testing.assert_allclose(ll, np.log1p(np.exp(-(2 * yy - 1) * zz[:, 0])), rtol=1e-12)
    check_directional(lambda a: cross_entropy(a, yy)[0].sum(), zz, dd, rng,
                      what="binary cross-entropy")


@given(batch)
def test_softmax_and_log_softmax(nks):
    z, _, _ = _logits(*nks)
    p = softmax(z)
    assert p.shape == (len(z), max(z.shape[1], 2))
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-12)
    np.testing.assert_allclose(np.exp(log_softmax(z)), p, rtol=1e-12)
    z2 = np.concatenate([np.zeros_like(z), z], 1) if z.shape[1] == 1 else z
    np.testing.assert_allclose(p, _naive_softmax(z2), rtol=1e-12)


# ----------------------------------------------------------------------------- margin


def _naive_margin(z, y):
    """Loop version: loss, index of the first best other class."""
    loss, best = [], []
    for row, t in zip(z, y):
        others = [(row[j], j) for j in range(len(row)) if j != t]
        m = max(v for v, _ in others)
        best.append(next(j for v, j in others if v == m))
        loss.append(m - row[t])
    return np.array(loss), np.array(best)


@given(st.integers(1, 5), st.integers(2, 6), seeds)
def test_margin_values_and_gradient_match_brute_force(n, k, seed):
    z, y, _ = _logits(n, k, seed)
    loss, d = margin(z, y)
    want, best = _naive_margin(z, y)
    np.testing.assert_array_equal(loss, want)
    expect = np.zeros_like(z)
    expect[np.arange(n), best] = 1
    expect[np.arange(n), y] = -1
    np.testing.assert_array_equal(d, expect)
    np.testing.assert_array_equal(loss > 0, predict(z) != y)


def test_margin_ties_pick_the_first_other_class():
    z = np.array([[5.0, 5.0, 1.0], [2.0, 7.0, 7.0], [3.0, 3.0, 3.0]])
    y = np.array([2, 0, 0])
    loss, d = margin(z, y)
    np.testing.assert_array_equal(loss, [4.0, 5.0, 0.0])
    np.testing.assert_array_equal(d, [[1, 0, -1], [-1, 1, 0], [-1, 1, 0]])


@given(st.integers(1, 5), st.integers(1, 6), seeds, st.floats(0, 4))
def test_margin_kappa_clip(n, k, seed, kappa):
    z, y, _ = _logits(n, k, seed)
    raw, draw_ = margin(z, y)
    loss, d = margin(z, y, kappa=kappa)
    np.testing.assert_array_equal(loss, np.maximum(raw, -kappa))
    clipped = raw < -kappa
    np.testing.assert_array_equal(d[clipped], 0)
    np.testing.assert_array_equal(d[~clipped], draw_[~clipped])
    assert np.all(loss >= -kappa)


@given(st.integers(1, 5), st.integers(1, 6), seeds, st.sampled_from([None, 0.0, 0.7, 2.5]))
def test_margin_gradient_matches_finite_differences_away_from_ties(n, k, seed, kappa):
    z, y, rng = _logits(n, k, seed)
    z2 = np.concatenate([np.zeros_like(z), z], 1) if k == 1 else z
    others = z2.copy()
    others[np.arange(n), y] = -np.inf
    top2 = np.sort(others, axis=1)[:, -2:] if z2.shape[1] > 2 else None
    if top2 is not None:
        assume(np.all(top2[:, 1] - top2[:, 0] > 1e-3))  # the best other class is unique
    raw, _ = margin(z, y)
    if kappa is not None:
        assume(np.all(np.abs(raw + kappa) > 1e-3))  # not on the clip's kink
    _, d = margin(z, y, kappa)
    check_directional(lambda a: margin(a, y, kappa)[0].sum(), z, d, rng, n_dirs=3,
                      what="margin dlogits")


def test_binary_margin():
    z = np.array([[-2.0], [0.5], [-2.0], [0.5]])
    y = np.array([0, 0, 1, 1])
    loss, d = margin(z, y)
    np.testing.assert_array_equal(loss, [-2.0, 0.5, 2.0, -0.5])  # -(2y - 1) z
    np.testing.assert_array_equal(d, [[1.0], [1.0], [-1.0], [-1.0]])
    loss, d = margin(z, y, kappa=1.0)
    np.testing.assert_array_equal(loss, [-1.0, 0.5, 2.0, -0.5])
    np.testing.assert_array_equal(d, [[0.0], [1.0], [-1.0], [-1.0]])


# ----------------------------------------------------------------------------- predict


def test_predict_binary_and_multiclass():
    z = np.array([[-1.0], [0.0], [1e-30], [3.0]])
    p = predict(z)
    np.testing.assert_array_equal(p, [0, 0, 1, 1])
    assert p.dtype == np.int64
    z = np.array([[0.1, 0.3, 0.2], [5.0, 5.0, 1.0]])
    p = predict(z)
    np.testing.assert_array_equal(p, [1, 0])
    assert p.dtype == np.int64


@given(batch)
def test_predict_agrees_with_softmax_argmax_and_losses(nks):
    z, y, _ = _logits(*nks)
    p = predict(z)
    np.testing.assert_array_equal(p, softmax(z).argmax(axis=1))
    # Correctly classified  <=>  margin < 0  (no ties with continuous logits).
    np.testing.assert_array_equal(margin(z, y)[0] < 0, p == y)


# ----------------------------------------------------------------------------- common


@pytest.mark.parametrize("name", ["ce", "cw"])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_losses_keep_dtype_and_do_not_modify_inputs(name, k, dtype):
    z, y, _ = _logits(5, k, 7, dtype=dtype)
    zc, yc = z.copy(), y.copy()
    loss, d = get_loss(name)(z, y)
    assert loss.dtype == dtype and d.dtype == dtype
    assert loss.shape == (5,) and d.shape == (5, k)
    np.testing.assert_array_equal(z, zc)
    np.testing.assert_array_equal(y, yc)
    if name == "cw":
        loss, d = margin(z, y, kappa=0.5)
        assert loss.dtype == dtype and d.dtype == dtype


@pytest.mark.parametrize("kappa", [
    0.5, 1, np.float32(0.5),
    np.float64(0.5),
])
def test_margin_kappa_of_any_scalar_type_keeps_float32(kappa):
    z, y, _ = _logits(4, 3, 1, dtype=np.float32)
    loss, d = margin(z, y, kappa=kappa)
    assert loss.dtype == np.float32 and d.dtype == np.float32


def test_get_loss():
    assert get_loss("ce") is cross_entropy and get_loss("cw") is margin
    assert set(losses.LOSSES) == {"ce", "cw"}
    with pytest.raises(ValueError, match="unknown loss 'l2'"):
        get_loss("l2")
