"""numba_cpu DE primitives against the numpy backend (the reference).

de_step must be bit-exact. de_score is incremental (clean activations + the changed pixels'
receptive fields, and for Flatten-Dense-ReLU-Dense a linearised second layer), so it equals
full scoring up to rounding: logits are sums of up to ``fan_in`` products, so float32 errors
are ~ sqrt(fan_in) * eps * (sum of |terms|); the tolerance below is 64 times that, with the
term magnitude bounded by a forward pass of |x| through |W| (+|b|). A wrong delta, index,
collision rule or stale cache gives O(1) errors. Predictions are compared only where the
reference's top-2 logit margin is clear of that tolerance.
"""

import numpy as np
import pytest
from _helpers import paddings, randomize
from hypothesis import given, settings
from hypothesis import strategies as st

from advkern.errors import AdvkernError, ShapeError
from advkern.kernels import numpy_backend as ref_backend
from advkern.kernels.numba_cpu import de as nde
from advkern.kernels.numba_cpu.de import de_score, de_step
from advkern.kernels.numba_cpu.net import Net
from advkern.nets import (
    Conv2D,
    Dense,
    Flatten,
    MaxPool2D,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
    build,
)
from advkern.reference import network
from advkern.reference.pixel import candidate_bounds, de_draws, stack_draws

DTYPES = [np.float32, np.float64]


# -- de_step ----------------------------------------------------------------------------------

def _bits(a):
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint64)


@given(n=st.integers(1, 3), p=st.integers(4, 9), dim=st.integers(1, 8),
       cr=st.one_of(st.none(), st.floats(0, 1), st.sampled_from([0.0, 1.0, 0.1, 0.7])),
       f=st.sampled_from([0.5, 0.1, 1.0, 2.0, 0.3]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31))
def test_de_step_bit_exact(n, p, dim, cr, f, dtype, seed):
    from advkern.reference.pixel import de_step as ref_step

    rng = np.random.default_rng(seed)
    pop = (rng.uniform(-1, 2, (n, p, dim)) * rng.choice([1.0, 30.0], dim)).astype(dtype)
    pop[rng.random(pop.shape) < 0.1] = 0.0  # exact bounds and zeros
    lower = rng.uniform(-0.5, 0.5, dim).astype(dtype)
    lower[0] = 0.0
    upper = (lower + rng.uniform(0.1, 20, dim)).astype(dtype)
    draws = stack_draws([de_draws(rng, p, dim, cr) for _ in range(n)])
    before = pop.copy(), {k: v.copy() for k, v in draws.items()}
    out = de_step(pop, draws, f, cr, lower, upper)
    want = ref_step(pop, draws, f, cr, lower, upper)
    assert out.dtype == want.dtype == pop.dtype and out.shape == want.shape
    np.testing.assert_array_equal(_bits(out), _bits(want))
    np.testing.assert_array_equal(pop, before[0])
    for k, v in draws.items():
        np.testing.assert_array_equal(v, before[1][k])


def test_de_step_float64_bounds_on_float32_population():
    rng = np.random.default_rng(3)
    pop = rng.uniform(-1, 30, (2, 6, 6)).astype(np.float32)
    lower, upper = candidate_bounds((4, 28, 28), 1, (0.0, 1.0), np.float64)
    draws = stack_draws([de_draws(rng, 6, 6, 0.3) for _ in range(2)])
    from advkern.reference.pixel import de_step as ref_step
    np.testing.assert_array_equal(_bits(de_step(pop, draws, 0.7, 0.3, lower, upper)),
                                  _bits(ref_step(pop, draws, 0.7, 0.3, lower, upper)))


def test_de_step_rejects_bad_draws():
    pop = np.zeros((1, 5, 3))
    lo, hi = np.zeros(3), np.ones(3)
    good = {"r1": np.array([[1, 2, 3, 4, 0]]), "r2": np.array([[2, 3, 4, 0, 1]]),
            "r3": np.array([[3, 4, 0, 1, 2]])}
    with pytest.raises(AdvkernError, match="r2"):
        de_step(pop, dict(good, r2=np.array([[2, 3, 5, 0, 1]])), 0.5, None, lo, hi)
    with pytest.raises(ShapeError):
        de_step(pop, dict(good, r1=np.array([1, 2, 3, 4, 0])), 0.5, None, lo, hi)
    with pytest.raises(AdvkernError, match="cross"):
        de_step(pop, good, 0.5, 0.5, lo, hi)
    with pytest.raises(ShapeError):
        de_step(pop, good, 0.5, None, lo, np.ones(4))


# -- de_score helpers -------------------------------------------------------------------------

