"""Tests for advkern.reference.projections: norm-ball projections, box, steepest steps."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from advkern.errors import AdvkernError, ShapeError
from advkern.reference.projections import (check_norm, check_sparsity, clip_box, l2_norms,
                                           per_sample_eps, project, project_ball, project_l1,
                                           project_l2, project_linf, steepest_step)

NORMS = ["linf", "l2", "l1"]
DUAL = {"linf": 1, "l2": 2, "l1": np.inf}  # the dual norm's order


def norm_of(a, norm):
    """Per-sample norm (B,) in float64."""
    f = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    return {"linf": np.abs(f).max(axis=1, initial=0.0), "l2": np.sqrt((f * f).sum(axis=1)),
            "l1": np.abs(f).sum(axis=1)}[norm]


def dual_norm(a, norm):
    return norm_of(a, {"linf": "l1", "l2": "l2", "l1": "linf"}[norm])


def l1_by_bisection(v, eps, iters=200):
    """Projection of one vector onto the L1 ball by bisection on the soft threshold theta:
    ||soft(v, theta)||_1 is continuous and decreasing in theta, so bisect for = eps."""
    a = np.abs(v)
    if a.sum() <= eps:
        return v.copy()
    lo, hi = 0.0, a.max()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if np.maximum(a - mid, 0).sum() > eps:
            lo = mid
        else:
            hi = mid
    return np.sign(v) * np.maximum(a - 0.5 * (lo + hi), 0)


batches = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(0, 2**31 - 1))


def make(b, d, seed, scale=2.0):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(b, d)) * rng.choice([0.01, 1.0, scale], size=(b, 1))
    eps = rng.uniform(0.0, 2.0, size=b)
    return v, eps


# -- norm names and radii ---------------------------------------------------------------


@pytest.mark.parametrize("spelling, want", [
    ("inf", "linf"), (np.inf, "linf"), (float("inf"), "linf"), ("Linf", "linf"),
    (2, "l2"), ("2", "l2"), (2.0, "l2"), ("L2", "l2"), (1, "l1"), ("1", "l1"), ("l1", "l1")])
def test_check_norm_spellings(spelling, want):
    assert check_norm(spelling) == want


@pytest.mark.parametrize("bad", [3, "3", 0, "fro", None, True, -np.inf, "l3"])
def test_check_norm_rejects(bad):
    with pytest.raises(AdvkernError, match="norm"):
        check_norm(bad)


@pytest.mark.parametrize("bad", [-0.1, np.nan, np.inf, -np.inf, "1", None, True])
def test_eps_rejected(bad):
    with pytest.raises(AdvkernError, match="eps"):
        project_linf(np.zeros((2, 3)), bad)


def test_eps_array_checks():
    assert per_sample_eps(0.5, 3).tolist() == [0.5] * 3
    assert per_sample_eps(np.float32(0.5), 2).dtype == np.float64
    with pytest.raises(ShapeError, match="eps"):
        per_sample_eps(np.ones(2), 3)
    with pytest.raises(AdvkernError, match="index 1"):
        per_sample_eps([0.1, -1.0, 0.2], 3)
    with pytest.raises(AdvkernError, match="eps"):
        per_sample_eps([0.1, np.nan], 2)
    with pytest.raises(AdvkernError, match="alpha"):
        per_sample_eps(0.0, 2, name="alpha", allow_zero=False)


def test_bad_arrays_rejected():
    with pytest.raises(AdvkernError, match="NaN"):
        project_l2(np.array([[np.nan, 1.0]]), 1.0)
    with pytest.raises(AdvkernError, match="float32 or float64"):
        project_l1(np.ones((2, 2), dtype=np.int64), 1.0)
    with pytest.raises(ShapeError):
        project(np.zeros((2, 3)), np.zeros((2, 4)), 0.1, "inf")
    with pytest.raises(AdvkernError, match="lo < hi"):
        clip_box(np.zeros(3), 1.0, 1.0)
    with pytest.raises(AdvkernError, match="lo < hi"):
        project(np.zeros((1, 3)), np.zeros((1, 3)), 0.1, "inf", clip=(1.0, 0.0))
    for q in (-0.1, 1.5, np.nan, "0.9", True):
        with pytest.raises(AdvkernError, match="l1_sparsity"):
            check_sparsity(q)
        with pytest.raises(AdvkernError, match="l1_sparsity"):
            steepest_step(np.ones((1, 3)), 1.0, 1, l1_sparsity=q)


# -- projections: feasibility, idempotence, optimality ----------------------------------


@pytest.mark.parametrize("norm", NORMS)
@given(batches)
def test_projection_feasible_idempotent_optimal(norm, bde):
    v, eps = make(*bde)
    p = project_ball(v, eps, norm)
    assert p.shape == v.shape and p.dtype == v.dtype
    tol = 1e-9 * (1 + norm_of(v, "l1"))
    assert np.all(norm_of(p, norm) <= eps + tol)
    np.testing.assert_allclose(project_ball(p, eps, norm), p, rtol=1e-12, atol=1e-12)
    # A point already in the ball is its own projection.
    inside = norm_of(v, norm) <= eps
    np.testing.assert_array_equal(p[inside], v[inside])
    # Convex optimality: p = Proj(v) iff <v - p, z - p> <= 0 for all z in the ball. The
    # max over z of <v - p, z> is eps * ||v - p||_dual, which certifies all z at once.
    r = v - p
    assert np.all(eps * dual_norm(r, norm) - np.sum(r * p, axis=1) <= tol)
    # ... and spot-check with explicit random points of the ball.
    rng = np.random.default_rng(bde[2])
    for _ in range(20):
        z = project_ball(rng.normal(size=v.shape) * 3, eps, norm)
        assert np.all(np.sum(r * (z - p), axis=1) <= tol)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("v", [[1.3, 0.4], [-0.2, 2.0], [0.9, -0.8], [0.1, 0.05]])
def test_projection_is_nearest_point_brute_force_2d(norm, v):
    eps = 0.7
    v = np.array([v], dtype=np.float64)
    p = project_ball(v, eps, norm)
    g = np.linspace(-eps, eps, 701)
    z = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    z = z[norm_of(z, norm) <= eps + 1e-12]
    best = np.sqrt(((z - v) ** 2).sum(axis=1)).min()
    dist = np.linalg.norm(p - v)
    h = g[1] - g[0]
    assert dist <= best + 1e-12  # no point of the ball (on the grid) is nearer than p
    assert best <= dist + h  # and the grid's best is as near as p, up to the grid step


@given(batches)
def test_l1_equals_bisection(bde):
    v, eps = make(*bde)
    p = project_l1(v, eps)
    for i in range(len(v)):
        np.testing.assert_allclose(p[i], l1_by_bisection(v[i], eps[i]), rtol=0, atol=1e-10)


def test_l1_ties_and_zero_radius():
    v = np.array([[1.0, -1.0, 1.0, 0.0], [3.0, 3.0, -3.0, 3.0]])
    np.testing.assert_allclose(project_l1(v, 1.5), [[0.5, -0.5, 0.5, 0], [.375, .375, -.375, .375]])
    np.testing.assert_array_equal(project_l1(v, 0.0), np.zeros_like(v))


@pytest.mark.parametrize("norm", NORMS)
def test_scalar_eps_equals_per_sample(norm):
    v, _ = make(5, 7, 3)
    np.testing.assert_array_equal(project_ball(v, 0.4, norm),
                                  project_ball(v, np.full(5, 0.4), norm))
    x = np.random.default_rng(1).uniform(size=(5, 7))
    np.testing.assert_array_equal(project(x + v, x, 0.4, norm), project(x + v, x, [0.4] * 5, norm))


@pytest.mark.parametrize("norm", NORMS)
def test_per_sample_eps_equals_rowwise(norm):
    v, eps = make(4, 6, 11)
    p = project_ball(v, eps, norm)
    for i in range(4):
        np.testing.assert_array_equal(p[i:i + 1], project_ball(v[i:i + 1], eps[i], norm))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_radius_and_zero_delta(norm, dtype):
    v = np.random.default_rng(0).normal(size=(3, 2, 4)).astype(dtype)
    out = project_ball(v, 0.0, norm)
    assert out.dtype == dtype and np.all(out == 0)
    zero = np.zeros((2, 5), dtype=dtype)
    out = project_ball(zero, 0.0, norm)
    assert np.all(np.isfinite(out)) and np.all(out == 0)
    out = project_ball(zero, 1.0, norm)
    assert np.all(np.isfinite(out)) and np.all(out == 0)
    x = np.random.default_rng(1).uniform(size=(3, 2, 4)).astype(dtype)
    np.testing.assert_array_equal(project(x + 0.3 * v, x, 0.0, norm), x)


def test_l2_no_overflow_or_underflow():
    tiny = np.full((1, 4), 1e-30, dtype=np.float32)
    assert l2_norms(tiny)[0] == pytest.approx(2e-30)
    s = steepest_step(tiny, 1.0, 2)
    np.testing.assert_allclose(s, np.full((1, 4), 0.5), rtol=1e-6)
    big = np.full((1, 4), 1e200)
    np.testing.assert_allclose(project_l2(big, 2.0), np.ones((1, 4)))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(bde=batches, lo=st.sampled_from([0.0, -1.0]))
def test_project_inside_ball_and_box(norm, dtype, bde, lo):
    b, d, seed = bde
    rng = np.random.default_rng(seed)
    hi = 1.0
    x = rng.uniform(lo, hi, size=(b, d)).astype(dtype)
    x[:, 0] = lo  # sit some coordinates on the bounds
    x_adv = (x + rng.normal(size=(b, d)) * 2).astype(dtype)
    eps = rng.uniform(0, 1.5, size=b)
    before = x_adv.copy(), x.copy()
    out = project(x_adv, x, eps, norm, (lo, hi))
    np.testing.assert_array_equal(x_adv, before[0])
    np.testing.assert_array_equal(x, before[1])
    assert out.dtype == dtype and out.shape == x.shape
    assert out.min() >= lo and out.max() <= hi
    rel = 4 * np.finfo(dtype).eps
    assert np.all(norm_of(out - x.astype(np.float64), norm) <= eps * (1 + rel) + rel)
    np.testing.assert_allclose(project(out, x, eps, norm, (lo, hi)), out, rtol=0, atol=rel)
    if norm == "linf":
        # Ball-then-box for L-inf is the exact projection onto the intersection: a
        # per-coordinate clip to [max(x - eps, lo), min(x + eps, hi)], exact in x's dtype.
        e = eps.astype(dtype)[:, None]
        want = np.clip(x_adv, np.maximum(x - e, lo), np.minimum(x + e, hi))
        np.testing.assert_array_equal(out, want)
        assert np.all(out >= x - e) and np.all(out <= x + e)


def test_l2_ball_then_box_is_not_exact_projection():
    # Documented: for L2 the ball-then-box point need not be the nearest point of the
    # intersection. x = 0 at the corner of the box [0, 1]^2, v = (2, -2): ball-then-box
    # gives (0.707, 0) but (1, 0) is feasible for eps = 1 and nearer.
    out = project(np.array([[2.0, -2.0]]), np.zeros((1, 2)), 1.0, 2, (0.0, 1.0))
    np.testing.assert_allclose(out, [[np.sqrt(0.5), 0.0]])
    assert np.linalg.norm(out - [2, -2]) > np.linalg.norm(np.array([1.0, 0.0]) - [2, -2])


def test_clip_box():
    x = np.array([-1.0, 0.5, 2.0], dtype=np.float32)
    out = clip_box(x, 0.0, 1.0)
    assert out.dtype == np.float32 and out.tolist() == [0.0, 0.5, 1.0]
    assert x.tolist() == [-1.0, 0.5, 2.0]


# -- steepest steps -----------------------------------------------------------------------


@given(batches)
def test_steepest_steps_linf_l2(bde):
    g, alpha = make(*bde)
    s = steepest_step(g, alpha, "inf")
    np.testing.assert_array_equal(s, alpha[:, None] * np.sign(g))
    s2 = steepest_step(g, alpha, 2)
    np.testing.assert_allclose(norm_of(s2, "l2"), alpha, rtol=1e-12)
    # Steepest ascent: <g, s> = alpha * ||g||_dual, the maximum over the alpha-ball.
    np.testing.assert_allclose(np.sum(g * s, axis=1), alpha * norm_of(g, "l1"), rtol=1e-12)
    np.testing.assert_allclose(np.sum(g * s2, axis=1), alpha * norm_of(g, "l2"), rtol=1e-12)


@given(batches, st.sampled_from([0.0, 0.5, 0.9, 1.0]))
def test_l1_step_slide(bde, q):
    g, alpha = make(*bde)
    s = steepest_step(g, alpha, 1, l1_sparsity=q)
    np.testing.assert_allclose(norm_of(s, "l1"), alpha, rtol=1e-12)
    # It moves the coordinates with |g| at or above the q-quantile, in sign(g) direction,
    # all by the same amount.
    r = np.quantile(np.abs(g), q, axis=1)
    kept = s != 0
    np.testing.assert_array_equal(kept, (np.abs(g) >= r[:, None]) & (g != 0) & (alpha[:, None] > 0))
    assert np.all(np.sign(s[kept]) == np.sign(g[kept]))
    if q == 1.0:  # only the largest |g_i| (the exact L1 steepest step when unique)
        np.testing.assert_allclose(np.sum(g * s, axis=1), alpha * np.abs(g).max(axis=1),
                                   rtol=1e-12)


def test_l1_step_sparsity_and_box_mask():
    g = np.array([[5.0, -4.0, 3.0, -2.0, 1.0, 0.5, 0.0, -0.1]])
    x = np.array([[1.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    # coordinate 0 sits at hi with g > 0 and coordinate 1 at lo with g < 0: both blocked.
    s = steepest_step(g, 2.0, 1, x=x, clip=(0.0, 1.0), l1_sparsity=0.75)
    m = np.abs(g) * [0, 0, 1, 1, 1, 1, 1, 1]
    r = np.quantile(m, 0.75)
    want = np.sign(g) * ((m >= r) & (m > 0))
    np.testing.assert_allclose(s, 2.0 * want / want.__abs__().sum())
    assert s[0, 0] == 0 and s[0, 1] == 0 and s[0, 2] > 0
    # A coordinate at the bound whose gradient points inward is not blocked.
    s = steepest_step(-g, 2.0, 1, x=x, clip=(0.0, 1.0), l1_sparsity=0.9)
    assert s[0, 0] < 0


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_gradient_gives_zero_step(norm, dtype):
    g = np.zeros((3, 1, 2, 2), dtype=dtype)
    g[1, 0, 0, 0] = 1.0
    s = steepest_step(g, 0.5, norm)
    assert s.dtype == dtype and s.shape == g.shape and np.all(np.isfinite(s))
    assert np.all(s[0] == 0) and np.all(s[2] == 0)
    assert np.abs(s[1]).sum() > 0
    # every coordinate blocked by the box -> zero L1 step
    x = np.ones_like(g)
    s = steepest_step(np.ones_like(g), 0.5, 1, x=x, clip=(0.0, 1.0))
    assert np.all(s == 0)


@pytest.mark.parametrize("norm", NORMS)
def test_step_per_sample_alpha_and_no_mutation(norm):
    g, alpha = make(4, 6, 5)
    g0 = g.copy()
    s = steepest_step(g, alpha, norm)
    np.testing.assert_array_equal(g, g0)
    for i in range(4):
        np.testing.assert_array_equal(s[i:i + 1], steepest_step(g[i:i + 1], alpha[i], norm))
    np.testing.assert_array_equal(steepest_step(g, 0.3, norm),
                                  steepest_step(g, np.full(4, 0.3), norm))
