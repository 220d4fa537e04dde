"""MI-FGSM (Dong et al. 2018): the reference against its definition, and the engine on every
backend against the reference (bit for bit in float64, as the sign steps of PGD)."""

import numpy as np
import pytest

from advkern import engine, kernels
from advkern.attacks import run_attack
from advkern.errors import AdvkernError
from advkern.nets import Conv2D, Dense, Flatten, ReLU, Sequential, Tanh
from advkern.reference import network
from advkern.reference.gradient_attacks import mi_fgsm, momentum_update, pgd

from _helpers import randomize

SHAPE = (1, 6, 6)


def mlp(dtype=np.float64):
    return randomize(Sequential([Flatten(), Dense(9), ReLU(), Dense(4)], SHAPE, seed=1,
                                dtype=dtype), 3)


def cnn(dtype=np.float64):
    return randomize(Sequential([Conv2D(3, 3, 1, "same"), Tanh(), Flatten(), Dense(4)], SHAPE,
                                seed=2, dtype=dtype), 4)


def batch(n=8, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, *SHAPE)).astype(dtype), rng.integers(0, 4, n)


def test_momentum_update_is_the_papers_and_guards_zero():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 5))
    g[1] = 0
    mom = rng.standard_normal((3, 5))
    got = momentum_update(g, mom, 0.7)
    want = 0.7 * mom + g / np.maximum(np.abs(g).sum(1, keepdims=True), 1e-300)
    want[1] = 0.7 * mom[1]
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
    assert np.isfinite(got).all()


def test_the_loop_by_hand():
    m, (x, y) = mlp(), batch()
    eps, steps, mu = 0.2, 4, 0.8
    alpha = eps / steps
    g_acc, xa = np.zeros((len(x), x[0].size)), x.copy()
    for _ in range(steps):
        _, g = network.loss_and_input_grad(m, xa, y)
        g = g.reshape(len(x), -1)
        g_acc = mu * g_acc + g / np.abs(g).sum(1, keepdims=True)
        xa = np.clip(np.clip(xa + alpha * np.sign(g_acc).reshape(x.shape), x - eps, x + eps),
                     0, 1)
    np.testing.assert_array_equal(mi_fgsm(m, x, y, eps, steps=steps, decay=mu), xa)


def test_decay_zero_is_bim_and_the_defaults_are_the_papers():
    m, (x, y) = mlp(), batch()
    # sign(g / ||g||_1) = sign(g): without momentum it is BIM / L-inf PGD
    np.testing.assert_array_equal(mi_fgsm(m, x, y, 0.1, 0.02, 5, decay=0.0),
                                  pgd(m, x, y, 0.1, 0.02, 5))
    np.testing.assert_array_equal(mi_fgsm(m, x, y, 0.1),
                                  mi_fgsm(m, x, y, 0.1, 0.01, 10, decay=1.0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ball_box_dtype_strength_and_inputs_untouched(dtype):
    m, (x, y) = mlp(dtype), batch(dtype=dtype)
    x0, y0 = x.copy(), y.copy()
    xa = mi_fgsm(m, x, y, 0.3)
    assert xa.dtype == dtype and xa.shape == x.shape
    assert np.abs(xa.astype(np.float64) - x).max() <= 0.3 + 1e-6 and 0 <= xa.min() <= xa.max() <= 1
    assert m.accuracy(xa, y) < m.accuracy(x, y)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)


def test_targeted_moves_toward_the_target_and_batch_equals_images():
    m, (x, y) = mlp(), batch()
    t = (y + 1) % 4
    xa = mi_fgsm(m, x, y, 0.5, steps=20, targeted=True, target=t)
    loss = lambda z: network.loss_and_input_grad(m, z, t)[0]  # noqa: E731
    assert (loss(xa) < loss(x)).all()
    for i in (0, 5):
        np.testing.assert_array_equal(
            mi_fgsm(m, x[i:i + 1], y[i:i + 1], 0.5, steps=20, targeted=True, target=t[i:i + 1]),
            xa[i:i + 1])
    with pytest.raises(AdvkernError, match="decay"):
        mi_fgsm(m, x, y, 0.1, decay=-1.0)


@pytest.mark.parametrize("backend", kernels.available())
@pytest.mark.parametrize("arch", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("kw", [{}, {"decay": 0.5, "steps": 4, "alpha": 0.03},
                                {"targeted": True, "loss": "cw"}])
def test_engine_equals_the_reference_bit_for_bit_in_float64(backend, arch, kw):
    m, (x, y) = arch(), batch(6)
    kw = dict(kw)
    if kw.get("targeted"):
        kw["target"] = (y + 1) % 4
    want = mi_fgsm(m, x, y, 0.15, **kw)
    np.testing.assert_array_equal(engine.mi_fgsm(m, x, y, 0.15, backend=backend, **kw), want)


def test_front_door_and_cli_name():
    m, (x, y) = mlp(), batch()
    run = run_attack(m, x, y, "mifgsm", eps=0.2, steps=5, decay=0.9, backend="reference")
    np.testing.assert_array_equal(run.x_adv, mi_fgsm(m, x, y, 0.2, steps=5, decay=0.9))
    assert run.params["decay"] == 0.9 and run.params["attack"] == "mifgsm"
