"""The representation experiment (advkern.experiments.representation) and the reference's
``network.activations`` helper: PCA against an eigendecomposition, the activation-difference
statistics against direct computations, and a small end-to-end run."""

import json

import numpy as np
import pytest
from _helpers import randomize

from advkern.errors import AdvkernError
from advkern.experiments import representation as R
from advkern.nets import Conv2D, Dense, Flatten, ReLU, Sequential, save
from advkern.reference import network


def tiny_cnn(seed=0):
    m = Sequential([Conv2D(3, 3, 1, "same"), ReLU(), Conv2D(4, 3, 2, "valid"), ReLU(),
                    Flatten(), Dense(5)], (1, 8, 8), seed=seed)
    return randomize(m, seed)


def test_activations_equal_forward_intermediates():
    m = randomize(Sequential([Flatten(), Dense(7), ReLU(), Dense(3)], (1, 4, 4), seed=1), 1)
    x = np.random.default_rng(0).random((5, 1, 4, 4))
    a = network.activations(m, x)
    assert [t.shape[1:] for t in a] == [tuple(s) for s in m.shapes[1:]]
    # independent arithmetic, written out
    w1, b1, w2, b2 = m.params[1]["w"], m.params[1]["b"], m.params[3]["w"], m.params[3]["b"]
    h0 = x.reshape(5, -1)
    h1 = h0 @ w1.astype(np.float64) + b1
    np.testing.assert_allclose(a[0], h0)
    np.testing.assert_allclose(a[1], h1, rtol=1e-12)
    np.testing.assert_allclose(a[2], np.maximum(h1, 0), rtol=1e-12)
    np.testing.assert_allclose(a[3], np.maximum(h1, 0) @ w2.astype(np.float64) + b2,
                               rtol=1e-12)
    z, caches = network.forward(m, x)
    np.testing.assert_array_equal(a[-1], z)
    np.testing.assert_array_equal(caches[3][0], a[2])      # dense cache holds its input
    assert a[1].dtype == np.float64


def test_activations_cnn_matches_forward_caches():
    m = tiny_cnn()
    x = np.random.default_rng(1).random((3, 1, 8, 8)).astype(np.float32)
    a = network.activations(m, x)
    z, caches = network.forward(m, x)
    np.testing.assert_array_equal(a[-1], z)
    np.testing.assert_array_equal(caches[1], a[0] > 0)      # relu cache: its input's mask
    np.testing.assert_array_equal(caches[2][1], a[1])       # 'valid' conv: padded input = input
    assert all(t.dtype == np.float32 for t in a)
    with pytest.raises(AdvkernError):
        network.activations(m, np.zeros((2, 1, 7, 7)))


def test_pca_against_covariance_eigendecomposition():
    rng = np.random.default_rng(2)
    h = rng.standard_normal((60, 6)) @ rng.standard_normal((6, 6)) + 3.0
    mean, comps, var, explained = R.pca(h, k=3)
    cov = np.cov(h, rowvar=False)
    w, v = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1]
    w, v = w[order], v[:, order]
    np.testing.assert_allclose(mean, h.mean(0))
    np.testing.assert_allclose(var, w[:3], rtol=1e-10)
    np.testing.assert_allclose(explained, w[:3] / w.sum(), rtol=1e-10)
    for j in range(3):   # equal up to sign; the sign rule: largest entry positive
        assert abs(abs(comps[j] @ v[:, j]) - 1) < 1e-10
        assert comps[j][np.abs(comps[j]).argmax()] > 0
    np.testing.assert_allclose(comps @ comps.T, np.eye(3), atol=1e-12)
    with pytest.raises(AdvkernError):
        R.pca(h[:1])


def test_nearest_centroid():
    c = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    h = np.array([[1.0, 1.0], [9.0, -1.0], [2.0, 7.0]])
    np.testing.assert_array_equal(R.nearest_centroid(h, c), [0, 1, 2])


def test_tracked_layers_names():
    idx, names = R.tracked_layers(tiny_cnn())
    assert idx == [1, 3, 5] and names == ["conv1+relu", "conv2+relu", "logits"]


def test_layer_changes_and_maps():
    m = tiny_cnn(seed=3)
    rng = np.random.default_rng(3)
    x = rng.random((4, 1, 8, 8))
    xa = np.clip(x + 0.1 * rng.choice([-1, 1], x.shape), 0, 1)
    names, d, r = R.layer_changes(m, x, x.copy())
    assert names == ["input", "conv1+relu", "conv2+relu", "logits"]
    assert (d == 0).all() and (r == 0).all()
    names, d, r = R.layer_changes(m, x, xa)
    np.testing.assert_allclose(d[:, 0], np.abs(xa - x).reshape(4, -1).mean(1))
    np.testing.assert_allclose(r[:, 0], d[:, 0] / np.abs(x).reshape(4, -1).mean(1))
    a0, a1 = network.activations(m, x), network.activations(m, xa)
    np.testing.assert_allclose(d[:, 2], np.abs(a1[3] - a0[3]).reshape(4, -1).mean(1))
    mnames, maps = R.diff_maps(m, x, xa)
    assert mnames == ["conv1+relu", "conv2+relu"]
    assert maps[0].shape == (4, 8, 8) and maps[1].shape == (4, 3, 3)
    for n in range(4):   # max over channels, by brute force
        for i in range(3):
            for j in range(3):
                want = max(abs(a1[3][n, c, i, j] - a0[3][n, c, i, j]) for c in range(4))
                assert maps[1][n, i, j] == pytest.approx(want)


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    """A small CNN on MNIST trained briefly (~2 s), saved to a model file."""
    from advkern.nets.datasets import load_mnist
    from advkern.nets.train import train

    x, y = load_mnist("train")
    m = Sequential([Conv2D(4, 3, 2, "valid"), ReLU(), Conv2D(8, 3, 2, "valid"), ReLU(),
                    Flatten(), Dense(10)], (1, 28, 28), seed=0)
    m, _ = train(m, x[:1500], y[:1500], epochs=2, lr=3e-3, seed=0, progress=False)
    path = str(tmp_path_factory.mktemp("rep") / "tinycnn.npz")
    save(m, path)
    return path


def test_run_end_to_end(tiny_trained, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "QUICK", dict(R.QUICK, n_fit=300, n_source=6, n_maps=60,
                                         pgd={"eps": 0.3, "alpha": 0.02, "steps": 15}))
    out = tmp_path / "out"
    res = R.run(models=[tiny_trained], out=out, quick=True, log=lambda s: None)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["experiment"] == "representation"
    rep = res["models"][tiny_trained]["representation"]
    assert rep["n_source"] == 6 and "300 clean test images" in rep["pca_fitted_on"]
    for k in ("targeted_success", "nearest_centroid_is_target_full",
              "nearest_centroid_is_target_pca"):
        assert 0 <= rep[k] <= 1
    assert 0 < sum(rep["explained_variance"]) <= 1
    act = res["models"][tiny_trained]["activations"]
    assert act["successful"]["n"] + act["failed"]["n"] == act["n"] == 60
    assert act["map_layers"] == ["conv1+relu", "conv2+relu"]
    for key in ("pca_tinycnn", "activation_diff_tinycnn"):
        assert (out / res["figures"][key]).stat().st_size > 1000
