"""The fooling experiment (advkern.experiments.fooling): the regulariser's gradient, gradient
ascent and the evolutionary direct encoding on tiny models, and a small end-to-end run."""

import json

import numpy as np
import pytest
from _helpers import check_directional, randomize

from advkern import kernels
from advkern.errors import AdvkernError
from advkern.experiments import fooling as F
from advkern.nets import Conv2D, Dense, Flatten, ReLU, Sequential, save


def tiny_cnn(seed=0, hw=8, k=4):
    m = Sequential([Conv2D(3, 3, 1, "same"), ReLU(), Flatten(), Dense(k)], (1, hw, hw),
                   seed=seed)
    return randomize(m, seed)


@pytest.fixture(scope="module")
def mnist_mlp():
    """A small MLP trained briefly on 2,000 bundled MNIST digits (~0.3 s)."""
    from advkern.nets.datasets import load_mnist
    from advkern.nets.train import train

    x, y = load_mnist("train")
    m = Sequential([Flatten(), Dense(32), ReLU(), Dense(10)], (1, 28, 28), seed=0)
    m, _ = train(m, x[:2000], y[:2000], epochs=2, lr=3e-3, seed=0, progress=False)
    return m


def naive_tv2(x):
    n, c, h, w = x.shape
    out = np.zeros(n)
    for a in range(n):
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    if i + 1 < h:
                        out[a] += (x[a, ch, i + 1, j] - x[a, ch, i, j]) ** 2
                    if j + 1 < w:
                        out[a] += (x[a, ch, i, j + 1] - x[a, ch, i, j]) ** 2
    return out


def test_regularizer_value_and_gradient():
    rng = np.random.default_rng(0)
    x = rng.random((3, 2, 5, 4))
    l2, tv = 0.7, 0.3
    val, grad = F.regularizer(x, l2, tv)
    want = 0.5 * l2 * (x ** 2).reshape(3, -1).sum(1) + tv * naive_tv2(x)
    np.testing.assert_allclose(val, want, rtol=1e-12)
    # per image: the gradient of image n's value depends on image n only
    for n in range(3):
        def f(xn, n=n):
            xx = x.copy()
            xx[n] = xn
            return F.regularizer(xx, l2, tv)[0][n]
        check_directional(f, x[n], grad[n], rng, n_dirs=3)
    with pytest.raises(Exception, match="tv needs images"):
        F.regularizer(np.zeros((2, 5)), 0.0, 1.0)


def test_gradient_ascent_raises_class_probability():
    m = tiny_cnn()
    rng = np.random.default_rng(1)
    x0 = rng.random((8, 1, 8, 8))
    keep = x0.copy()
    cls = np.arange(8) % 4
    x, info = F.gradient_ascent(m, cls, x0, steps=40, alpha=0.01, stop=1.0,
                                backend="reference")
    np.testing.assert_array_equal(x0, keep)            # the caller's start is untouched
    assert x.shape == x0.shape and x.min() >= 0 and x.max() <= 1
    h = info["history"]
    assert h.shape == (41, 8)
    # small sign steps on a smooth-enough model: log p_t rises nearly every step and overall
    assert (h[-1] > h[0] + 0.05).all()
    assert (np.diff(h, axis=0) >= -1e-3).mean() > 0.9
    z = m.logits(x)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(info["confidence"], p[np.arange(8), cls], rtol=1e-9)


def test_gradient_ascent_stops_and_freezes():
    m = tiny_cnn(seed=3)
    x0 = np.zeros((4, 1, 8, 8))
    cls = np.arange(4)
    _, info = F.gradient_ascent(m, cls, x0, steps=300, alpha=0.05, stop=0.7,
                                backend="reference")
    assert (info["confidence"] >= 0.7).all()
    assert (info["steps"] < 300).all()
    # a frozen image stops moving: its log p_t is constant after its last step
    for n in range(4):
        tail = info["history"][info["steps"][n]:, n]
        np.testing.assert_allclose(tail, tail[0], rtol=1e-6)


def test_gradient_ascent_backends_agree(mnist_mlp):
    rng = np.random.default_rng(2)
    x0 = rng.random((10, 1, 28, 28)).astype(np.float32)
    cls = np.arange(10)
    out = {b: F.gradient_ascent(mnist_mlp, cls, x0, steps=30, alpha=0.01, tv=0.01, stop=1.0,
                                backend=b) for b in ("reference", "numba_cpu")}
    c_ref, c_fast = out["reference"][1]["confidence"], out["numba_cpu"][1]["confidence"]
    # float32 sign steps may differ where a gradient entry rounds to ~0; the confidences agree
    np.testing.assert_allclose(c_ref, c_fast, atol=0.02)
    assert (np.abs(out["reference"][0] - out["numba_cpu"][0]) > 1e-4).mean() < 0.05


