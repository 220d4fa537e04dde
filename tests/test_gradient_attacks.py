"""Tests for advkern.reference.gradient_attacks: FGSM, FGM-L2, PGD (inf/2/1), BIM."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from advkern._validate import per_sample_rngs
from advkern.errors import AdvkernError, ShapeError
from advkern.nets import Dense, Flatten, ReLU, Sequential
from advkern.reference import network
from advkern.reference.gradient_attacks import (bim, bim_defaults, fgm_l2, fgsm, pgd,
                                                random_init)
from advkern.reference.losses import cross_entropy, margin, softmax
from advkern.reference.projections import project, steepest_step

NORMS = ["inf", 2, 1]
# eps and alpha that make each norm's attack bite on (1, 5, 5) inputs in [0, 1]
SETTINGS = {"inf": (0.1, 0.02), 2: (0.5, 0.1), 1: (2.0, 0.5)}


def mlp(dtype=np.float64, seed=6):
    return Sequential([Flatten(), Dense(7), ReLU(), Dense(4)], (1, 5, 5), seed=seed, dtype=dtype)


def logreg(k, dtype=np.float64, seed=3):
    return Sequential([Flatten(), Dense(1 if k == 2 else k)], (1, 5, 5), seed=seed, dtype=dtype)


def batch(model, n=12, dtype=np.float64, seed=0, lo=0.0, hi=1.0):
    """Images in the box, labelled with the model's own predictions (clean accuracy 1)."""
    x = np.random.default_rng(seed).uniform(lo, hi, size=(n, 1, 5, 5)).astype(dtype)
    return x, model.predict(x)


def ce(model, x, y):
    return cross_entropy(network.forward(model, x)[0], y)[0]


def norm_of(d, norm):
    f = np.asarray(d, dtype=np.float64).reshape(len(d), -1)
    if norm == "inf":
        return np.abs(f).max(axis=1)
    return np.sqrt((f * f).sum(axis=1)) if norm == 2 else np.abs(f).sum(axis=1)


def tol(dtype):
    return 1e-5 if dtype == np.float32 else 1e-12


# -- eps == 0, ball, box, dtype, no mutation --------------------------------------------


