"""DeepFool (Moosavi-Dezfooli et al. 2016): the reference against the closed form on a linear
model and against its own guarantees, and the engine on every backend against the
reference (batched: all images in one Jacobian per iteration)."""

import numpy as np
import pytest

from advkern import engine, kernels
from advkern.attacks import run_attack
from advkern.errors import AdvkernError
from advkern.nets import Conv2D, Dense, Flatten, ReLU, Sequential, Tanh
from advkern.reference.deepfool import deepfool

from _helpers import randomize

SHAPE = (1, 6, 6)


def mlp(dtype=np.float64):
    return randomize(Sequential([Flatten(), Dense(12), ReLU(), Dense(5)], SHAPE, seed=1,
                                dtype=dtype), 3)


def cnn(dtype=np.float64):
    return randomize(Sequential([Conv2D(3, 3, 1, "same"), Tanh(), Flatten(), Dense(4)], SHAPE,
                                seed=2, dtype=dtype), 4)


def batch(n=10, k=5, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.3, 0.7, (n, *SHAPE)).astype(dtype), rng.integers(0, k, n)


def test_linear_binary_model_is_one_exact_step():
    """For z = w.x + b the closest boundary point is x - z w / ||w||^2: DeepFool takes
    exactly that step (times 1 + overshoot, plus the 1e-4 push) and stops."""
    m = Sequential([Flatten(), Dense(1)], SHAPE, seed=0, dtype=np.float64)
    rng = np.random.default_rng(1)
    m.params[1]["w"][:] = rng.standard_normal((36, 1)) * 0.1
    m.params[1]["b"][:] = 0.05
    x, _ = batch(4)
    y = m.predict(x)
    xa, info = deepfool(m, x, y, overshoot=0.02, clip=(-100.0, 100.0))
    w = m.params[1]["w"][:, 0]
    z = x.reshape(4, -1) @ w + 0.05
    want = x.reshape(4, -1) - (1.02 * (np.abs(z) + 1e-4) / (w @ w) * np.sign(z))[:, None] * w
    np.testing.assert_allclose(xa.reshape(4, -1), want, rtol=1e-12, atol=1e-12)
    assert info["success"].all() and (info["iterations"] == 1).all()


@pytest.mark.parametrize("norm", [2, "inf"])
@pytest.mark.parametrize("arch", [mlp, cnn], ids=["mlp", "cnn"])
def test_fools_stays_in_box_and_leaves_inputs_alone(arch, norm):
    m, (x, y) = arch(), batch(k=m_k(arch))
    x0 = x.copy()
    xa, info = deepfool(m, x, y, norm=norm, max_iter=50)
    np.testing.assert_array_equal(x, x0)
    assert xa.dtype == x.dtype and 0 <= xa.min() and xa.max() <= 1
    pred = m.predict(xa)
    np.testing.assert_array_equal(info["success"], pred != info["original"])
    assert info["success"].mean() >= 0.9
    assert (info["iterations"] <= 50).all() and (info["iterations"][info["success"]] >= 1).all()


def m_k(arch):
    return 5 if arch is mlp else 4


def test_smaller_than_the_fgm_that_fools_the_same_image():
    """DeepFool's L2 distance is at most that of the smallest FGM (on a grid) that fools."""
    from advkern.reference import fgm_l2
    m, (x, y) = mlp(), batch()
    y = m.predict(x)
    xa, info = deepfool(m, x, y)
    d_df = np.sqrt(((xa - x) ** 2).reshape(len(x), -1).sum(1))
    for i in np.flatnonzero(info["success"]):
        for eps in np.linspace(0.05, 5, 100):
            xf = fgm_l2(m, x[i:i + 1], y[i:i + 1], eps)
            if m.predict(xf)[0] != y[i]:
                assert d_df[i] <= eps * 1.1, (i, d_df[i], eps)
                break


def test_candidates_and_bad_arguments():
    m, (x, y) = mlp(), batch()
    xa2, _ = deepfool(m, x, y, candidates=2)     # only the runner-up class
    assert np.isfinite(xa2).all()
    for kw, frag in (({"norm": 1}, "norm"), ({"overshoot": -1}, "overshoot"),
                     ({"max_iter": 0}, "max_iter"), ({"candidates": 1}, "candidates")):
        with pytest.raises(AdvkernError, match=frag):
            deepfool(m, x, y, **kw)


@pytest.mark.parametrize("backend", kernels.available())
@pytest.mark.parametrize("arch", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("norm", [2, "inf"])
def test_engine_matches_the_reference(backend, arch, norm):
    m, (x, y) = arch(), batch(6, k=m_k(arch))
    want, winfo = deepfool(m, x, y, norm=norm, max_iter=20)
    got, info = engine.deepfool(m, x, y, norm=norm, max_iter=20, backend=backend)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    for k in ("success", "iterations", "original"):
        np.testing.assert_array_equal(info[k], winfo[k], err_msg=k)
    if backend == "numpy":                        # the reference's own primitives
        np.testing.assert_array_equal(got, want)


def test_front_door():
    m, (x, y) = mlp(), batch()
    run = run_attack(m, x, y, "deepfool", overshoot=0.05, backend="reference")
    want, info = deepfool(m, x, y, overshoot=0.05)
    np.testing.assert_array_equal(run.x_adv, want)
    np.testing.assert_array_equal(run.info["attack_success"], info["success"])
