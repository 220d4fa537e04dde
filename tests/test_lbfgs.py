"""Szegedy et al.'s L-BFGS attack: the projected L-BFGS against a box-constrained quadratic
whose answer is known, the attack's guarantees, and the engine on every backend."""

import numpy as np
import pytest

from advkern import engine, kernels
from advkern.attacks import run_attack
from advkern.errors import AdvkernError
from advkern.nets import Conv2D, Dense, Flatten, ReLU, Sequential, Tanh
from advkern.reference.lbfgs import lbfgs_attack, minimise

from _helpers import randomize

SHAPE = (1, 6, 6)


def mlp():
    return randomize(Sequential([Flatten(), Dense(12), ReLU(), Dense(4)], SHAPE, seed=1,
                                dtype=np.float64), 3)


def cnn():
    return randomize(Sequential([Conv2D(3, 3, 1, "same"), Tanh(), Flatten(), Dense(4)], SHAPE,
                                seed=2, dtype=np.float64), 4)


def batch(m, n=8, seed=0):
    x = np.random.default_rng(seed).uniform(0.25, 0.75, (n, *SHAPE))
    return x, m.predict(x)


def test_projected_lbfgs_solves_a_box_constrained_quadratic():
    """f(z) = sum_i h_i (z_i - a_i)^2 (ill-conditioned, h from 1 to 1000) over [0, 1]^D:
    the minimiser is clip(a, 0, 1), coordinate by coordinate."""
    rng = np.random.default_rng(0)
    n, d = 5, 40
    h = np.logspace(0, 3, d)[None, :] * rng.uniform(0.5, 1.5, (n, d))
    a = rng.uniform(-0.5, 1.5, (n, d))

    def fg(z):
        return (h * (z - a) ** 2).sum(1), 2 * h * (z - a)

    z = minimise(fg, np.full((n, d), 0.5), 0.0, 1.0, max_iter=200, memory=8)
    np.testing.assert_allclose(z, np.clip(a, 0, 1), atol=1e-5)


@pytest.mark.parametrize("arch", [mlp, cnn], ids=["mlp", "cnn"])
def test_reaches_the_target_in_the_box_and_leaves_inputs_alone(arch):
    m = arch()
    x, y = batch(m)
    t = (y + 1) % 4
    x0 = x.copy()
    xa, info = lbfgs_attack(m, x, y, t)
    np.testing.assert_array_equal(x, x0)
    assert 0 <= xa.min() and xa.max() <= 1
    ok = info["success"]
    assert ok.mean() >= 0.9
    np.testing.assert_array_equal(m.predict(xa)[ok], t[ok])
    np.testing.assert_allclose(info["l2"][ok],
                               np.sqrt(((xa - x) ** 2).reshape(len(x), -1).sum(1))[ok])
    np.testing.assert_array_equal(xa[~ok], x[~ok])


def test_more_search_finds_a_smaller_perturbation():
    m = mlp()
    x, y = batch(m)
    t = (y + 1) % 4
    _, short = lbfgs_attack(m, x, y, t, search_steps=1)
    _, long = lbfgs_attack(m, x, y, t, search_steps=6)
    both = short["success"] & long["success"]
    assert both.any() and (long["l2"][both] <= short["l2"][both] + 1e-12).all()


def test_bad_arguments():
    m = mlp()
    x, y = batch(m)
    for kw, frag in (({"initial_const": 0}, "initial_const"),
                     ({"search_steps": 0}, "search_steps"), ({"max_iter": 0}, "max_iter"),
                     ({"memory": 0}, "memory")):
        with pytest.raises(AdvkernError, match=frag):
            lbfgs_attack(m, x, y, (y + 1) % 4, **kw)
    with pytest.raises(AdvkernError, match="true label"):
        lbfgs_attack(m, x, y, y)


@pytest.mark.parametrize("backend", kernels.available())
@pytest.mark.parametrize("arch", [mlp, cnn], ids=["mlp", "cnn"])
def test_engine_matches_the_reference(backend, arch):
    m = arch()
    x, y = batch(m, 5)
    t = (y + 1) % 4
    kw = {"search_steps": 2, "max_iter": 10}
    want, winfo = lbfgs_attack(m, x, y, t, **kw)
    got, info = engine.lbfgs_attack(m, x, y, t, backend=backend, **kw)
    np.testing.assert_array_equal(info["success"], winfo["success"])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
    if backend == "numpy":
        np.testing.assert_array_equal(got, want)


def test_front_door_targets_the_next_class_by_default():
    m = mlp()
    x, y = batch(m)
    run = run_attack(m, x, y, "lbfgs", search_steps=2, backend="reference")
    want, _ = lbfgs_attack(m, x, y, (y + 1) % 4, search_steps=2)
    np.testing.assert_array_equal(run.x_adv, want)
    assert run.params["targeted"] is True
