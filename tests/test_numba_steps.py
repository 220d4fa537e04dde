"""numba_cpu steps and JSMA searches (advkern.kernels.numba_cpu.steps) against the numpy backend.

linf_step and both JSMA searches must be identical (bit for bit, indices and tie rule
included); l2_step and l1_step equal to float tolerance (per-image norms are D-term
reductions: sqrt(D) * machine eps times the magnitude of the terms), inside the ball and the
box. The kernels replicate numpy's summation order and quantile arithmetic, so the SLIDE
quantile is checked for exact equality with np.quantile on its own.
"""

import contextlib
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("numba")

from advkern.errors import AdvkernError, ShapeError  # noqa: E402
from advkern.kernels import numpy_backend as R  # noqa: E402
from advkern.kernels.numba_cpu import steps as S  # noqa: E402

DTYPES = (np.float32, np.float64)
seeds = st.integers(0, 2**32 - 1)
shapes = st.one_of(st.tuples(st.integers(1, 50)),
                   st.tuples(st.integers(1, 2), st.integers(1, 5), st.integers(1, 5)))


def _same_bits(x, y):
    """Equal dtype, shape and bytes (so -0.0 != +0.0, unlike ==)."""
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


@contextlib.contextmanager
def _pair_block(bs):
    """Run the pair search with column blocks of bs (small blocks exercise the pruning)."""
    old = S.PAIR_BLOCK
    S.PAIR_BLOCK = bs
    try:
        yield
    finally:
        S.PAIR_BLOCK = old


# -- PGD steps --------------------------------------------------------------------------------

@st.composite
def step_cases(draw):
    """(xa, g, x0, eps, alpha, lo, hi, active) with points on the box faces, zero and tied
    gradients, zero radii, eps/alpha as arrays in the array dtype, in float64 or as floats."""
    rng = np.random.default_rng(draw(seeds))
    dt = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 5))
    shape = (n,) + draw(shapes)
    lo = draw(st.sampled_from([0.0, -1.0, 0.1, -0.0]))
    hi = lo + draw(st.sampled_from([1.0, 0.7, 2.5]))
    lo_d, hi_d = dt(lo), dt(hi)

    def faces(v, frac):
        u = rng.random(v.shape)
        return np.where(u < frac / 2, lo_d, np.where(u > 1 - frac / 2, hi_d, v)).astype(dt)

    x0 = faces(rng.uniform(lo, hi, shape).astype(dt), draw(st.sampled_from([0.0, 0.3])))
    xa = faces(np.clip(x0 + rng.uniform(-0.4, 0.4, shape), lo_d, hi_d).astype(dt),
               draw(st.sampled_from([0.0, 0.3])))
    kind = draw(st.sampled_from(["normal", "ties", "tiny", "wide"]))
    if kind == "ties":
        g = rng.integers(-3, 4, shape).astype(dt)
    else:
        g = rng.standard_normal(shape) * {"normal": 1.0, "tiny": 1e-30, "wide": 1.0}[kind]
        if kind == "wide":
            g *= 10.0 ** rng.uniform(-6, 6, shape)
        g = np.where(rng.random(shape) < 0.15, 0.0, g).astype(dt)
    if draw(st.booleans()):
        xa, x0 = (np.where(v == 0, dt(-0.0), v) for v in (xa, x0))    # signed zeros
    eps = np.where(rng.random(n) < 0.15, 0.0, rng.uniform(0, 0.6, n))
    alpha = np.where(rng.random(n) < 0.15, 0.0, rng.uniform(0, 0.4, n))
    form = draw(st.sampled_from(["dt", "f64", "float"]))
    if form == "dt":
        eps, alpha = eps.astype(dt), alpha.astype(dt)
    elif form == "float":
        eps, alpha = float(eps[0]), float(alpha[0])
    active = rng.random(n) < draw(st.sampled_from([0.0, 0.7, 1.0]))
    return xa, g, x0, eps, alpha, lo, hi, active


def _run_both(name, args, *extra):
    copies = [np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in args]
    mine = getattr(S, name)(*args, *extra)
    with np.errstate(all="ignore"):
        ref = getattr(R, name)(*args, *extra)
    for a, c in zip(args, copies):                         # inputs not modified
        if isinstance(a, np.ndarray):
            assert _same_bits(a, c)
    xa, active = args[0], args[7]
    assert mine.dtype == xa.dtype and mine.shape == xa.shape
    assert mine is not xa and not np.shares_memory(mine, xa)
    assert _same_bits(mine[~active], xa[~active])           # inactive images untouched
    return mine, ref


