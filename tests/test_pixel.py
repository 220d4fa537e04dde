"""Tests for the reference one-/few-pixel attack (differential evolution)."""

import numpy as np
import pytest

from advkern.errors import AdvkernError, ShapeError
from advkern.nets import Dense, Flatten, ReLU, Sequential
from advkern.reference import pixel as px
from advkern.reference.losses import softmax
from advkern.reference.pixel import (apply_candidates, candidate_bounds, de_draws, de_select,
                                     de_step, generation_draws, init_population, pixel_attack,
                                     score_candidates, stack_draws)


def tiny_mlp(dtype=np.float64, seed=1, shape=(1, 4, 4)):
    return Sequential([Flatten(), Dense(5), ReLU(), Dense(3)], shape, seed=seed, dtype=dtype)


def linear(w, b, shape=(1, 4, 4)):
    """Flatten -> Dense with the given weights (D, K) and bias (K,)."""
    return Sequential([Flatten(), Dense(w.shape[1])], shape,
                      params=[{}, {"w": np.asarray(w, np.float64), "b": np.asarray(b, np.float64)}])


def needle_model(pixel=(2, 3)):
    """Class 1 iff x[0, 2, 3] > 0.5 (logit_1 = 10 x_p - 5, logit_0 = 0); no other pixel matters."""
    w = np.zeros((16, 2))
    w[pixel[0] * 4 + pixel[1], 1] = 10.0
    return linear(w, [0.0, -5.0])


def images(n, seed=0, dtype=np.float64, shape=(1, 4, 4)):
    return np.random.default_rng(seed).random((n, *shape)).astype(dtype)


# -- DE arithmetic with fixed draws ------------------------------------------------------------

POP = np.array([[[0.0, 0.0, 0.0],
                 [1.0, 2.0, 3.0],
                 [2.0, 2.0, 2.0],
                 [4.0, 0.0, 1.0]]])
R = {"r1": np.array([[1, 0, 3, 2]]), "r2": np.array([[2, 3, 0, 0]]),
     "r3": np.array([[3, 2, 1, 1]])}
WIDE = (np.full(3, -10.0), np.full(3, 10.0))
# mutant_i = pop[r1] + 0.5 (pop[r2] - pop[r3]), worked by hand:
#   0: [1,2,3] + .5 ([2,2,2] - [4,0,1]) = [0, 3, 3.5]
#   1: [0,0,0] + .5 ([4,0,1] - [2,2,2]) = [1, -1, -0.5]
#   2: [4,0,1] + .5 ([0,0,0] - [1,2,3]) = [3.5, -1, -0.5]
#   3: [2,2,2] + .5 ([0,0,0] - [1,2,3]) = [1.5, 1, 0.5]
MUTANT = np.array([[[0.0, 3.0, 3.5], [1.0, -1.0, -0.5], [3.5, -1.0, -0.5], [1.5, 1.0, 0.5]]])


def test_de_step_hand_computed_mutants():
    out = de_step(POP, R, 0.5, None, *WIDE)
    np.testing.assert_array_equal(out, MUTANT)


