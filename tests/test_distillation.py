"""Defensive distillation: the soft-label loss at a temperature, training with it, and the
``distillation`` experiment end to end (tiny settings)."""

import json

import numpy as np
import pytest
from _helpers import check_directional, seeds
from hypothesis import given
from hypothesis import strategies as st

from advkern.errors import AdvkernError, ShapeError
from advkern.nets import Dense, Flatten, ReLU, Sequential, build
from advkern.nets.datasets import load_mnist
from advkern.nets.train import train
from advkern.reference import network
from advkern.reference.losses import cross_entropy, soft_cross_entropy

temperatures = st.sampled_from([1.0, 0.5, 3.7, 20.0, 100.0])


def _batch(n, k, seed, scale=3.0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, k)) * scale
    q = rng.dirichlet(np.ones(max(k, 2)), size=n)
    return z, q, rng


# ----------------------------------------------------------------------------- the loss


@given(st.integers(1, 5), st.integers(1, 8), temperatures, seeds)
def test_soft_cross_entropy_gradient_matches_finite_differences(n, k, t, seed):
    z, q, rng = _batch(n, k, seed, scale=3.0 * t)   # logits on the scale a model at T has
    loss, d = soft_cross_entropy(z, q, t)
    assert loss.shape == (n,) and d.shape == z.shape
    check_directional(lambda a: soft_cross_entropy(a, q, t)[0].sum(), z, d, rng, n_dirs=3,
                      what=f"soft cross-entropy T={t}")


