"""Tests for the reference JSMA (advkern.reference.jsma): the two search primitives against
brute force, the attack's contract (targets, budget, box, batch = per image) and its errors."""

import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from advkern.errors import AdvkernError, ShapeError
from advkern.nets import Dense, Flatten, ReLU, Sequential
from advkern.reference import jsma as J
from advkern.reference.losses import softmax
from advkern.reference.network import forward, jacobian


# -- brute force ------------------------------------------------------------------------------

def brute_pair(a, b, dom, theta):
    """O(n^2) loop over p < q in order; a strictly better score replaces the best (tie rule)."""
    best, best_score = None, None
    n = len(a)
    for p in range(n):
        for q in range(p + 1, n):
            if not (dom[p] and dom[q]):
                continue
            alpha, beta = a[p] + a[q], b[p] + b[q]
            ok = (alpha > 0 and beta < 0) if theta > 0 else (alpha < 0 and beta > 0)
            if ok and (best is None or -alpha * beta > best_score):
                best, best_score = (p, q), -alpha * beta
    return best


def brute_feature(a, b, dom, theta):
    """The paper's S (0 outside the admissible set) maximised over admissible features."""
    best, best_score = None, None
    for i in range(len(a)):
        if not dom[i]:
            continue
        if theta > 0:
            s = 0.0 if (a[i] < 0 or b[i] > 0) else a[i] * abs(b[i])
        else:
            s = 0.0 if (a[i] > 0 or b[i] < 0) else abs(a[i]) * b[i]
        admissible = (a[i] > 0 and b[i] < 0) if theta > 0 else (a[i] < 0 and b[i] > 0)
        if admissible and (best is None or s > best_score):
            best, best_score = i, s
    return best


@st.composite
def search_cases(draw):
    nb = draw(st.integers(1, 3))
    n = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    if draw(st.booleans()):     # small integers: many exact ties, so the tie rule is exercised
        elem = st.integers(-3, 3).map(float)
    else:
        elem = st.floats(-10, 10, allow_nan=False, allow_infinity=False)
    a = np.array(draw(st.lists(elem, min_size=nb * n, max_size=nb * n)), dtype).reshape(nb, n)
    b = np.array(draw(st.lists(elem, min_size=nb * n, max_size=nb * n)), dtype).reshape(nb, n)
    dom = np.array(draw(st.lists(st.booleans(), min_size=nb * n, max_size=nb * n)),
                   bool).reshape(nb, n)
    if draw(st.booleans()):
        dom[:] = True
    theta = draw(st.sampled_from([1.0, 0.25, -1.0, -3.0]))
    return a, b, dom, theta


@given(search_cases())
def test_best_pair_matches_brute_force_for_every_block(case):
    a, b, dom, theta = case
    a0, b0, d0 = a.copy(), b.copy(), dom.copy()
    n = a.shape[1]
    results = [J.best_pair(a, b, dom, theta, block=blk) for blk in (1, 3, n, n + 5)]
    for p, q, found in results[1:]:
        np.testing.assert_array_equal(p, results[0][0])
        np.testing.assert_array_equal(q, results[0][1])
        np.testing.assert_array_equal(found, results[0][2])
    p, q, found = results[0]
    assert p.dtype == q.dtype == np.int64 and found.dtype == bool
    for img in range(len(a)):
        want = brute_pair(a[img], b[img], dom[img], theta)
        got = (int(p[img]), int(q[img])) if found[img] else None
        assert got == want
        if not found[img]:
            assert p[img] == q[img] == -1
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)
    np.testing.assert_array_equal(dom, d0)


@given(search_cases())
def test_best_feature_matches_brute_force(case):
    a, b, dom, theta = case
    i, found = J.best_feature(a, b, dom, theta)
    assert i.dtype == np.int64 and found.dtype == bool
    for img in range(len(a)):
        want = brute_feature(a[img], b[img], dom[img], theta)
        assert (int(i[img]) if found[img] else None) == want
        if not found[img]:
            assert i[img] == -1


def test_best_pair_tie_rule_and_not_found():
    ones = np.ones((1, 5))
    full = np.ones((1, 5), bool)
    # Every pair ties: the smallest p, then the smallest q, in the domain.
    assert [int(v[0]) for v in J.best_pair(ones, -ones, full, 1.0)] == [0, 1, 1]
    dom = np.array([[False, True, False, True, True]])
    for blk in (1, 2, 3, 7):
        assert [int(v[0]) for v in J.best_pair(ones, -ones, dom, 1.0, block=blk)] == [1, 3, 1]
        assert [int(v[0]) for v in J.best_pair(-ones, ones, dom, -2.0, block=blk)] == [1, 3, 1]
    # Wrong signs for the direction, or fewer than two domain features: not found.
    for args in [(ones, -ones, full, -1.0), (ones, ones, full, 1.0),
                 (ones, -ones, np.eye(1, 5, dtype=bool), 1.0)]:
        p, q, found = J.best_pair(*args)
        assert not found[0] and p[0] == q[0] == -1
    # Zero sums are not admissible (strict inequalities).
    p, q, found = J.best_pair(np.array([[1.0, -1.0]]), np.array([[-1.0, -1.0]]),
                              np.ones((1, 2), bool), 1.0)
    assert not found[0]
    i, found = J.best_feature(np.array([[0.0, 2.0, 2.0]]), np.array([[-5.0, -1.0, -1.0]]),
                              np.ones((1, 3), bool), 1.0)
    assert found[0] and i[0] == 1