def test_de_step_clips_to_bounds():
    out = de_step(POP, R, 0.5, None, np.zeros(3), np.full(3, 3.0))
    expected = np.array([[[0.0, 3.0, 3.0], [1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [1.5, 1.0, 0.5]]])
    np.testing.assert_array_equal(out, expected)


def test_de_step_crossover_cr0_takes_only_forced_coordinate():
    draws = dict(R, cross=np.zeros((1, 4, 3)), forced=np.array([[2, 0, 1, 2]]))
    out = de_step(POP, draws, 0.5, 0.0, *WIDE)
    expected = np.array([[[0.0, 0.0, 3.5], [1.0, 2.0, 3.0], [2.0, -1.0, 2.0], [4.0, 0.0, 0.5]]])
    np.testing.assert_array_equal(out, expected)


def test_de_step_crossover_cr1_takes_whole_mutant():
    draws = dict(R, cross=np.full((1, 4, 3), 0.999999), forced=np.zeros((1, 4), np.int64))
    np.testing.assert_array_equal(de_step(POP, draws, 0.5, 1.0, *WIDE), MUTANT)


def test_de_step_binomial_crossover_mixes_by_uniforms():
    cross = np.array([[[0.1, 0.9, 0.9], [0.9, 0.9, 0.9], [0.4, 0.6, 0.2], [0.5, 0.49, 0.7]]])
    draws = dict(R, cross=cross, forced=np.array([[2, 1, 0, 0]]))
    out = de_step(POP, draws, 0.5, 0.5, *WIDE)
    # take mutant where u < 0.5 or j == forced
    expected = np.array([[[0.0, 0.0, 3.5], [1.0, -1.0, 3.0], [3.5, 2.0, -0.5], [1.5, 1.0, 1.0]]])
    np.testing.assert_array_equal(out, expected)


def test_de_step_batched_and_pure():
    pop = np.concatenate([POP, POP[:, ::-1]])
    draws = stack_draws([{k: v[0] for k, v in R.items()}] * 2)
    before = pop.copy()
    out = de_step(pop, draws, 0.5, None, *WIDE)
    np.testing.assert_array_equal(pop, before)
    np.testing.assert_array_equal(out[0], MUTANT[0])
    np.testing.assert_array_equal(out[1], de_step(pop[1:], R, 0.5, None, *WIDE)[0])
    assert de_step(POP.astype(np.float32), R, 0.5, None, *WIDE).dtype == np.float32


def test_de_select_keeps_better_or_equal_child():
    pop = np.arange(12.0).reshape(4, 3)
    trial = -pop
    fit = np.array([0.5, 0.2, 0.3, 0.1])
    tfit = np.array([0.4, 0.3, 0.3, 0.2])
    new_pop, new_fit = de_select(pop, fit, trial, tfit)
    np.testing.assert_array_equal(new_fit, [0.4, 0.2, 0.3, 0.1])
    np.testing.assert_array_equal(new_pop, np.stack([trial[0], pop[1], trial[2], pop[3]]))
    assert fit[0] == 0.5 and pop[0, 1] == 1.0


def test_de_draws_order_and_constraints():
    p, dim = 6, 4
    d = de_draws(np.random.default_rng(7), p, dim, CR=0.5)
    # the documented stream: r1, r2, r3 (skip method), then cross, then forced
    rng = np.random.default_rng(7)
    i = np.arange(p)
    v1 = rng.integers(0, p - 1, size=p)
    r1 = v1 + (v1 >= i)
    np.testing.assert_array_equal(d["r1"], r1)
    rng.integers(0, p - 2, size=p)
    rng.integers(0, p - 3, size=p)
    np.testing.assert_array_equal(d["cross"], rng.random((p, dim)))
    np.testing.assert_array_equal(d["forced"], rng.integers(0, dim, size=p))
    assert set(de_draws(np.random.default_rng(0), p, dim)) == {"r1", "r2", "r3"}


@pytest.mark.parametrize("CR", [None, 0.5])
def test_generation_draws_equal_per_image_draws(CR):
    """The batched draws are each image's de_draws, and leave every generator where its own
    de_draws would (the engine and the reference depend on the stream)."""
    p, dim, b = 9, 5, 4
    batch = [np.random.default_rng([11, i]) for i in range(b)]
    alone = [np.random.default_rng([11, i]) for i in range(b)]
    for _ in range(3):  # consecutive generations
        got = generation_draws(batch, p, dim, CR)
        want = stack_draws([de_draws(r, p, dim, CR) for r in alone])
        assert set(got) == set(want)
        for key in want:
            assert got[key].dtype == want[key].dtype
            np.testing.assert_array_equal(got[key], want[key])
    for r1, r2 in zip(batch, alone):
        assert r1.random() == r2.random()
    empty = generation_draws([], p, dim, CR)
    assert empty["r1"].shape == (0, p) and empty["r1"].dtype == np.int64
    if CR is not None:
        assert empty["cross"].shape == (0, p, dim) and empty["forced"].shape == (0, p)


def test_de_draws_distinct_and_cover_all_allowed_indices():
    rng = np.random.default_rng(3)
    p = 5
    seen = np.zeros((p, p), dtype=int)
    for _ in range(400):
        d = de_draws(rng, p, 2)
        r = np.stack([np.arange(p), d["r1"], d["r2"], d["r3"]], axis=1)
        assert all(len(set(row)) == 4 for row in r.tolist())
        assert r.min() >= 0 and r.max() < p
        for k in ("r1", "r2", "r3"):
            seen[np.arange(p), d[k]] += 1
    # every j != i is drawn, roughly 3/4 of the time each (3 of the 4 others)
    off = seen[~np.eye(p, dtype=bool)]
    assert np.all(np.diag(seen) == 0) and off.min() > 250 and off.max() < 350


def test_candidate_bounds_and_init():
    lower, upper = candidate_bounds((3, 5, 7), 2, (0.0, 1.0))
    np.testing.assert_array_equal(lower, [0, 0, 0, 0, 0] * 2)
    np.testing.assert_array_equal(upper, [5, 7, 1, 1, 1] * 2)
    lo32, hi32 = candidate_bounds((1, 2, 2), 1, (0.1, 0.3), np.float32)
    assert float(lo32[2]) >= 0.1 and float(hi32[2]) <= 0.3
    pop = init_population(np.random.default_rng(0), 50, lower, upper)
    assert pop.shape == (50, 10) and np.all(pop >= lower) and np.all(pop <= upper)
    u = np.random.default_rng(0).random((50, 10))
    np.testing.assert_allclose(pop, lower + u * (upper - lower))


# -- applying and scoring candidates ------------------------------------------------------------

def test_apply_candidates_writes_exactly_the_pixels():
    x = images(2)
    x0 = x.copy()
    pop = np.array([[[1.7, 2.2, 0.9, 3.99, 0.0, 0.25]],        # (1, 2) <- .9, (3, 0) <- .25
                    [[0.0, 3.5, 0.0, 4.0, 4.0, 1.0]]])         # (0, 3) <- 0, clamp (3, 3) <- 1
    out = apply_candidates(x, pop)
    np.testing.assert_array_equal(x, x0)
    expected = x0.copy()
    expected[0, 0, 1, 2], expected[0, 0, 3, 0] = 0.9, 0.25
    expected[1, 0, 0, 3], expected[1, 0, 3, 3] = 0.0, 1.0
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == x.dtype


def test_apply_candidates_collisions_last_wins_and_channels():
    x = images(1, shape=(3, 2, 2)).astype(np.float32)
    x0 = x.copy()
    pop = np.array([[[1.2, 0.1, 0.1, 0.2, 0.3, 1.9, 0.5, 0.7, 0.8, 0.9],
                     [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]])
    out = apply_candidates(x, pop)
    np.testing.assert_array_equal(x, x0)
    assert out.shape == (2, 3, 2, 2) and out.dtype == np.float32
    e0 = x0[0].copy()
    e0[:, 1, 0] = np.float32([0.7, 0.8, 0.9])          # the second pixel overwrote the first
    np.testing.assert_array_equal(out[0], e0)
    e1 = x0[0].copy()
    e1[:, 0, 0], e1[:, 1, 1] = 1.0, 0.0
    np.testing.assert_array_equal(out[1], e1)


def test_score_candidates_matches_model_softmax():
    model = tiny_mlp()
    xs = images(6, seed=4)
    labels = np.array([0, 1, 2, 0, 1, 2])
    prob = softmax(model.logits(xs))
    fit, pred = score_candidates(model, xs, labels, targeted=False)
    np.testing.assert_allclose(fit, np.log(prob[np.arange(6), labels]), rtol=1e-12)
    np.testing.assert_array_equal(pred, model.predict(xs))
    fit_t, _ = score_candidates(model, xs, labels, targeted=True)
    np.testing.assert_allclose(fit_t, -np.log(prob[np.arange(6), labels]), rtol=1e-12)


def test_fitness_does_not_saturate_for_confident_models():
    """Probabilities round to 1.0 at a float32 logit margin of ~17; log-probs keep the order."""
    w = np.zeros((16, 2))
    w[0, 0] = 30.0  # logit_0 = 30 * x_0 + 20: a margin of 20..50
    model = Sequential([Flatten(), Dense(2)], (1, 4, 4),
                       params=[{}, {"w": w.astype(np.float32),
                                    "b": np.array([20.0, 0.0], np.float32)}])
    xs = np.zeros((3, 1, 4, 4), np.float32)
    xs[:, 0, 0, 0] = [0.0, 0.5, 1.0]
    assert np.all(softmax(model.logits(xs))[:, 0] == 1.0)  # the probabilities are blind
    fit, _ = score_candidates(model, xs, np.zeros(3, np.int64))
    assert fit[0] < fit[1] < fit[2] < 0  # the log-probabilities still rank them


# -- the attack ---------------------------------------------------------------------------------

def test_trajectory_follows_the_documented_draws():
    """pixel_attack == init + (de_draws, de_step, score, de_select) per generation, same stream."""
    w = np.random.default_rng(5).normal(0, 0.1, (16, 3))
    model = linear(w, [3.0, 0.0, 0.0])        # one pixel can never flip class 0
    x = images(1, seed=6)
    p, gens, k = 8, 6, 2
    _, info = pixel_attack(model, x, [0], pixels=k, popsize=p, generations=gens, seed=[42],
                           CR=0.7, early_stop=False)
    assert not info["success"][0]
    rng = np.random.default_rng(42)
    lower, upper = candidate_bounds((1, 4, 4), k)
    pop = init_population(rng, p, lower, upper)[None]
    fit, _ = score_candidates(model, apply_candidates(x, pop), np.zeros(p, int))
    for _ in range(gens):
        trial = de_step(pop, stack_draws([de_draws(rng, p, 3 * k, 0.7)]), 0.5, 0.7, lower, upper)
        tfit, _ = score_candidates(model, apply_candidates(x, trial), np.zeros(p, int))
        pop, fit = de_select(pop, fit, trial, tfit)
    j = fit.argmin()
    assert info["best_fitness"][0] == fit[j]
    np.testing.assert_array_equal(info["candidate"][0].ravel(), pop[0, j])
    assert info["queries"][0] == p * (1 + gens) and info["generations"][0] == gens


def test_needle_pixel_is_found():
    model = needle_model()
    x = images(5, seed=1) * 0.4                # the needle pixel starts below 0.5: class 0
    y = model.predict(x)
    assert np.all(y == 0)
    x_adv, info = pixel_attack(model, x, y, popsize=20, generations=50, seed=3)
    assert info["success"].all()
    cand = info["candidate"][:, 0]
    # the column may sit on its upper bound W = 4 after clipping: floor 4 is clamped to 3
    np.testing.assert_array_equal(np.minimum(np.floor(cand[:, :2]), 3), np.tile([2, 3], (5, 1)))
    assert np.all(cand[:, 2] > 0.5)
    assert np.all(x_adv[:, 0, 2, 3] > 0.5)
    np.testing.assert_array_equal(model.predict(x_adv), info["pred"])
    assert np.all(info["generations"] < 50)


def test_targeted_success_hits_target():
    model = tiny_mlp(seed=0)
    x = images(6, seed=2)
    y = model.predict(x)
    t = (y + 1) % 3
    x_adv, info = pixel_attack(model, x, y, pixels=3, popsize=16, generations=20,
                               targeted=True, target=t, seed=1)
    assert info["success"].any() and not info["success"].all()
    pred = model.predict(x_adv)
    s = info["success"]
    np.testing.assert_array_equal(pred[s], t[s])
    assert np.all(pred[~s] != t[~s])
    np.testing.assert_array_equal(info["best_fitness"] >= 0, np.ones(6, bool))  # -log p_t


def test_early_stop_and_untargeted_success_semantics():
    model = tiny_mlp(seed=1)
    x = images(8)
    y = model.predict(x)
    gens = 30
    x_adv, info = pixel_attack(model, x, y, popsize=12, generations=gens, seed=0)
    s = info["success"]
    assert s.any() and (~s).any()
    assert np.all(info["generations"][s] < gens) and np.all(info["generations"][~s] == gens)
    np.testing.assert_array_equal(info["queries"], 12 * (1 + info["generations"]))
    pred = model.predict(x_adv)
    assert np.all(pred[s] != y[s]) and np.all(pred[~s] == y[~s])
    _, full = pixel_attack(model, x, y, popsize=12, generations=gens, seed=0, early_stop=False)
    assert np.all(full["generations"] == gens) and np.all(full["success"] >= s)


def test_more_pixels_succeed_at_least_as_often():
    # logit_1 = 10 (sum of the 8 left-half pixels) - 15: one pixel (<= 1) can never reach
    # the 1.5 needed, three can.
    w = np.zeros((16, 2))
    w[[r * 4 + c for r in range(4) for c in range(2)], 1] = 10.0
    model = linear(w, [0.0, -15.0])
    x = np.zeros((6, 1, 4, 4))
    y = np.zeros(6, int)
    _, one = pixel_attack(model, x, y, pixels=1, popsize=16, generations=15, seed=0)
    _, three = pixel_attack(model, x, y, pixels=3, popsize=16, generations=15, seed=0)
    assert one["success"].sum() == 0
    assert three["success"].sum() >= 4


def test_l0_at_most_k_pixels():
    model = Sequential([Flatten(), Dense(3)], (3, 4, 4), seed=3)
    x = images(4, seed=3, shape=(3, 4, 4))
    y = model.predict(x)
    for k in (1, 2):
        x_adv, _ = pixel_attack(model, x, y, pixels=k, popsize=8, generations=3, seed=0,
                                early_stop=False)
        diff = x_adv != x
        assert np.all(diff.reshape(4, -1).sum(1) <= 3 * k)
        assert np.all(diff.any(axis=1).reshape(4, -1).sum(1) <= k)


def test_batch_equals_per_sample_and_seeds():
    model = tiny_mlp(seed=1)
    x = images(4, seed=9)
    y = model.predict(x)
    seeds = np.array([11, 12, 13, 14])
    kw = dict(pixels=2, popsize=10, generations=8, CR=0.9)
    x_adv, info = pixel_attack(model, x, y, seed=seeds, **kw)
    for i in range(4):
        xi, ii = pixel_attack(model, x[i:i + 1], y[i:i + 1], seed=seeds[i:i + 1], **kw)
        np.testing.assert_array_equal(xi[0], x_adv[i])
        for key in info:
            np.testing.assert_array_equal(ii[key][0], info[key][i])
    x2, info2 = pixel_attack(model, x, y, seed=seeds, **kw)
    np.testing.assert_array_equal(x2, x_adv)
    np.testing.assert_array_equal(info2["candidate"], info["candidate"])
    _, info3 = pixel_attack(model, x, y, seed=seeds + 100, **kw)
    assert not np.array_equal(info3["candidate"], info["candidate"])
    _, info4 = pixel_attack(model, x, y, seed=5, **kw)
    _, info5 = pixel_attack(model, x, y, seed=6, **kw)
    assert not np.array_equal(info4["candidate"], info5["candidate"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_and_inputs_not_mutated(dtype):
    model = tiny_mlp(dtype=np.float32)
    x = images(3, dtype=dtype)
    y = model.predict(x)
    x0, y0 = x.copy(), y.copy()
    x_adv, info = pixel_attack(model, x, y, popsize=6, generations=3, CR=0.5)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    assert x_adv.dtype == dtype and info["candidate"].dtype == dtype
    assert info["candidate"].shape == (3, 1, 3)
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_binary_model_and_empty_batch():
    model = Sequential([Flatten(), Dense(1)], (1, 4, 4), seed=0)
    x = images(3, seed=8)
    y = model.predict(x)
    x_adv, info = pixel_attack(model, x, y, popsize=8, generations=5)
    assert np.array_equal(model.predict(x_adv)[info["success"]], 1 - y[info["success"]])
    x_adv, info = pixel_attack(model, x[:0], y[:0], popsize=8, generations=5)
    assert x_adv.shape == (0, 1, 4, 4) and info["success"].shape == (0,)


def test_one_forward_per_generation(monkeypatch):
    calls = []
    real = px.forward

    def counting(model, xs):
        calls.append(xs.shape)
        return real(model, xs)

    monkeypatch.setattr(px, "forward", counting)
    model = tiny_mlp(seed=1)
    x = images(3, seed=9)
    y = model.predict(x)
    gens, p = 5, 10
    _, ref = pixel_attack(model, x, y, popsize=p, generations=gens, early_stop=False)
    assert calls == [(3 * p, 1, 4, 4)] * (1 + gens)

    calls.clear()
    _, info = pixel_attack(model, x, y, popsize=p, generations=gens, early_stop=False,
                           batch_images=2)
    assert calls == [(2 * p, 1, 4, 4), (p, 1, 4, 4)] * (1 + gens)
    for key in ref:
        np.testing.assert_array_equal(ref[key], info[key])

    calls.clear()
    _, info = pixel_attack(needle_model(), images(3) * 0.4, [0, 0, 0], popsize=p,
                           generations=40)
    # every call scores the whole population of each still-active image at once
    active = [(info["generations"] >= g).sum() for g in range(0, info["generations"].max() + 1)]
    assert calls == [(a * p, 1, 4, 4) for a in active]


@pytest.mark.parametrize("kwargs, err", [
    (dict(pixels=0), "pixels"), (dict(popsize=3), "popsize"), (dict(generations=0), "generations"),
    (dict(F=0.0), "F"), (dict(F=2.5), "F"), (dict(CR=-0.1), "CR"), (dict(CR=1.5), "CR"),
    (dict(targeted=True), "target"), (dict(target=[1, 1]), "target"),
    (dict(targeted=True, target="same"), "target"), (dict(batch_images=0), "batch_images"),
    (dict(pixels=1.5), "pixels"),
])
def test_bad_arguments(kwargs, err):
    model = tiny_mlp()
    x = images(2)
    y = model.predict(x)
    if kwargs.get("target") == "same":
        kwargs = dict(kwargs, target=y)
    with pytest.raises(AdvkernError, match=err):
        pixel_attack(model, x, y, **{"popsize": 6, "generations": 2, **kwargs})


def test_bad_inputs():
    model = tiny_mlp()
    x = images(2)
    y = model.predict(x)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(AdvkernError, match="NaN"):
        pixel_attack(model, bad, y, popsize=6, generations=2)
    with pytest.raises(AdvkernError, match="box"):
        pixel_attack(model, x + 1.0, y, popsize=6, generations=2)
    with pytest.raises(ShapeError):
        pixel_attack(model, x[:, 0], y, popsize=6, generations=2)
    flat = Sequential([Dense(3)], (16,), seed=0)
    with pytest.raises(ShapeError, match="C, H, W"):
        pixel_attack(flat, x.reshape(2, 16), y, popsize=6, generations=2)
    with pytest.raises(AdvkernError, match="popsize"):
        de_draws(np.random.default_rng(0), 3, 2)
    with pytest.raises(ShapeError):
        apply_candidates(x, np.zeros((2, 4, 4)))