def test_gradient_ascent_reaches_target_on_trained_mlp(mnist_mlp):
    x0, lab, _ = F._starts(mnist_mlp, np.arange(10), 3, seed=0)
    _, info = F.gradient_ascent(mnist_mlp, lab, x0, steps=150, alpha=0.01, tv=0.02,
                                anneal=True, stop=0.9999)
    med = [np.median(info["confidence"][lab == c]) for c in range(10)]
    assert min(med) >= 0.99, med


def test_evolve_improves_and_is_reproducible():
    m = tiny_cnn(seed=5)
    cls = np.array([0, 1, 2, 3, 0])
    x0, i0 = F.evolve(m, cls, popsize=8, generations=0, seed=4, backend="reference")
    x1, i1 = F.evolve(m, cls, popsize=8, generations=25, stop=1.0, seed=4, backend="reference")
    x2, i2 = F.evolve(m, cls, popsize=8, generations=25, stop=1.0, seed=4, backend="reference")
    assert x1.shape == (5, 1, 8, 8) and x1.min() >= 0 and x1.max() <= 1
    np.testing.assert_array_equal(x1, x2)
    assert (i1["confidence"] >= i0["confidence"]).all()      # greedy selection never loses
    assert (i1["confidence"] > i0["confidence"]).any()
    assert (i1["generations"] == 25).all() and (i1["queries"] == 8 * 26).all()
    # the returned image is the member scored: its confidence recomputed from the model
    z = m.logits(x1.astype(np.float64))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(i1["confidence"], p[np.arange(5), cls], rtol=1e-4)


@pytest.mark.parametrize("backend", [b for b in kernels.available() if b != "numpy"])
def test_backends_match_reference(backend):
    """Both methods on every backend (GPU ones under CI's simulator / emulator) follow the
    reference: the DE draws are shared, the arithmetic agrees to float rounding."""
    m = tiny_cnn(seed=6, hw=6)
    cls = np.arange(4)
    x0 = np.random.default_rng(6).random((4, 1, 6, 6)).astype(np.float32)
    kw = {"steps": 6, "alpha": 0.02, "tv": 0.01, "stop": 1.0}
    ga_ref = F.gradient_ascent(m, cls, x0, backend="reference", **kw)[1]["confidence"]
    ga = F.gradient_ascent(m, cls, x0, backend=backend, **kw)[1]["confidence"]
    np.testing.assert_allclose(ga, ga_ref, rtol=1e-3)
    kw = {"popsize": 5, "generations": 4, "stop": 1.0, "seed": 1}
    ev_ref = F.evolve(m, cls, backend="reference", **kw)[1]["confidence"]
    ev = F.evolve(m, cls, backend=backend, **kw)[1]["confidence"]
    np.testing.assert_allclose(ev, ev_ref, rtol=1e-3)


@pytest.mark.parametrize("kw, msg", [
    ({"classes": [0, 9]}, "classes out of range"),
    ({"stop": 1.5}, "stop must be"),
    ({"x_start": np.full((2, 1, 8, 8), 2.0)}, "outside the box"),
    ({"steps": -1}, "steps must be"),
])
def test_gradient_ascent_bad_arguments(kw, msg):
    m = tiny_cnn()
    args = {"classes": [0, 1], "x_start": np.zeros((2, 1, 8, 8)), **kw}
    cls, xs = args.pop("classes"), args.pop("x_start")
    with pytest.raises(AdvkernError, match=msg):
        F.gradient_ascent(m, cls, xs, **args)


def test_run_end_to_end(tmp_path, monkeypatch):
    m = randomize(Sequential([Flatten(), Dense(10)], (1, 28, 28), seed=0), 0)
    path = str(tmp_path / "tiny.npz")
    save(m, path)
    monkeypatch.setattr(F, "QUICK", dict(F.QUICK, starts=2, steps=60, runs=1, popsize=6,
                                         generations=10))
    res = F.run(models=[path], out=tmp_path / "out", quick=True, log=lambda s: None)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["experiment"] == "fooling" and on_disk["models"].keys() == {path}
    r = res["models"][path]
    assert sorted(r["gradient_ascent"]["per_class"]) == list(range(10))
    for meth in ("gradient_ascent", "evolution"):
        for c, v in r[meth]["per_class"].items():
            assert 0 <= v["min"] <= v["median"] <= v["max"] <= 1
    assert [t["pass"] for t in res["targets"]][1] is None
    png = tmp_path / "out" / res["figures"]["fooling_tiny"]
    assert png.stat().st_size > 1000