def _abs_forward(model, x):
    """A bound on the magnitude of every sum in the forward pass: |x| through |W|, |b|."""
    h = np.abs(x).astype(np.float64)
    for i, layer in enumerate(model.layers):
        p = {k: np.abs(v).astype(np.float64) for k, v in model.params[i].items()}
        if layer.type in ("tanh", "sigmoid"):
            h = np.ones_like(h)  # bounded by 1
            continue
        h, _ = network.layer_forward(layer, p, h, model.shapes[i])
    return h.max(axis=1)


def candidates(rng, shape, k, n, p, dtype, clip=(0.0, 1.0), collide=False, border=False):
    """Random k-pixel candidates (n, p, k (2 + C)), optionally with collisions and borders."""
    c, h, w = shape
    lower, upper = candidate_bounds(shape, k, clip, dtype)
    pop = (lower + rng.random((n, p, len(lower))) * (upper - lower)).astype(dtype)
    cand = pop.reshape(n, p, k, 2 + c)
    if collide and k > 1:
        # Half the candidates: pixel j lands on pixel 0's cell (a different fraction).
        hit = rng.random((n, p)) < 0.5
        j = rng.integers(1, k, (n, p))
        for a in range(n):
            for b in range(p):
                if hit[a, b]:
                    cand[a, b, j[a, b], :2] = np.floor(cand[a, b, 0, :2]) + rng.random(2) * 0.99
    if border:
        # Exactly H / W (clamped to the last row/col), 0, and just below the bound.
        choice = rng.integers(0, 3, (n, p, k, 2))
        for ax, size in ((0, h), (1, w)):
            v = cand[..., ax]
            vals = np.array([size, 0.0, np.nextafter(dtype(size), dtype(0))], dtype)
            cand[..., ax] = np.where(rng.random(v.shape) < 0.5, vals[choice[..., ax]], v)
    return cand.reshape(n, p, -1)


def check_score(model, x, labels, pop, targeted, dtype, calls=2):
    """de_score (called ``calls`` times: a cached second call takes other paths) == numpy."""
    model = model.astype(dtype) if model.dtype != dtype else model
    net = Net(model, dtype)
    x = x.astype(dtype)
    want_fit, want_pred = ref_backend.de_score(model, x, labels, pop, targeted)
    n, p = pop.shape[:2]
    from advkern.reference.pixel import apply_candidates
    images = apply_candidates(x, pop)
    z, _ = network.forward(model, images)
    eps = np.finfo(dtype).eps
    fan_in = max([int(np.prod(s)) for s in model.shapes[:-1]] + [1])
    tol = 64 * np.sqrt(fan_in) * eps * (1 + _abs_forward(model, images))
    zz = np.concatenate([np.zeros_like(z), z], 1) if z.shape[1] == 1 else z
    top2 = np.sort(zz, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0] > 4 * tol).reshape(n, p)
    saved = x.copy(), pop.copy(), labels.copy()
    for _ in range(calls):
        fit, pred = de_score(net, x, labels, pop, targeted)
        assert fit.shape == (n, p) and pred.shape == (n, p)
        assert fit.dtype == want_fit.dtype and pred.dtype == np.int64
        err = np.abs(fit.astype(np.float64) - want_fit)
        assert np.all(err <= 2 * tol.reshape(n, p)), (
            f"fitness off by {err.max():.3g} (tolerance {tol.min():.3g}..{tol.max():.3g})")
        np.testing.assert_array_equal(pred[clear], want_pred[clear])
    np.testing.assert_array_equal(x, saved[0])
    np.testing.assert_array_equal(pop, saved[1])
    np.testing.assert_array_equal(labels, saved[2])
    return net


def _labels(rng, model, n, targeted):
    k = model.num_classes
    y = rng.integers(0, k, n)
    return (y + rng.integers(1, k, n)) % k if targeted else y


# -- de_score: the bundled architectures ------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("k,targeted", [(1, False), (3, True), (5, False)])
def test_de_score_bundled_architectures(name, dtype, k, targeted):
    rng = np.random.default_rng(k)
    model = randomize(build(name, dtype=dtype), seed=7)
    x = rng.random((3, 1, 28, 28)).astype(dtype)
    x[:, :, :5] = 0  # MNIST-like empty border rows
    pop = candidates(rng, (1, 28, 28), k, 3, 6, dtype, collide=True, border=k > 1)
    net = check_score(model, x, _labels(rng, model, 3, targeted), pop, targeted, dtype)
    plan = nde._plan(net)
    assert plan.mode == "chain"
    # The mlp's second call ran the linearised second layer (G cached per image).
    assert (plan.gpool is not None) == (name == "mlp")