def _check_ball_box(out, args, norm):
    _, _, x0, eps, _, lo, hi, active = args
    dt = out.dtype
    assert np.all(out >= dt.type(lo)) and np.all(out <= dt.type(hi))
    n = len(out)
    d = out[0].size
    e = np.broadcast_to(np.asarray(eps, np.float64), (n,))
    delta = (out.astype(np.float64) - x0.astype(np.float64)).reshape(n, d)
    size = np.abs(delta).sum(axis=1) if norm == "l1" else np.sqrt((delta ** 2).sum(axis=1))
    # the float bounds x0 +- delta are rounded to dt: one rounding per coordinate
    slack = 4 * np.finfo(dt).eps * (max(abs(lo), abs(hi)) + 1.0) * (d if norm == "l1" else
                                                                   np.sqrt(d))
    assert np.all(size[active] <= e[active] * (1 + 4 * np.finfo(dt).eps * np.sqrt(d)) + slack)


def _tolerance(out, args):
    _, _, _, eps, alpha, lo, hi, _ = args
    d = out[0].size
    scale = max(abs(lo), abs(hi)) + float(np.max(eps)) + float(np.max(alpha))
    return 8 * np.sqrt(d) * np.finfo(out.dtype).eps * scale


@given(step_cases())
def test_linf_step_is_bit_exact(case):
    mine, ref = _run_both("linf_step", case)
    assert _same_bits(mine, ref)
    xa, _, x0, eps, _, _, _, active = case
    e = np.broadcast_to(np.asarray(eps, np.float64), (len(xa),)).astype(xa.dtype)
    col = e.reshape((-1,) + (1,) * (xa.ndim - 1))
    assert np.all((mine >= x0 - col) & (mine <= x0 + col) | ~active.reshape(col.shape))


@given(step_cases())
def test_l2_step_matches_reference(case):
    mine, ref = _run_both("l2_step", case)
    np.testing.assert_allclose(mine, ref, rtol=0, atol=_tolerance(mine, case))
    _check_ball_box(mine, case, "l2")


@given(step_cases(), st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99, 1.0, 0.123, 0.875]))
def test_l1_step_matches_reference(case, sparsity):
    mine, ref = _run_both("l1_step", case, sparsity)
    np.testing.assert_allclose(mine, ref, rtol=0, atol=_tolerance(mine, case))
    _check_ball_box(mine, case, "l1")


def test_steps_without_projection_equal_reference_exactly():
    """Wide balls: no projection, so l2 and l1 reduce to xa + step, and the step (including
    the SLIDE coordinate choice on tied |g|) must be the reference's bit for bit."""
    rng = np.random.default_rng(3)
    for dt in DTYPES:
        x0 = rng.uniform(0, 1, (4, 1, 6, 7)).astype(dt)
        xa = np.clip(x0 + rng.uniform(-0.1, 0.1, x0.shape), 0, 1).astype(dt)
        g = rng.integers(-4, 5, x0.shape).astype(dt)       # |g| ties at the quantile
        args = (xa, g, x0, np.full(4, 100.0, dt), np.full(4, 0.25, dt), -10.0, 10.0,
                np.ones(4, bool))
        assert _same_bits(S.l2_step(*args), R.l2_step(*args))
        for q in (0.0, 0.5, 0.8, 0.95, 1.0):
            assert _same_bits(S.l1_step(*args, q), R.l1_step(*args, q))


@given(seeds, st.integers(1, 60), st.sampled_from(["ints", "floats", "zeros"]),
       st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.95, 0.99]), st.floats(0, 1)))
def test_quantile_equals_np_quantile(seed, d, kind, q):
    """The SLIDE threshold: np.quantile's 'linear' method, bit for bit, as the reference
    calls it (2-D, axis=1, q a Python float), on tied and zero-heavy data."""
    rng = np.random.default_rng(seed)
    m = {"ints": lambda: rng.integers(0, 4, (3, d)).astype(np.float64),
         "floats": lambda: np.abs(rng.standard_normal((3, d))),
         "zeros": lambda: np.where(rng.random((3, d)) < 0.8, 0.0, rng.random((3, d)))}[kind]()
    ref = np.quantile(m, q, axis=1)
    for i in range(3):
        assert S._quantile_linear(m[i].copy(), q) == ref[i]