def test_search_argument_errors():
    a = np.zeros((1, 4))
    dom = np.ones((1, 4), bool)
    with pytest.raises(ShapeError):
        J.best_pair(a, np.zeros((1, 5)), dom, 1.0)
    with pytest.raises(AdvkernError, match="boolean"):
        J.best_pair(a, a, dom.astype(int), 1.0)
    with pytest.raises(AdvkernError, match="theta"):
        J.best_feature(a, a, dom, 0.0)
    with pytest.raises(AdvkernError, match="block"):
        J.best_pair(a, a, dom, 1.0, block=0)
    with pytest.raises(AdvkernError, match="NaN"):
        J.best_pair(np.full((1, 4), np.nan), a, dom, 1.0)


def test_best_pair_memory_is_streamed():
    """n = 10,000 features, full domain: an n x n float64 table would be 800 MB. The streamed
    search holds about 18 bytes per entry of a block x n table (64 x 10,000: ~11.5 MB), a
    bound that scales with block * n — for n = 3*224*224 = 150,528 and block = 64 it is
    ~170 MB against a 181 GB table; n is kept small here only because the search visits all
    n^2 / 2 pairs (about 0.3 s at n = 10,000)."""
    n, blk = 10_000, 64
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((1, n)), rng.standard_normal((1, n))
    dom = np.ones((1, n), bool)
    tracemalloc.start()
    try:
        p, q, found = J.best_pair(a, b, dom, 1.0, block=blk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found[0] and p[0] < q[0]
    assert peak < 32e6, f"peak {peak / 1e6:.1f} MB"
    # A partial brute-force check: the winner beats every pair with q < 200.
    score = -(a[0, p[0]] + a[0, q[0]]) * (b[0, p[0]] + b[0, q[0]])
    alpha, beta = a[0, :, None] + a[0, None, :200], b[0, :, None] + b[0, None, :200]
    ok = (alpha > 0) & (beta < 0) & ~np.eye(n, 200, dtype=bool)
    assert score >= np.max(np.where(ok, -alpha * beta, -np.inf))


def test_max_iterations():
    assert J.max_iterations(784, 0.1, "pair") == 39
    assert J.max_iterations(784, 0.1, "single") == 78
    assert J.max_iterations(100, 0.29, "single") == 29      # 100 * 0.29 = 28.999999999999996
    assert J.max_iterations(9, 1.0, "pair") == 4
    assert J.max_iterations(1, 1.0, "pair") == 0


# -- the attack -------------------------------------------------------------------------------

def mlp(seed=0, dtype=np.float64):
    return Sequential([Flatten(), Dense(6), ReLU(), Dense(4)], (1, 3, 3), seed=seed, dtype=dtype)


def logreg(k=4, seed=0):
    return Sequential([Flatten(), Dense(1 if k == 2 else k)], (1, 4, 4), seed=seed,
                      dtype=np.float64)


def images(n, shape=(1, 3, 3), seed=0, dtype=np.float64):
    return np.random.default_rng(seed).uniform(0, 1, (n, *shape)).astype(dtype)


def brute_terms(model, x, t, use_logits):
    """a, b for one image from the Jacobian, in matrix form: dF = (diag(s) - s s^T) dZ."""
    jz = jacobian(model, x[None])[0]
    if not use_logits:
        s = softmax(forward(model, x[None])[0])[0]
        if jz.shape[0] == 1:
            jz = np.concatenate([np.zeros_like(jz), jz])
        jz = (np.diag(s) - np.outer(s, s)) @ jz
    a = jz[t]
    b = sum(jz[j] for j in range(len(jz)) if j != t)
    return a, b


@pytest.mark.parametrize("use_logits", [True, False])
@pytest.mark.parametrize("theta", [1.0, -1.0])
@pytest.mark.parametrize("variant", ["pair", "single"])
def test_first_iteration_matches_brute_force(variant, theta, use_logits):
    model = mlp(seed=3)
    x = images(6, seed=4)
    y = model.predict(x)
    t = (y + 1) % 4
    n = 9
    gamma = (2 if variant == "pair" else 1) / n        # max_iter = 1
    x_adv, info = J.jsma(model, x, y, t, theta=theta, gamma=gamma, variant=variant,
                         use_logits=use_logits)
    assert np.all(info["iterations"] <= 1)
    for i in range(len(x)):
        a, b = brute_terms(model, x[i], t[i], use_logits)
        lo_hi = x[i].ravel() < 1 if theta > 0 else x[i].ravel() > 0
        want = (brute_pair(a, b, lo_hi, theta) if variant == "pair"
                else brute_feature(a, b, lo_hi, theta))
        changed = tuple(np.flatnonzero(x_adv[i].ravel() != x[i].ravel()))
        if want is None:
            assert changed == () and info["iterations"][i] == 0
        else:
            assert changed == (want if variant == "pair" else (want,))
            assert info["iterations"][i] == 1


def _same(r1, r2):
    np.testing.assert_array_equal(r1[0], r2[0])
    for k in ("success", "l0", "iterations"):
        np.testing.assert_array_equal(r1[1][k], r2[1][k])


@pytest.mark.parametrize("variant,theta,use_logits",
                         [("pair", 1.0, True), ("pair", -0.4, False), ("single", 0.5, True),
                          ("single", -1.0, False)])
def test_batch_equals_per_sample(variant, theta, use_logits):
    model = mlp(seed=1)
    x = images(7, seed=2)
    y = model.predict(x)
    t = (y + 2) % 4
    kw = dict(theta=theta, gamma=1.0, variant=variant, use_logits=use_logits, block=2)
    xb, ib = J.jsma(model, x, y, t, **kw)
    for i in range(len(x)):
        xi, ii = J.jsma(model, x[i:i + 1], y[i:i + 1], t[i:i + 1], **kw)
        _same((xb[i:i + 1], {k: v[i:i + 1] for k, v in ib.items()}), (xi, ii))


@given(seed=st.integers(0, 10_000), theta=st.sampled_from([1.0, 0.3, -0.5, -1.0, 2.0]),
       gamma=st.sampled_from([0.25, 0.5, 1.0]), variant=st.sampled_from(["pair", "single"]),
       use_logits=st.booleans(), dtype=st.sampled_from([np.float32, np.float64]),
       box=st.sampled_from([(0.0, 1.0), (-0.5, 0.75)]))
def test_attack_contract(seed, theta, gamma, variant, use_logits, dtype, box):
    lo, hi = box
    model = mlp(seed=seed % 7, dtype=np.float32)
    rng = np.random.default_rng(seed)
    x = rng.uniform(lo, hi, (4, 1, 3, 3)).astype(dtype)
    x[0, 0, 0, :2] = hi if theta > 0 else lo            # saturated features start outside Gamma
    y = rng.integers(0, 4, 4)
    t = (y + 1 + rng.integers(0, 3, 4)) % 4
    x0 = x.copy()
    x_adv, info = J.jsma(model, x, y, t, theta=theta, gamma=gamma, variant=variant,
                         use_logits=use_logits, clip=box)
    np.testing.assert_array_equal(x, x0)                 # input untouched
    assert x_adv.dtype == x.dtype and x_adv.shape == x.shape and x_adv is not x
    assert np.all((x_adv >= lo) & (x_adv <= hi))
    d = (x_adv - x).reshape(4, -1)
    assert np.all(d >= 0) if theta > 0 else np.all(d <= 0)
    np.testing.assert_array_equal(info["l0"], np.count_nonzero(d, axis=1))
    max_iter = J.max_iterations(9, gamma, variant)
    assert np.all(info["iterations"] <= max_iter)
    per_iter = 2 if variant == "pair" else 1
    assert np.all(info["l0"] <= per_iter * info["iterations"])
    assert np.all(info["l0"] <= np.floor(9 * gamma))
    np.testing.assert_array_equal(x_adv[0, 0, 0, :2], x[0, 0, 0, :2])
    pred = model.predict(x_adv)
    np.testing.assert_array_equal(info["success"], pred == t)
    # Each modification moves a feature by theta or up to the box edge.
    moved = np.abs(d[d != 0])
    edge = np.abs((hi if theta > 0 else lo) - x.reshape(4, -1)[d != 0])
    assert np.all((np.abs(moved - abs(theta) * np.round(moved / abs(theta))) < 1e-5)
                  | (np.abs(moved - edge) < 1e-6))
    for k in ("success", "l0", "iterations"):
        assert info[k].shape == (4,)


def test_attack_succeeds_and_stops_at_target():
    model = mlp(seed=2)
    x = images(20, seed=5)
    y = model.predict(x)
    x_adv, info = J.jsma(model, x, y, "next", gamma=1.0)
    assert info["success"].sum() >= 5
    assert np.any(info["success"] & (info["iterations"] >= 2))
    np.testing.assert_array_equal(model.predict(x_adv)[info["success"]],
                                  ((y + 1) % 4)[info["success"]])
    # Stopping at success: undoing the last pair's image reproduces the run one step short.
    for i in np.flatnonzero(info["success"] & (info["iterations"] >= 2))[:3]:
        n_it = int(info["iterations"][i])
        gamma = 2 * (n_it - 1) / 9
        _, short = J.jsma(model, x[i:i + 1], y[i:i + 1], "next", gamma=gamma)
        assert short["iterations"][0] == n_it - 1 and not short["success"][0]


def test_one_batched_jacobian_per_iteration(monkeypatch):
    calls = []
    real = J.jacobian

    def counting(model, x):
        calls.append(len(x))
        return real(model, x)

    monkeypatch.setattr(J, "jacobian", counting)
    model = mlp(seed=0)
    x = images(8, seed=5)
    y = model.predict(x)
    _, info = J.jsma(model, x, y, "next", gamma=1.0)
    assert calls[0] == 8 and calls == sorted(calls, reverse=True)
    assert len(calls) <= J.max_iterations(9, 1.0) and len(calls) >= info["iterations"].max()


def test_target_forms_and_already_at_target():
    model = mlp(seed=2)
    x = images(5, seed=1)
    y = model.predict(x)
    r1 = J.jsma(model, x, y, "next")
    r2 = J.jsma(model, x, y, (y + 1) % 4)
    _same(r1, r2)
    r3 = J.jsma(model, x[:1], y[:1], int((y[0] + 1) % 4))
    _same(r3, J.jsma(model, x[:1], y[:1], np.array([(y[0] + 1) % 4])))
    # The model already predicts the target (y is not the prediction): nothing to do.
    pred = model.predict(x)
    x_adv, info = J.jsma(model, x, (pred + 1) % 4, pred)
    np.testing.assert_array_equal(x_adv, x)
    assert info["success"].all() and not info["iterations"].any() and not info["l0"].any()


def test_saturated_image_fails_without_moving():
    model = mlp(seed=2)
    x = np.ones((2, 1, 3, 3))
    y = model.predict(x)
    x_adv, info = J.jsma(model, x, y, "next", theta=1.0)
    np.testing.assert_array_equal(x_adv, x)
    assert not info["success"].any() and not info["iterations"].any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtypes_and_empty_batch(dtype):
    model = logreg()
    x = images(3, shape=(1, 4, 4), seed=0, dtype=dtype)
    y = model.predict(x)
    x_adv, info = J.jsma(model, x, y, "next", gamma=0.5, variant="single")
    assert x_adv.dtype == dtype
    x_adv, info = J.jsma(model, x[:0], y[:0], "next")
    assert x_adv.shape == (0, 1, 4, 4) and x_adv.dtype == dtype
    assert all(v.shape == (0,) for v in info.values())


def test_binary_model():
    model = logreg(k=2, seed=1)
    x = images(6, shape=(1, 4, 4), seed=2)
    y = model.predict(x)
    x_adv, info = J.jsma(model, x, y, "next", gamma=1.0, use_logits=False)
    np.testing.assert_array_equal(info["success"], model.predict(x_adv) == 1 - y)
    assert info["success"].any()
    with pytest.raises(AdvkernError, match="binary"):
        J.jsma(model, x, y, "next", use_logits=True)


def test_errors():
    model = mlp()
    x = images(3)
    y = np.array([0, 1, 2])
    cases = [
        (dict(target=y), "equals the true label"),
        (dict(target=4), "out of range"),
        (dict(target=-1), "out of range"),
        (dict(target=None), "target"),
        (dict(target="prev"), "'next'"),
        (dict(target="next", theta=0.0), "theta"),
        (dict(target="next", theta=float("nan")), "theta"),
        (dict(target="next", theta=float("inf")), "theta"),
        (dict(target="next", theta=True), "theta"),
        (dict(target="next", gamma=0.0), "gamma"),
        (dict(target="next", gamma=1.5), "gamma"),
        (dict(target="next", gamma=-0.1), "gamma"),
        (dict(target="next", variant="triple"), "variant"),
        (dict(target="next", block=0), "block"),
        (dict(target="next", use_logits="yes"), "use_logits"),
    ]
    for kw, msg in cases:
        with pytest.raises(AdvkernError, match=msg):
            J.jsma(model, x, y, **kw)
    bad = x.copy()
    bad[1, 0, 1, 1] = np.nan
    with pytest.raises(AdvkernError, match="NaN"):
        J.jsma(model, bad, y, "next")
    with pytest.raises(AdvkernError, match="outside"):
        J.jsma(model, x + 0.5, y, "next")
    with pytest.raises(ShapeError):
        J.jsma(model, x[:, :, :2], y, "next")
    with pytest.raises(AdvkernError, match="float32 or float64"):
        J.jsma(model, x.astype(int), y, "next")