@given(st.integers(1, 5), st.integers(2, 8), temperatures, seeds)
def test_soft_cross_entropy_equals_the_naive_formula(n, k, t, seed):
    z, q, _ = _batch(n, k, seed)
    e = np.exp(z / t - (z / t).max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    loss, d = soft_cross_entropy(z, q, t)
    np.testing.assert_allclose(loss, -(q * np.log(p)).sum(axis=1), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(d, (p - q) / t, rtol=1e-11, atol=1e-14)


def test_soft_cross_entropy_unnormalised_targets_gradient():
    # rows of q that do not sum to 1 (float32 softmax rows): the gradient is still exact
    z, q, rng = _batch(4, 6, 3)
    q = q * np.array([[0.9], [1.1], [1.0], [2.0]])
    _, d = soft_cross_entropy(z, q, 7.0)
    check_directional(lambda a: soft_cross_entropy(a, q, 7.0)[0].sum(), z, d, rng, n_dirs=3)


def test_soft_cross_entropy_is_stable_for_huge_logits():
    # a T = 100 student's logits: gaps of thousands; no overflow, finite loss and gradient
    z = np.array([[5000.0, -3000.0, 0.0], [-1e4, 1e4, 3.0]])
    q = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, d = soft_cross_entropy(z, q, 1.0)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(d))
    assert loss[1] == pytest.approx(2e4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_soft_cross_entropy_at_t1_with_one_hot_is_cross_entropy_bit_for_bit(dtype):
    z, _, rng = _batch(7, 10, 5)
    z = z.astype(dtype)
    y = rng.integers(0, 10, 7)
    q = np.eye(10, dtype=dtype)[y]
    l1, d1 = soft_cross_entropy(z, q, 1.0)
    l0, d0 = cross_entropy(z, y)
    assert np.array_equal(l1, l0) and np.array_equal(d1, d0) and d1.dtype == dtype


def test_soft_cross_entropy_binary_model_reads_two_classes():
    z, q, rng = _batch(5, 1, 11)
    loss, d = soft_cross_entropy(z, q, 2.0)
    assert d.shape == (5, 1)
    check_directional(lambda a: soft_cross_entropy(a, q, 2.0)[0].sum(), z, d, rng)
    with pytest.raises(ShapeError):
        soft_cross_entropy(z, q[:, :1], 2.0)


def test_soft_param_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    model = Sequential([Flatten(), Dense(5), ReLU(), Dense(4)], (2, 3), seed=1,
                       dtype=np.float64)
    x = rng.uniform(0, 1, (6, 2, 3))
    q = rng.dirichlet(np.ones(4), size=6)
    t = 5.0
    mean, grads = network.loss_and_param_grads_soft(model, x, q, t)
    z = model.logits(x)
    assert mean == pytest.approx(soft_cross_entropy(z, q, t)[0].mean(), rel=1e-14)
    for i, g in enumerate(grads):
        for name, a in g.items():
            def f(v, i=i, name=name):
                m = model.copy()
                m.params[i][name] = v
                return network.loss_and_param_grads_soft(m, x, q, t)[0]
            check_directional(f, model.params[i][name], a, rng, n_dirs=2,
                              what=f"layer {i} {name}")


# ----------------------------------------------------------------------------- training


def _small():
    x, y = load_mnist("train")
    return x[:256], y[:256]


def test_training_t1_with_one_hot_soft_labels_equals_ordinary_training():
    # Bit for bit: the same seeded batches, and at T = 1 the soft loss with one-hot rows is
    # cross_entropy operation for operation (previous test), so every Adam step is the same.
    # Both on the reference: the soft path always runs there, and the hard path on another
    # backend would differ by its summation order (rounding), not by the objective.
    x, y = _small()
    m = build("mlp", seed=2)
    a, ha = train(m, x, y, epochs=2, seed=4, progress=False, backend="reference")
    q = np.eye(10, dtype=np.float32)[y]
    q0 = q.copy()
    b, hb = train(m, x, y, epochs=2, seed=4, progress=False, backend="reference",
                  soft_labels=q, temperature=1.0)
    for pa, pb in zip(a.params, b.params):
        for k in pa:
            assert np.array_equal(pa[k], pb[k])
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    assert np.array_equal(q, q0)   # the caller's soft labels are not modified


def test_teacher_at_temperature_uses_one_hot_targets_and_differs_from_t1():
    x, y = _small()
    m = build("softmax", seed=0) if "softmax" in _archs() else build("logreg", seed=0)
    a, _ = train(m, x, y, epochs=1, seed=0, progress=False, temperature=10.0)
    b, _ = train(m, x, y, epochs=1, seed=0, progress=False, temperature=10.0,
                 soft_labels=np.eye(10)[y])
    c, _ = train(m, x, y, epochs=1, seed=0, progress=False, backend="reference")
    assert np.array_equal(a.params[-1]["w"], b.params[-1]["w"])
    assert not np.array_equal(a.params[-1]["w"], c.params[-1]["w"])


def _archs():
    from advkern.nets.architectures import ARCHITECTURES
    return ARCHITECTURES


def test_distillation_training_arguments_are_checked():
    x, y = _small()
    m = build("logreg")
    with pytest.raises(AdvkernError, match="temperature"):
        train(m, x, y, epochs=1, temperature=0.0, progress=False)
    with pytest.raises(ShapeError, match="soft_labels"):
        train(m, x, y, epochs=1, soft_labels=np.ones((len(x), 9)) / 9, progress=False)
    with pytest.raises(AdvkernError, match="distributions"):
        train(m, x, y, epochs=1, soft_labels=-np.eye(10)[y], progress=False)
    with pytest.raises(AdvkernError, match="adversarial"):
        train(m, x, y, epochs=1, temperature=5.0, adversarial="fgsm", progress=False)


def test_scaled_logits_divides_the_last_layer():
    from advkern.experiments.distillation import scaled_logits
    m = build("mlp", seed=3)
    x, _ = _small()
    w0 = m.params[-1]["w"].copy()
    s = scaled_logits(m, 20.0)
    np.testing.assert_allclose(s.logits(x[:16]), m.logits(x[:16]) / 20, rtol=2e-5, atol=1e-6)
    assert np.array_equal(s.predict(x[:16]), m.predict(x[:16]))
    assert np.array_equal(m.params[-1]["w"], w0)


# ----------------------------------------------------------------------------- experiment


def test_distillation_experiment_end_to_end(tmp_path, monkeypatch):
    from advkern.experiments import distillation
    monkeypatch.setenv("ADVKERN_CACHE", str(tmp_path / "cache"))
    arch = "mlp"
    kw = dict(models=(arch,), quick=True, temperatures=(1, 50), n=12, epochs=3,
              train_n=1000, log=lambda m: None)
    r = distillation.run(out=tmp_path / "out", **kw)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["experiment"] == "distillation" and on_disk["temperatures"] == [1.0, 50.0]
    assert (tmp_path / "out" / on_disk["figures"][f"distillation_{arch}"]).stat().st_size > 0
    rows = r["results"][arch]
    assert set(rows) == {"T=1", "T=50"} and "before" in rows["T=1"]
    for row in rows.values():
        assert not row["cached"]
        assert 0 <= row["zero_gradient_fraction"] <= 1
        for part in ("deployed", "masking_aware"):
            for v in row[part].values():
                assert 0 <= v["success_rate"] <= 1
    # the T = 50 student's logits are on a larger scale than the T = 1 student's (measured
    # 3.4x after these 3 epochs; ~45x with the full recipe)
    assert rows["T=50"]["median_top2_logit_gap"] > 2 * rows["T=1"]["median_top2_logit_gap"]
    names = [t["name"] for t in r["targets"]]
    assert any("lowers FGSM" in n for n in names) and any("JSMA" in n for n in names)
    again = distillation.run(**kw)   # from the cache: the same models, the same numbers
    assert all(row["cached"] for row in again["results"][arch].values())
    def rates(rr):
        return {k: v["success_rate"] for k, v in rr["T=50"]["deployed"].items()}
    assert rates(again["results"][arch]) == rates(rows)


@pytest.mark.parametrize("kw, match", [
    ({"temperatures": (20, 100)}, "temperatures"),
    ({"temperatures": (1,)}, "temperatures"),
    ({"temperatures": (1, -5)}, "temperatures"),
    ({"models": ("nope.npz",)}, "architecture"),
    ({"n": 0}, "n"),
])
def test_distillation_experiment_arguments_are_checked(kw, match, tmp_path):
    from advkern.experiments import distillation
    with pytest.raises(AdvkernError, match=match):
        distillation.run(quick=True, log=lambda m: None, **kw)