def test_de_score_mlp2_subsets_and_reordering():
    """Subsets/reorderings of cached images (as the engine's early stop passes) stay exact."""
    rng = np.random.default_rng(11)
    dtype = np.float32
    model = randomize(build("mlp"), seed=3)
    x = rng.random((4, 1, 28, 28)).astype(dtype)
    net = Net(model, dtype)
    for idx in ([0, 1, 2, 3], [0, 1, 2, 3], [2, 0], [3, 1, 2], [1]):
        pop = candidates(rng, (1, 28, 28), 2, len(idx), 5, dtype, collide=True)
        lab = rng.integers(0, 10, len(idx))
        fit, _ = de_score(net, x[idx], lab, pop, False)
        want_fit, _ = ref_backend.de_score(model, x[idx], lab, pop, False)
        np.testing.assert_allclose(fit, want_fit, rtol=0, atol=2e-4)


def test_de_score_cache_never_stale():
    """Same shapes, different pixels: every call scores its own images."""
    rng = np.random.default_rng(5)
    for name in ("mlp", "cnn"):
        model = randomize(build(name), seed=1)
        net = Net(model, np.float32)
        x1 = rng.random((2, 1, 28, 28)).astype(np.float32)
        x2 = x1.copy()
        x2[1, 0, 14, 14] += 0.5  # one pixel of one image
        x2[0] = x1[1]
        for x in (x1, x2, x1, x2[::-1].copy(), x1):
            pop = candidates(rng, (1, 28, 28), 1, 2, 4, np.float32)
            fit, _ = de_score(net, x, np.array([3, 4]), pop, False)
            want, _ = ref_backend.de_score(model, x, np.array([3, 4]), pop, False)
            np.testing.assert_allclose(fit, want, rtol=0, atol=2e-4)
        # The cache is bounded by bytes.
        plan = nde._plan(net)
        assert plan.cache_bytes <= nde.CACHE_BYTES


def test_de_score_unchanged_pixels_give_clean_scores():
    """Candidates writing the image's own values score exactly like the clean image's."""
    dtype = np.float64
    rng = np.random.default_rng(2)
    model = randomize(build("cnn", dtype=dtype), seed=2)
    x = rng.random((2, 1, 28, 28))
    pop = candidates(rng, (1, 28, 28), 2, 2, 4, dtype)
    cand = pop.reshape(2, 4, 2, 3)
    r = np.clip(np.floor(cand[..., 0]), 0, 27).astype(int)
    c = np.clip(np.floor(cand[..., 1]), 0, 27).astype(int)
    cand[..., 2] = x[np.arange(2)[:, None, None], 0, r, c]
    fit, _ = de_score(Net(model, dtype), x, np.array([0, 1]), pop, False)
    clean = network.forward(model, x)[0]
    logp = clean - np.log(np.exp(clean).sum(1, keepdims=True))
    np.testing.assert_allclose(fit, np.repeat(logp[[0, 1], [0, 1]][:, None], 4, 1), atol=1e-12)


# -- de_score: random architectures ------------------------------------------------------------

activations = st.sampled_from([ReLU(), ReLU(), Tanh(), Sigmoid(), None])