def test_pairwise_sum_equals_np_sum():
    """The float64 row sums use numpy's association (pairwise, 8 accumulators, 128 blocks)."""
    rng = np.random.default_rng(0)
    for d in list(range(140)) + [255, 256, 257, 784, 1000, 3072, 4097]:
        x = rng.standard_normal((2, d)) * 10.0 ** rng.uniform(-8, 8, (2, d))
        ref = np.sum(x, axis=1)
        for i in range(2):
            assert S._pairwise_sum(x[i].copy(), d) == ref[i], d


def test_steps_empty_batches_and_images():
    for dt in DTYPES:
        for shape in [(0, 3), (2, 0), (0, 1, 2, 2)]:
            x = np.zeros(shape, dt)
            act = np.ones(shape[0], bool)
            for name, extra in (("linf_step", ()), ("l2_step", ()), ("l1_step", (0.9,))):
                out = getattr(S, name)(x, x, x, 0.1, 0.1, 0.0, 1.0, act, *extra)
                assert _same_bits(out, getattr(R, name)(x, x, x, 0.1, 0.1, 0.0, 1.0, act, *extra))


def test_step_errors():
    x = np.zeros((2, 3), np.float32)
    act = np.ones(2, bool)
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(AdvkernError, match="g contains 1 NaN"):
        S.linf_step(x, bad, x, 0.1, 0.1, 0, 1, act)
    with pytest.raises(AdvkernError, match="xa contains"):
        S.l2_step(np.where(np.isnan(bad), np.inf, x).astype(np.float32), x, x, 0.1, 0.1, 0, 1, act)
    with pytest.raises(AdvkernError, match="x0 contains"):
        S.l1_step(x, x, bad, 0.1, 0.1, 0, 1, act, 0.9)
    with pytest.raises(ShapeError):
        S.linf_step(x, np.zeros((2, 4), np.float32), x, 0.1, 0.1, 0, 1, act)
    with pytest.raises(ShapeError):
        S.linf_step(x, x, x, np.zeros(3), 0.1, 0, 1, act)
    with pytest.raises(ShapeError):
        S.linf_step(x, x, x, 0.1, 0.1, 0, 1, np.ones(3, bool))
    with pytest.raises(AdvkernError, match="dtype"):
        S.linf_step(x, x.astype(np.float64), x, 0.1, 0.1, 0, 1, act)
    with pytest.raises(AdvkernError, match="eps"):
        S.l2_step(x, x, x, np.array([0.1, -0.1]), 0.1, 0, 1, act)
    with pytest.raises(AdvkernError, match="alpha"):
        S.l2_step(x, x, x, 0.1, np.nan, 0, 1, act)
    with pytest.raises(AdvkernError, match="clip"):
        S.linf_step(x, x, x, 0.1, 0.1, 1, 0, act)
    with pytest.raises(AdvkernError, match="l1_sparsity"):
        S.l1_step(x, x, x, 0.1, 0.1, 0, 1, act, 1.5)


# -- JSMA searches ----------------------------------------------------------------------------

@st.composite
def search_cases(draw, max_d=50):
    """(a, b, domain, theta): tied integer values, continuous values, and extremes (products
    that underflow to -0.0, sums that overflow to inf) in float32/64 (a and b may differ)."""
    rng = np.random.default_rng(draw(seeds))
    n = draw(st.integers(1, 5))
    d = draw(st.integers(1, max_d))
    kind = draw(st.sampled_from(["ties", "ties", "normal", "extreme", "constant"]))
    if kind == "ties":
        r = draw(st.sampled_from([1, 2, 3]))
        a, b = (rng.integers(-r, r + 1, (n, d)).astype(np.float64) for _ in range(2))
    elif kind == "normal":
        a, b = rng.standard_normal((2, n, d))
    elif kind == "constant":
        a = np.full((n, d), draw(st.sampled_from([1.0, -1.0, 0.5])))
        b = -a * draw(st.sampled_from([1.0, 2.0]))
    else:
        vals = np.array([0.0, 1e-30, -1e-30, 1e-200, -1e-200, 1.0, -1.0, 2.0, -3.0, 3e38, -3e38,
                         1e300, -1e300, 1.5e-45, -1.5e-45])
        a, b = (vals[rng.integers(0, len(vals), (n, d))] for _ in range(2))
    dta, dtb = draw(st.sampled_from([(np.float32, np.float32), (np.float64, np.float64),
                                     (np.float32, np.float64)]))
    with np.errstate(all="ignore"):
        a, b = a.astype(dta), b.astype(dtb)
    a, b = np.nan_to_num(a, posinf=0, neginf=0), np.nan_to_num(b, posinf=0, neginf=0)
    domain = rng.random((n, d)) < draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    theta = draw(st.sampled_from([1.0, -1.0, 0.25, -3.0]))
    return a, b, domain, theta


