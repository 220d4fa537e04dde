"""Tests for advkern.reference.metrics: success, accuracies, perturbation norms, transfer."""

import math

import numpy as np
import pytest

from advkern.errors import AdvkernError, ShapeError
from advkern.nets import Dense, Flatten, ReLU, Sequential
from advkern.reference.gradient_attacks import fgsm
from advkern.reference.metrics import (evaluate, perturbation_norms, success_mask, transfer,
                                       transfer_matrix)


def mlp(seed=6, dtype=np.float64):
    return Sequential([Flatten(), Dense(7), ReLU(), Dense(4)], (1, 5, 5), seed=seed, dtype=dtype)


def data(n=10, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).uniform(size=(n, 1, 5, 5)).astype(dtype)


def test_perturbation_norms_by_hand():
    x = np.zeros((3, 1, 2, 2))
    x_adv = x.copy()
    x_adv[1, 0, 0, 0] = 0.5
    x_adv[2, 0] = [[0.3, -0.4], [0.0, 0.1]]
    n = perturbation_norms(x, x_adv)
    assert n["l0"].tolist() == [0, 1, 3]
    np.testing.assert_allclose(n["l1"], [0, 0.5, 0.8])
    np.testing.assert_allclose(n["l2"], [0, 0.5, math.sqrt(0.26)])
    np.testing.assert_allclose(n["linf"], [0, 0.5, 0.4])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_evaluate_matches_definitions(dtype):
    m = mlp()
    x = data(20, dtype=dtype)
    y = m.predict(x)
    y[:4] = (y[:4] + 1) % 4  # four images misclassified before the attack
    x_adv = fgsm(m, x, y, 0.15)
    x_adv[5] = x[5]  # one image left untouched
    r = evaluate(m, x, y, x_adv)
    pred, pred_adv = m.predict(x), m.predict(x_adv)
    assert r["n"] == 20
    np.testing.assert_array_equal(r["pred"], pred)
    np.testing.assert_array_equal(r["pred_adv"], pred_adv)
    succ = pred_adv != y
    np.testing.assert_array_equal(r["success"], succ)
    assert r["clean_accuracy"] == pytest.approx(np.mean(pred == y)) and r["clean_accuracy"] <= 0.8
    assert r["adversarial_accuracy"] == pytest.approx(np.mean(pred_adv == y))
    assert r["success_rate"] == pytest.approx(np.mean(succ))
    assert r["success_rate_on_correct"] == pytest.approx(np.mean(succ[pred == y]))
    assert r["l0"][5] == 0 and r["l2"][5] == 0
    d = (x_adv.astype(np.float64) - x).reshape(20, -1)
    np.testing.assert_allclose(r["l2"], np.linalg.norm(d, axis=1))
    np.testing.assert_allclose(r["linf"], np.abs(d).max(axis=1))
    np.testing.assert_array_equal(r["l0"], np.count_nonzero(d, axis=1))
    assert 0 < succ.sum() < 20
    for k in ("l0", "l1", "l2", "linf"):
        assert r[f"mean_{k}"] == pytest.approx(np.mean(r[k][succ]))
        assert r[f"median_{k}"] == pytest.approx(np.median(r[k][succ]))


def test_targeted_success():
    m = mlp()
    x = data(12)
    y = m.predict(x)
    t = (y + 1) % 4
    x_adv = fgsm(m, x, y, 0.3, targeted=True, target=t)
    pa = m.predict(x_adv)
    np.testing.assert_array_equal(success_mask(m, x_adv, y, t), pa == t)
    np.testing.assert_array_equal(success_mask(m, x_adv, y), pa != y)
    np.testing.assert_array_equal(success_mask(m, x_adv, y, 2), pa == 2)
    r = evaluate(m, x, y, x_adv, target=t)
    assert r["success_rate"] == pytest.approx(np.mean(pa == t))


def test_nan_when_nothing_to_average():
    m = mlp()
    x = data(6)
    y = m.predict(x)
    r = evaluate(m, x, y, x.copy())  # no attack: nothing succeeds
    assert r["success_rate"] == 0 and r["clean_accuracy"] == 1 and r["adversarial_accuracy"] == 1
    assert all(math.isnan(r[f"{s}_{k}"]) for s in ("mean", "median")
               for k in ("l0", "l1", "l2", "linf"))
    r = evaluate(m, x, (y + 1) % 4, x.copy())  # nothing correct to begin with
    assert math.isnan(r["success_rate_on_correct"]) and r["success_rate"] == 1
    r = evaluate(m, x[:0], y[:0], x[:0])
    assert r["n"] == 0 and math.isnan(r["clean_accuracy"]) and math.isnan(r["success_rate"])
    assert math.isnan(transfer(m, x[:0], y[:0]))


def test_transfer_and_matrix():
    a, b = mlp(6), mlp(7)
    x = data(30)
    y = a.predict(x)
    x_adv = fgsm(a, x, y, 0.2)
    assert transfer(b, x_adv, y) == pytest.approx(np.mean(b.predict(x_adv) == y))
    M = transfer_matrix({"a": a, "b": b}, x, y, lambda m, xx, yy: fgsm(m, xx, yy, 0.2))
    assert set(M) == {"a", "b"} and all(set(row) == {"a", "b"} for row in M.values())
    assert M["a"]["a"] == pytest.approx(a.accuracy(x_adv, y))
    assert M["a"]["b"] == pytest.approx(transfer(b, x_adv, y))
    assert M["b"]["b"] == pytest.approx(b.accuracy(fgsm(b, x, y, 0.2), y))


def test_errors():
    m = mlp()
    x = data(4)
    y = m.predict(x)
    with pytest.raises(ShapeError):
        evaluate(m, x, y, x[:3])
    with pytest.raises(AdvkernError, match="out of range"):
        evaluate(m, x, np.array([0, 1, 2, 9]), x)
    with pytest.raises(AdvkernError, match="target"):
        success_mask(m, x, y, target=[0, 1, 2, 7])
    with pytest.raises(ShapeError):
        transfer(m, x.reshape(4, 25), y)
    with pytest.raises(AdvkernError, match="NaN"):
        evaluate(m, x, y, x * np.nan)