@st.composite
def conv_stacks(draw):
    """A random conv stack (strides 1-2, any padding, 1-3 conv layers, optional max-pool),
    Flatten, optional hidden Dense, Dense K."""
    c = draw(st.sampled_from([1, 3]))
    shape = (c, draw(st.integers(4, 9)), draw(st.integers(4, 9)))
    layers, cur = [], shape
    for _ in range(draw(st.integers(1, 3))):
        conv = Conv2D(draw(st.integers(1, 5)), (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                      (draw(st.integers(1, 2)), draw(st.integers(1, 2))), draw(paddings))
        try:
            out = conv.output_shape(cur)
        except ShapeError:
            continue
        layers.append(conv)
        cur = out
        act = draw(activations)
        if act is not None:
            layers.append(act)
        if draw(st.integers(0, 5)) == 0 and min(cur[1:]) >= 2:
            layers.append(MaxPool2D(2, 1))  # -> the full-scoring fallback
            cur = layers[-1].output_shape(cur)
    if not layers:
        layers.append(Conv2D(2, 1))
    layers.append(Flatten())
    if draw(st.booleans()):
        layers += [Dense(draw(st.integers(2, 6))), draw(st.sampled_from([ReLU(), Tanh()]))]
    layers.append(Dense(draw(st.sampled_from([1, 3, 4]))))
    return Sequential(layers, shape, seed=draw(st.integers(0, 1000)))


@st.composite
def dense_stacks(draw):
    """Flatten -> Dense first: the rank-k path, and Dense-ReLU-Dense for the linearised one."""
    c = draw(st.sampled_from([1, 3]))
    shape = (c, draw(st.integers(2, 7)), draw(st.integers(2, 7)))
    layers = [Flatten(), Dense(draw(st.integers(2, 12)))]
    for _ in range(draw(st.integers(0, 2))):
        layers += [draw(st.sampled_from([ReLU(), ReLU(), Tanh()])),
                   Dense(draw(st.integers(2, 12)))]
    if draw(st.booleans()):
        layers += [ReLU(), Dense(draw(st.sampled_from([1, 2, 5])))]
    return Sequential(layers, shape, seed=draw(st.integers(0, 1000)))


@settings(max_examples=25)
@given(model=st.one_of(conv_stacks(), dense_stacks()), k=st.sampled_from([1, 3, 5]),
       dtype=st.sampled_from(DTYPES), targeted=st.booleans(), collide=st.booleans(),
       border=st.booleans(), seed=st.integers(0, 2**31))
def test_de_score_random_architectures(model, k, dtype, targeted, collide, border, seed):
    rng = np.random.default_rng(seed)
    model = randomize(model.astype(dtype), seed % 1000)
    n, p = 2, 5
    x = rng.uniform(-1, 1, (n, *model.input_shape)).astype(dtype)
    pop = candidates(rng, model.input_shape, k, n, p, dtype, clip=(-1.0, 1.0),
                     collide=collide, border=border)
    if targeted and model.num_classes < 2:
        targeted = False
    check_score(model, x, _labels(rng, model, n, targeted), pop, targeted, dtype)


@pytest.mark.parametrize("first", [MaxPool2D(2), Tanh()])
def test_de_score_fallback_architectures(first):
    """Networks that do not start with conv/flatten-dense are scored in full."""
    model = Sequential([first, Flatten(), Dense(3)], (2, 6, 6), seed=4)
    rng = np.random.default_rng(0)
    x = rng.random((2, 2, 6, 6))
    pop = candidates(rng, (2, 6, 6), 3, 2, 4, np.float64, collide=True, border=True)
    net = check_score(model, x, np.array([0, 2]), pop, True, np.float64)
    assert nde._plan(net).mode == "full"


def test_de_score_explicit_collision_and_border():
    """Hand-made candidates on a needle model: last write wins, H/W clamp to the last row."""
    dtype = np.float64
    w = np.zeros((16, 2))
    w[3 * 4 + 3, 1] = 10.0  # logit 1 reads only pixel (3, 3)
    model = Sequential([Flatten(), Dense(2)], (1, 4, 4),
                       params=[{}, {"w": w, "b": np.array([0.0, -5.0])}])
    x = np.zeros((1, 1, 4, 4))
    pop = np.array([[[3.5, 3.2, 1.0, 3.9, 3.0, 0.0],   # (3, 3) <- 1, then (3, 3) <- 0: clean
                     [3.0, 3.0, 0.0, 4.0, 4.0, 1.0],   # (3, 3) <- 0, then (H, W) -> (3, 3) <- 1
                     [4.0, 4.0, 0.7, 0.0, 0.0, 0.2],   # border pixel (3, 3) <- 0.7, (0, 0) <- 0.2
                     [0.0, 0.0, 1.0, 2.0, 3.0, 1.0]]])  # pixels not read by logit 1
    fit, pred = de_score(Net(model, dtype), x, np.array([0]), pop, False)
    want_fit, want_pred = ref_backend.de_score(model, x, np.array([0]), pop, False)
    np.testing.assert_array_equal(pred, [[0, 1, 1, 0]])
    np.testing.assert_array_equal(pred, want_pred)
    np.testing.assert_allclose(fit, want_fit, rtol=0, atol=1e-12)


def test_de_score_validates_inputs():
    model = Sequential([Flatten(), Dense(3)], (1, 4, 4), seed=0)
    net = Net(model, np.float64)
    x = np.zeros((2, 1, 4, 4))
    pop = np.zeros((2, 3, 3))
    with pytest.raises(AdvkernError, match="dtype"):
        de_score(net, x.astype(np.float32), np.zeros(2, int), pop, False)
    with pytest.raises(ShapeError):
        de_score(net, x, np.zeros(2, int), np.zeros((2, 3, 4)), False)
    with pytest.raises(ShapeError):
        de_score(net, x[:, :, :3], np.zeros(2, int), pop, False)
    bad = pop.copy()
    bad[0, 0, 2] = np.nan
    with pytest.raises(AdvkernError, match="NaN"):
        de_score(net, x, np.zeros(2, int), bad, False)
    with pytest.raises(AdvkernError):
        de_score(net, x, np.array([0, 3]), pop, False)
    fit, pred = de_score(net, x[:0], np.zeros(0, int), pop[:0], False)
    assert fit.shape == (0, 3) and pred.shape == (0, 3)
