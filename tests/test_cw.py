"""Carlini-Wagner L2: the reference against the exact answer on a linear model and against
DeepFool, its margin and binary search, and the engine on every backend against it."""

import numpy as np
import pytest

from advkern import engine, kernels
from advkern.attacks import run_attack
from advkern.errors import AdvkernError
from advkern.nets import Conv2D, Dense, Flatten, ReLU, Sequential, Tanh
from advkern.reference.cw import cw_l2, from_box, to_box
from advkern.reference.deepfool import deepfool

from _helpers import randomize

SHAPE = (1, 6, 6)


def mlp(dtype=np.float64):
    return randomize(Sequential([Flatten(), Dense(12), ReLU(), Dense(4)], SHAPE, seed=1,
                                dtype=dtype), 3)


def cnn(dtype=np.float64):
    return randomize(Sequential([Conv2D(3, 3, 1, "same"), Tanh(), Flatten(), Dense(4)], SHAPE,
                                seed=2, dtype=dtype), 4)


def batch(m, n=8, seed=0):
    x = np.random.default_rng(seed).uniform(0.25, 0.75, (n, *SHAPE))
    return x, m.predict(x)


def l2(a, b):
    return np.sqrt(((a - b) ** 2).reshape(len(a), -1).sum(1))


def test_tanh_change_of_variables_round_trips_inside_the_box():
    x = np.random.default_rng(0).uniform(0, 1, (3, 36))
    back, dxdw = to_box(from_box(x, 0.0, 1.0), 0.0, 1.0)
    np.testing.assert_allclose(back, x, atol=1e-6)
    assert (dxdw > 0).all()


def test_linear_binary_model_reaches_the_closest_boundary_point():
    m = Sequential([Flatten(), Dense(1)], SHAPE, seed=0, dtype=np.float64)
    m.params[1]["w"][:] = np.random.default_rng(1).standard_normal((36, 1)) * 0.3
    m.params[1]["b"][:] = 0.1
    x, y = batch(m, 4)
    # a small lr and more steps: this checks where C&W converges, not its default budget
    xa, info = cw_l2(m, x, y, steps=300, search_steps=8, initial_const=0.1, lr=0.01)
    w = m.params[1]["w"][:, 0]
    exact = np.abs(x.reshape(4, -1) @ w + 0.1) / np.linalg.norm(w)   # distance to the plane
    assert info["success"].all()
    np.testing.assert_allclose(info["l2"], l2(xa, x), rtol=1e-9)
    assert (info["l2"] >= exact * (1 - 1e-9)).all() and (info["l2"] <= exact * 1.05).all()


@pytest.mark.parametrize("arch", [mlp, cnn], ids=["mlp", "cnn"])
def test_fools_within_the_box_and_no_farther_than_deepfool(arch):
    m = arch()
    x, y = batch(m)
    x0 = x.copy()
    xa, info = cw_l2(m, x, y)
    np.testing.assert_array_equal(x, x0)
    assert 0 <= xa.min() and xa.max() <= 1
    ok = info["success"]
    assert ok.mean() >= 0.9
    np.testing.assert_array_equal(m.predict(xa)[ok] != y[ok], True)
    np.testing.assert_array_equal(xa[~ok], x[~ok])           # nothing found: x itself
    xd, dinfo = deepfool(m, x, y)
    both = ok & dinfo["success"]
    assert np.median(l2(xa, x)[both]) <= 1.1 * np.median(l2(xd, x)[both])


def test_targeted_kappa_and_the_binary_search():
    m = mlp()
    x, y = batch(m)
    t = (y + 1) % 4
    # (the small random model's logits stay within about +-1.5 in the box, so a margin of
    # 0.2 is reachable and 0.5 is not)
    xa, info = cw_l2(m, x, y, targeted=True, target=t, kappa=0.2)
    z = m.logits(xa)
    others = np.where(np.eye(4, dtype=bool)[t], -np.inf, z).max(1)
    ok = info["success"]
    assert ok.mean() >= 0.75
    assert (z[ok, t[ok]] - others[ok] >= 0.2 - 1e-9).all()          # the confidence margin
    # a tiny first c cannot fool in the first round: the search grows c
    _, small = cw_l2(m, x, y, initial_const=1e-6, search_steps=4, steps=50)
    assert (small["const"] > 1e-6).all()


def test_bad_arguments():
    m = mlp()
    x, y = batch(m)
    for kw, frag in (({"kappa": -1}, "kappa"), ({"initial_const": 0}, "initial_const"),
                     ({"search_steps": 0}, "search_steps"), ({"lr": 0}, "lr"),
                     ({"abort_early": "yes"}, "abort_early"), ({"target": 1}, "targeted")):
        with pytest.raises(AdvkernError, match=frag):
            cw_l2(m, x, y, **kw)


@pytest.mark.parametrize("backend", kernels.available())
@pytest.mark.parametrize("arch", [mlp, cnn], ids=["mlp", "cnn"])
def test_engine_matches_the_reference(backend, arch):
    m = arch()
    x, y = batch(m, 5)
    kw = {"steps": 30, "search_steps": 3}
    want, winfo = cw_l2(m, x, y, **kw)
    got, info = engine.cw_l2(m, x, y, backend=backend, **kw)
    np.testing.assert_array_equal(info["success"], winfo["success"])
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)
    if backend == "numpy":
        np.testing.assert_array_equal(got, want)


def test_front_door():
    m = mlp()
    x, y = batch(m)
    run = run_attack(m, x, y, "cw", steps=40, backend="reference")
    want, _ = cw_l2(m, x, y, steps=40)
    np.testing.assert_array_equal(run.x_adv, want)