def _search_both(name, case):
    copies = [np.array(v, copy=True) for v in case[:3]]
    mine = getattr(S, name)(*case)
    with np.errstate(all="ignore"):
        ref = getattr(R, name)(*case)
    for v, c in zip(case[:3], copies):
        assert _same_bits(v, c)
    assert len(mine) == len(ref)
    for u, v in zip(mine, ref):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(u, v)
    return mine


@given(search_cases(), st.sampled_from([1, 2, 3, 7, 64]))
def test_jsma_best_pair_identical(case, bs):
    with _pair_block(bs):
        p, q, found = _search_both("jsma_best_pair", case)
    assert np.all(p[found] < q[found]) and np.all(p[~found] == -1) and np.all(q[~found] == -1)


@given(search_cases())
def test_jsma_best_feature_identical(case):
    _search_both("jsma_best_feature", case)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("theta", [1.0, -1.0])
def test_jsma_best_pair_full_size(dt, theta):
    """n = 784 with the default blocks, continuous and heavily tied values, sparse and full
    domains: the pruned search returns the reference's pair."""
    rng = np.random.default_rng(7)
    z = rng.standard_normal((6, 784))
    a = np.concatenate([z[:3], rng.integers(-2, 3, (3, 784))]).astype(dt)
    b = np.concatenate([-0.7 * z[:3] + 0.5 * rng.standard_normal((3, 784)),
                        rng.integers(-2, 3, (3, 784))]).astype(dt)
    domain = rng.random((6, 784)) < np.array([1.0, 0.5, 0.05, 1.0, 0.3, 0.01])[:, None]
    _search_both("jsma_best_pair", (a, b, domain, theta))
    _search_both("jsma_best_feature", (a, b, domain, theta))


def test_search_errors():
    a = np.zeros((2, 3))
    dom = np.ones((2, 3), bool)
    bad = a.copy()
    bad[0, 1] = np.inf
    for fn in (S.jsma_best_pair, S.jsma_best_feature):
        with pytest.raises(AdvkernError, match="b contains 1 NaN/Inf"):
            fn(a, bad, dom, 1.0)
        with pytest.raises(AdvkernError, match="a contains"):
            fn(bad, a, dom, 1.0)
        with pytest.raises(AdvkernError, match="theta"):
            fn(a, a, dom, 0.0)
        with pytest.raises(AdvkernError, match="boolean"):
            fn(a, a, dom.astype(int), 1.0)
        with pytest.raises(ShapeError):
            fn(a, np.zeros((2, 4)), dom, 1.0)
        with pytest.raises(ShapeError):
            fn(a, a, dom[:, :2], 1.0)
        with pytest.raises(AdvkernError):
            fn(a.astype(np.int64), a, dom, 1.0)


def test_search_empty():
    for shape in [(0, 5), (3, 0), (2, 1)]:
        a = np.ones(shape, np.float32)
        dom = np.ones(shape, bool)
        _search_both("jsma_best_pair", (a, -a, dom, 1.0))
        _search_both("jsma_best_feature", (a, -a, dom, 1.0))


# -- timing (python tests/test_numba_steps.py; speed belongs to bench/, never to a test) -----

def time_pair_search(n=784, images=64, repeats=21, dtype=np.float32, seed=0):
    """(median, min) seconds per image of one ``jsma_best_pair`` call over a random full
    domain of n features (a, b standard normal), images searched in parallel. Wall clock:
    the machine's other load shows in the median; the min is the least disturbed call."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((images, n)).astype(dtype)
    b = rng.standard_normal((images, n)).astype(dtype)
    domain = np.ones((images, n), bool)
    S.jsma_best_pair(a, b, domain, 1.0)                    # compile / load from cache
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        S.jsma_best_pair(a, b, domain, 1.0)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / images, float(np.min(times)) / images


if __name__ == "__main__":
    for dt in DTYPES:
        med, best = time_pair_search(dtype=dt)
        print(f"{np.dtype(dt).name}: {med * 1e6:.1f} us per image per call (min {best * 1e6:.1f})")