ATTACKS = {
    "fgsm": lambda m, x, y, eps: fgsm(m, x, y, eps),
    "fgm_l2": lambda m, x, y, eps: fgm_l2(m, x, y, eps),
    "bim": lambda m, x, y, eps: bim(m, x, y, eps),
    **{f"pgd_{n}": (lambda n: lambda m, x, y, eps: pgd(
        m, x, y, eps, SETTINGS[n][1], 3, norm=n, random_start=True, restarts=2))(n)
       for n in NORMS},
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eps_zero_returns_copy(name, dtype):
    m = mlp()
    x, y = batch(m, dtype=dtype)
    out = ATTACKS[name](m, x, y, 0.0)
    assert out is not x and out.dtype == dtype
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(ATTACKS[name](m, x, y, np.zeros(len(x))), x)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_empty_batch(name):
    m = mlp()
    x = np.zeros((0, 1, 5, 5))
    out = ATTACKS[name](m, x, np.zeros(0, dtype=np.int64), 0.1)
    assert out.shape == x.shape


@given(norm=st.sampled_from(NORMS), dtype=st.sampled_from([np.float32, np.float64]),
       eps=st.floats(0.0, 1.0), rs=st.booleans(), loss=st.sampled_from(["ce", "cw"]),
       targeted=st.booleans(), early=st.booleans(), box=st.sampled_from([(0.0, 1.0), (-1.0, 1.0)]),
       seed=st.integers(0, 1000))
def test_pgd_inside_ball_and_box(norm, dtype, eps, rs, loss, targeted, early, box, seed):
    m = mlp(dtype=np.float32)
    x, y = batch(m, n=6, dtype=dtype, seed=seed, lo=box[0], hi=box[1])
    x[:, 0, 0, :] = box[0]  # pixels on the box bound
    x0, y0 = x.copy(), y.copy()
    alpha = SETTINGS[norm][1] * 2
    target = (y + 1) % 4 if targeted else None
    out = pgd(m, x, y, eps * SETTINGS[norm][0], alpha, 3, norm=norm, loss=loss,
              random_start=rs, restarts=2, targeted=targeted, target=target, early_stop=early,
              clip=box, seed=seed)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.min() >= box[0] and out.max() <= box[1]
    e = eps * SETTINGS[norm][0]
    assert np.all(norm_of(out - x, norm) <= e * (1 + tol(dtype)) + tol(dtype))
    if norm == "inf":  # exact in x's dtype: the float bounds x +- eps are never crossed
        e32 = dtype(e)
        assert np.all(out >= x - e32) and np.all(out <= x + e32)


@pytest.mark.parametrize("attack", [fgsm, fgm_l2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_attacks_ball_box_dtype(attack, dtype):
    m = mlp(dtype=np.float32)
    x, y = batch(m, dtype=dtype)
    x0 = x.copy()
    out = attack(m, x, y, 0.3)
    np.testing.assert_array_equal(x, x0)
    assert out.dtype == dtype and out.min() >= 0 and out.max() <= 1
    norm = "inf" if attack is fgsm else 2
    assert np.all(norm_of(out - x, norm) <= 0.3 * (1 + tol(dtype)))
    assert np.mean(m.predict(out) == y) < 1


# -- closed forms on linear models ------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fgsm_binary_logreg_closed_form(dtype):
    m = logreg(2, dtype=dtype)
    x, _ = batch(m, n=10, dtype=dtype)
    y = np.array([0, 1] * 5)
    w = m.params[1]["w"][:, 0].reshape(1, 1, 5, 5)
    # J = log(1 + exp(-(2y - 1) z)), z = w.x + b  =>  sign(dJ/dx) = -(2y - 1) sign(w).
    step = (dtype(0.1) * -(2 * y - 1)[:, None, None, None] * np.sign(w)).astype(dtype)
    want = np.clip(x + step, 0, 1)
    assert want.dtype == dtype
    np.testing.assert_array_equal(fgsm(m, x, y, 0.1), want)
    # Targeting the other class descends its loss: the same step for a binary model.
    np.testing.assert_array_equal(fgsm(m, x, y, 0.1, targeted=True, target=1 - y), want)


def test_fgsm_fgm_multiclass_logreg_closed_form():
    m = logreg(4)
    x, y = batch(m, n=8)
    y = (y + np.arange(8)) % 4
    w, b = m.params[1]["w"], m.params[1]["b"]
    xf = x.reshape(8, -1)
    p = softmax(xf @ w + b)
    onehot = np.eye(4)[y]
    g = ((p - onehot) @ w.T).reshape(x.shape)  # dJ/dx = W (softmax - onehot)
    eps = np.linspace(0.02, 0.3, 8)
    e = eps[:, None, None, None]
    np.testing.assert_array_equal(fgsm(m, x, y, eps), np.clip(x + e * np.sign(g), 0, 1))
    gn = g / np.sqrt((g ** 2).sum(axis=(1, 2, 3), keepdims=True))
    np.testing.assert_allclose(fgm_l2(m, x, y, eps), np.clip(x + e * gn, 0, 1), atol=1e-14)
    t = (y + 1) % 4
    gt = ((p - np.eye(4)[t]) @ w.T).reshape(x.shape)
    np.testing.assert_array_equal(fgsm(m, x, y, eps, targeted=True, target=t),
                                  np.clip(x - e * np.sign(gt), 0, 1))
    # C&W margin max_{j != y} z_j - z_y: gradient w_j - w_y.
    z = xf @ w + b
    zo = z.copy()
    zo[np.arange(8), y] = -np.inf
    j = zo.argmax(axis=1)
    gc = (w[:, j] - w[:, y]).T.reshape(x.shape)
    np.testing.assert_array_equal(fgsm(m, x, y, eps, loss="cw"), np.clip(x + e * np.sign(gc), 0, 1))


def test_fgm_l2_zero_gradient_is_finite():
    # A dense layer with zero weights has a zero input gradient: the step must be 0, not NaN.
    m = logreg(4)
    m.params[1]["w"][:] = 0
    x, y = batch(m, n=3)
    out = fgm_l2(m, x, y, 0.5)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(pgd(m, x, y, 0.5, 0.1, 3, norm=2), x)
    np.testing.assert_array_equal(pgd(m, x, y, 0.5, 0.1, 3, norm=1), x)


# -- batch == per sample, seeds ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scalar_eps_equals_per_sample_eps(dtype):
    m = mlp()
    x, y = batch(m, dtype=dtype)
    for attack in (fgsm, fgm_l2):
        np.testing.assert_array_equal(attack(m, x, y, 0.2), attack(m, x, y, np.full(12, 0.2)))
    for norm in NORMS:
        eps, alpha = SETTINGS[norm]
        np.testing.assert_array_equal(
            pgd(m, x, y, eps, alpha, 4, norm=norm, random_start=True),
            pgd(m, x, y, [eps] * 12, alpha, 4, norm=norm, random_start=True))


@pytest.mark.parametrize("attack", [fgsm, fgm_l2])
def test_fast_attacks_batch_equals_per_sample(attack):
    m = mlp()
    x, y = batch(m)
    eps = np.linspace(0.0, 0.4, 12)
    out = attack(m, x, y, eps)
    for i in range(12):
        # BLAS may round a batch's matmul differently from one row's (1 ulp), hence allclose.
        np.testing.assert_allclose(out[i:i + 1], attack(m, x[i:i + 1], y[i:i + 1], eps[i]),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("targeted", [False, True])
def test_pgd_batch_equals_per_sample(norm, targeted):
    m = mlp()
    x, y = batch(m)
    eps, alpha = SETTINGS[norm]
    eps = eps * np.linspace(0.3, 1.0, 12)
    t = (y + 1) % 4 if targeted else None
    seeds = np.arange(100, 112)
    kw = dict(norm=norm, random_start=True, restarts=3, early_stop=True, targeted=targeted)
    out = pgd(m, x, y, eps, alpha, 6, target=t, seed=seeds, **kw)
    for i in range(12):
        one = pgd(m, x[i:i + 1], y[i:i + 1], eps[i], alpha, 6,
                  target=None if t is None else t[i:i + 1], seed=[seeds[i]], **kw)
        np.testing.assert_allclose(out[i:i + 1], one, rtol=0, atol=1e-10)


@pytest.mark.parametrize("norm", NORMS)
def test_int_seed_uses_default_rng_seed_i(norm):
    """Image i of pgd(seed=s) is PGD from default_rng([s, i])'s random start."""
    m = mlp()
    x, y = batch(m, n=5)
    eps, alpha = SETTINGS[norm]
    out = pgd(m, x, y, eps, alpha, 3, norm=norm, random_start=True, seed=7)
    for i in range(5):
        xi, yi = x[i:i + 1], y[i:i + 1]
        xa = random_init(xi, eps, norm, [np.random.default_rng([7, i])])
        for _ in range(3):
            _, g = network.loss_and_input_grad(m, xa, yi)
            xa = project(xa + steepest_step(g, alpha, norm, x=xa, clip=(0, 1)), xi, eps, norm)
        np.testing.assert_allclose(out[i:i + 1], xa, rtol=0, atol=1e-12)


@pytest.mark.parametrize("norm", NORMS)
def test_seed_reproducible_and_random_start_differs(norm):
    m = mlp()
    x, y = batch(m)
    eps, alpha = SETTINGS[norm]
    a = pgd(m, x, y, eps, alpha, 2, norm=norm, random_start=True, seed=1)
    again = pgd(m, x, y, eps, alpha, 2, norm=norm, random_start=True, seed=1)
    np.testing.assert_array_equal(a, again)
    b = pgd(m, x, y, eps, alpha, 2, norm=norm, random_start=True, seed=2)
    assert np.all(np.any(a != b, axis=(1, 2, 3)))
    # Without random start the seed does not matter.
    np.testing.assert_array_equal(pgd(m, x, y, eps, alpha, 2, norm=norm, seed=1),
                                  pgd(m, x, y, eps, alpha, 2, norm=norm, seed=2))


@pytest.mark.parametrize("norm", NORMS)
def test_random_init_uniform_in_ball(norm):
    """Random starts lie in the ball, spread out to its boundary and are centred."""
    n = 400
    x = np.full((n, 1, 2, 2), 0.5)
    eps = {"inf": 0.3, 2: 0.4, 1: 0.45}[norm]
    u = random_init(x, eps, norm, per_sample_rngs(3, n)) - x
    r = norm_of(u, norm)
    assert np.all(r <= eps * (1 + 1e-12))
    # For a uniform point of a D-ball (any norm), P(||u|| <= s eps) = s^D with D = 4.
    assert abs(np.mean(r <= 0.8 * eps) - 0.8 ** 4) < 0.07
    assert np.all(np.abs(u.reshape(n, -1).mean(axis=0)) < 0.05)


# -- what the attacks achieve ----------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
def test_targeted_pgd_reduces_target_loss(norm):
    m = mlp()
    x, y = batch(m)
    t = (y + 1) % 4
    eps, alpha = SETTINGS[norm]
    out = pgd(m, x, y, eps, alpha / 2, 10, norm=norm, targeted=True, target=t)
    assert np.all(ce(m, out, t) < ce(m, x, t))
    # ... and the untargeted attack raises the true-label loss.
    out = pgd(m, x, y, eps, alpha / 2, 10, norm=norm)
    assert np.all(ce(m, out, y) > ce(m, x, y))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("targeted", [False, True])
def test_early_stop_freezes_at_first_success(norm, targeted):
    m = mlp()
    x, y = batch(m, n=16)
    y[::4] = (y[::4] + 1) % 4  # some images misclassified from the start
    t = (y + 2) % 4 if targeted else None
    eps, alpha = SETTINGS[norm]
    steps = 8
    kw = dict(norm=norm, random_start=True, targeted=targeted, target=t, seed=5)
    # iterate t of the plain attack = the attack run for t steps (t = 0: the random start)
    iterates = [random_init(x, eps, norm, per_sample_rngs(5, len(x)))]
    iterates += [pgd(m, x, y, eps, alpha, s, **kw) for s in range(1, steps + 1)]
    out = pgd(m, x, y, eps, alpha, steps, early_stop=True, **kw)
    preds = np.array([m.predict(it) for it in iterates])  # (steps + 1, N)
    succ = preds == t if targeted else preds != y
    first = []
    for i in range(len(x)):
        s = int(np.argmax(succ[:, i])) if succ[:, i].any() else steps
        first.append(s if succ[:, i].any() else -1)
        np.testing.assert_allclose(out[i], iterates[s][i], rtol=0, atol=1e-12)
    # the test is only meaningful if images succeed at different steps
    assert len(set(first)) >= 3, first


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_restarts_never_worse(norm, loss):
    m = mlp()
    x, y = batch(m)
    eps, alpha = SETTINGS[norm]
    eps, alpha = eps / 3, alpha / 3  # weak, so that some images survive
    kw = dict(norm=norm, loss=loss, random_start=True, seed=4)
    one = pgd(m, x, y, eps, alpha, 3, restarts=1, **kw)
    many = pgd(m, x, y, eps, alpha, 3, restarts=4, **kw)
    lossfn = cross_entropy if loss == "ce" else margin
    ok_one = m.predict(one) != y
    ok_many = m.predict(many) != y
    assert np.all(ok_many >= ok_one)
    j_one = lossfn(network.forward(m, one)[0], y)[0]
    j_many = lossfn(network.forward(m, many)[0], y)[0]
    fail = ~ok_many
    assert np.all(j_many[fail] >= j_one[fail])
    assert ok_many.sum() > ok_one.sum() or np.any(j_many > j_one)
    assert fail.any()


def test_pgd_breaks_clean_accuracy_and_cw_loss_works():
    m = mlp()
    x, y = batch(m, n=20)
    for norm in NORMS:
        eps, alpha = SETTINGS[norm]
        for loss in ("ce", "cw"):
            out = pgd(m, x, y, eps * 2, alpha, 20, norm=norm, loss=loss)
            assert m.accuracy(out, y) <= 0.2


def test_bim_defaults_and_equivalence():
    assert bim_defaults(8 / 255) == (1 / 255, 10)  # min(12, 10)
    assert bim_defaults(2 / 255)[1] == 3  # min(6, 2.5) -> 3 (halves up)
    assert bim_defaults(16 / 255)[1] == 20  # min(20, 20)
    assert bim_defaults(64 / 255)[1] == 68  # min(68, 80)
    assert bim_defaults(1e-4)[1] == 1
    a, s = bim_defaults(16 / 255, clip=(-1.0, 1.0))  # 8 pixels of a [-1, 1] box
    assert a == pytest.approx(2 / 255) and s == 10
    m = mlp()
    x, y = batch(m)
    np.testing.assert_array_equal(bim(m, x, y, 8 / 255),
                                  pgd(m, x, y, 8 / 255, 1 / 255, 10, norm="inf"))
    eps = np.linspace(1, 8, 12) / 255
    np.testing.assert_array_equal(bim(m, x, y, eps), pgd(m, x, y, eps, 1 / 255, 10))
    np.testing.assert_array_equal(bim(m, x, y, 0.1, alpha=0.01, steps=3, early_stop=True),
                                  pgd(m, x, y, 0.1, 0.01, 3, early_stop=True))
    with pytest.raises(AdvkernError, match="norm"):
        bim(m, x, y, 0.1, norm=2)


def test_mixed_model_and_input_dtypes():
    m32 = mlp(np.float32)
    x, y = batch(m32, dtype=np.float64)
    out = pgd(m32, x, y, 0.1, 0.02, 3)
    assert out.dtype == np.float64
    out = pgd(m32.astype(np.float64), x.astype(np.float32), y, 0.1, 0.02, 3)
    assert out.dtype == np.float32


# -- errors -----------------------------------------------------------------------------


def test_errors():
    m = mlp()
    x, y = batch(m, n=4)
    bad_x = x.copy()
    bad_x[0, 0, 0, 0] = np.nan
    with pytest.raises(AdvkernError, match="NaN"):
        fgsm(m, bad_x, y, 0.1)
    with pytest.raises(AdvkernError, match="box"):
        pgd(m, x + 0.5, y, 0.1, 0.01, 2)
    with pytest.raises(AdvkernError, match="box"):
        fgsm(m, x, y, 0.1, clip=(0.0, 0.5))
    for eps in (-0.1, np.nan, np.inf, [0.1, 0.1, -0.1, 0.1]):
        with pytest.raises(AdvkernError, match="eps"):
            fgsm(m, x, y, eps)
        with pytest.raises(AdvkernError, match="eps"):
            pgd(m, x, y, eps, 0.01, 2)
    with pytest.raises(ShapeError, match="eps"):
        pgd(m, x, y, np.ones(3) * 0.1, 0.01, 2)
    for clip in [(1.0, 0.0), (0.5, 0.5), (0.0, np.inf), (0.0,)]:
        with pytest.raises(AdvkernError, match="clip"):
            pgd(m, x, y, 0.1, 0.01, 2, clip=clip)
    for steps in (0, -1, 2.5, True):
        with pytest.raises(AdvkernError, match="steps"):
            pgd(m, x, y, 0.1, 0.01, steps)
    for alpha in (0.0, -0.1, np.nan):
        with pytest.raises(AdvkernError, match="alpha"):
            pgd(m, x, y, 0.1, alpha, 2)
    with pytest.raises(AdvkernError, match="restarts"):
        pgd(m, x, y, 0.1, 0.01, 2, restarts=0)
    with pytest.raises(AdvkernError, match="out of range"):
        fgsm(m, x, np.array([0, 1, 2, 4]), 0.1)
    with pytest.raises(AdvkernError, match="out of range"):
        pgd(m, x, np.array([0, 1, -1, 2]), 0.1, 0.01, 2)
    with pytest.raises(AdvkernError, match="target"):
        fgsm(m, x, y, 0.1, targeted=True)
    with pytest.raises(AdvkernError, match="target equals"):
        pgd(m, x, y, 0.1, 0.01, 2, targeted=True, target=y)
    with pytest.raises(AdvkernError, match="targeted=True"):
        pgd(m, x, y, 0.1, 0.01, 2, target=(y + 1) % 4)
    with pytest.raises(ShapeError):
        fgsm(m, x.reshape(4, 25), y, 0.1)
    with pytest.raises(ShapeError):
        pgd(m, x, y[:3], 0.1, 0.01, 2)
    with pytest.raises(AdvkernError, match="dtype"):
        fgsm(m, (x * 255).astype(np.uint8), y, 0.1)
    with pytest.raises(AdvkernError, match="norm"):
        pgd(m, x, y, 0.1, 0.01, 2, norm=3)
    with pytest.raises(AdvkernError, match="norm"):
        pgd(m, x, y, 0.1, 0.01, 2, norm="fro")
    with pytest.raises(AdvkernError, match="loss"):
        pgd(m, x, y, 0.1, 0.01, 2, loss="hinge")
    with pytest.raises(AdvkernError, match="loss"):
        fgsm(m, x, y, 0.1, loss="mse")
    with pytest.raises(AdvkernError, match="l1_sparsity"):
        pgd(m, x, y, 0.1, 0.01, 2, norm=1, l1_sparsity=1.5)
    with pytest.raises(AdvkernError, match="seed"):
        pgd(m, x, y, 0.1, 0.01, 2, random_start=True, seed=-1)
    with pytest.raises(AdvkernError, match="seed"):
        pgd(m, x, y, 0.1, 0.01, 2, random_start=True, seed=[1, 2])


# -- MNIST: accuracy falls as eps grows -------------------------------------------------


def test_mnist_fgsm_accuracy_drops_with_eps():
    datasets = pytest.importorskip("advkern.nets.datasets")
    xtr, ytr = datasets.load_mnist("train", dtype=np.float32)
    xte, yte = datasets.load_mnist("test", dtype=np.float32)
    xte, yte = xte[:300], yte[:300]
    m = Sequential([Flatten(), Dense(10)], (1, 28, 28), seed=0, dtype=np.float32)
    m.params[1]["w"][:] = 0
    rng = np.random.default_rng(0)
    for _ in range(3):  # plain minibatch SGD on the softmax regression
        for idx in np.array_split(rng.permutation(len(xtr)), len(xtr) // 50):
            _, grads = network.loss_and_param_grads(m, xtr[idx], ytr[idx])
            for k in ("w", "b"):
                m.params[1][k] -= 0.5 * grads[1][k]
    accs = [m.accuracy(fgsm(m, xte, yte, eps), yte) for eps in (0.0, 0.05, 0.1, 0.2)]
    assert accs[0] > 0.8, accs
    assert all(a > b for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] < 0.2, accs
