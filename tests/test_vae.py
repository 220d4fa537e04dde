"""vae-detect: the transposed convolution (reference and numba_cpu), the VAE's ELBO and
detection-score gradients, the ROC AUC, VAE training/caching, and a tiny end-to-end run.

Gradient checks are central differences in float64 along random unit directions
(tests/_helpers.py); biases are random so no ReLU sits exactly at its kink.
"""

import json

import numpy as np
import pytest
from _helpers import check_directional, paddings, projected, seeds
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from advkern.errors import AdvkernError, ShapeError
from advkern.experiments import vae_detect as vd
from advkern.nets import Dense, Flatten, ReLU, Sequential, load, save
from advkern.nets.layers import Conv2DTranspose, Reshape, layer_from_config
from advkern.nets.vae import VAE, build_vae, load_vae, save_vae, train_vae
from advkern.reference import layers as L
from advkern.reference import vae as RV
from advkern.reference.losses import log_softmax

# ----------------------------------------------------------------------------- conv2d_transpose


def naive_conv2d_transpose(x, w, b, stride, pads, extra):
    """Direct scatter of every input pixel's patch, then crop and output padding by hand."""
    n, c, h, wd = x.shape
    _, f, kh, kw = w.shape
    sh, sw = stride
    t, bo, l, r = pads
    hf, wf = (h - 1) * sh + kh, (wd - 1) * sw + kw
    full = np.zeros((n, f, hf + extra[0], wf + extra[1]))
    for a in range(n):
        for ch in range(c):
            for i in range(h):
                for j in range(wd):
                    for o in range(f):
                        for u in range(kh):
                            for v in range(kw):
                                full[a, o, i * sh + u, j * sw + v] += \
                                    x[a, ch, i, j] * w[ch, o, u, v]
    ho, wo = hf - t - bo + extra[0], wf - l - r + extra[1]
    return full[:, :, t: t + ho, l: l + wo] + b[:, None, None]


@st.composite
def tconv_configs(draw, max_hw=5):
    n, c, f = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(paddings)
    pads, extra = L.resolve_transpose_padding(padding, (h, w), kernel, stride)
    ho, wo = L.conv_transpose_output_hw((h, w), kernel, stride, pads, extra)
    assume(ho >= 1 and wo >= 1)
    return {"n": n, "c": c, "f": f, "h": h, "w": w, "kernel": kernel, "stride": stride,
            "padding": padding, "pads": pads, "extra": extra, "out_hw": (ho, wo)}


def _tconv_inputs(cfg, rng, dtype=np.float64):
    x = rng.standard_normal((cfg["n"], cfg["c"], cfg["h"], cfg["w"])).astype(dtype)
    w = rng.standard_normal((cfg["c"], cfg["f"], *cfg["kernel"])).astype(dtype)
    b = rng.standard_normal(cfg["f"]).astype(dtype)
    return x, w, b


@settings(max_examples=20)
@given(cfg=tconv_configs(), seed=seeds)
def test_conv2d_transpose_forward_equals_naive_scatter(cfg, seed):
    rng = np.random.default_rng(seed)
    x, w, b = _tconv_inputs(cfg, rng)
    out, _ = L.conv2d_transpose_forward(x, w, b, cfg["stride"], cfg["pads"], cfg["extra"])
    assert out.shape == (cfg["n"], cfg["f"], *cfg["out_hw"])
    np.testing.assert_allclose(out, naive_conv2d_transpose(x, w, b, cfg["stride"], cfg["pads"],
                                                           cfg["extra"]), rtol=1e-12, atol=1e-12)


@settings(max_examples=20)
@given(cfg=tconv_configs(), seed=seeds)
def test_conv2d_transpose_gradients_match_finite_differences(cfg, seed):
    rng = np.random.default_rng(seed)
    x, w, b = _tconv_inputs(cfg, rng)
    args = (cfg["stride"], cfg["pads"], cfg["extra"])

    def fwd(x_=x, w_=w, b_=b):
        return L.conv2d_transpose_forward(x_, w_, b_, *args)[0]

    out, cache = L.conv2d_transpose_forward(x, w, b, *args)
    dout = rng.standard_normal(out.shape)
    dx, g = L.conv2d_transpose_backward(dout, cache)
    assert dx.shape == x.shape and g["w"].shape == w.shape and g["b"].shape == b.shape
    scale = np.abs(out * dout).sum()
    check_directional(projected(lambda a: fwd(x_=a), dout), x, dx, rng, scale=scale,
                      what=f"tconv dx {cfg}")
    check_directional(projected(lambda a: fwd(w_=a), dout), w, g["w"], rng, scale=scale,
                      what=f"tconv dw {cfg}")
    check_directional(projected(lambda a: fwd(b_=a), dout), b, g["b"], rng, scale=scale,
                      what=f"tconv db {cfg}")
    dx2, g2 = L.conv2d_transpose_backward(dout, cache, need_params=False)
    assert g2 == {} and np.array_equal(dx2, dx)


@pytest.mark.parametrize("h,k,s", [(7, 3, 2), (5, 3, 1), (4, 2, 3), (6, 4, 2)])
def test_conv2d_transpose_same_is_the_adjoint_of_conv2d_same(h, k, s):
    # conv2d 'same' maps (h*s) -> h; its adjoint under <., .> is the transposed conv 'same'.
    rng = np.random.default_rng(h * 100 + k * 10 + s)
    x = rng.standard_normal((2, 3, h, h + 1))
    w = rng.standard_normal((3, 2, k, k))
    pads, extra = L.resolve_transpose_padding("same", (h, h + 1), (k, k), (s, s))
    out, _ = L.conv2d_transpose_forward(x, w, np.zeros(2), (s, s), pads, extra)
    assert out.shape == (2, 2, h * s, (h + 1) * s)
    y = rng.standard_normal(out.shape)
    cpads = L.resolve_padding("same", out.shape[2:], (k, k), (s, s))
    cy, _ = L.conv2d_forward(y, w, np.zeros(3), (s, s), cpads)
    assert cy.shape == x.shape
    np.testing.assert_allclose(np.vdot(cy, x), np.vdot(y, out), rtol=1e-12)


@settings(max_examples=25)
@given(cfg=tconv_configs(max_hw=6), seed=seeds, dtype=st.sampled_from([np.float32, np.float64]))
def test_numba_cpu_conv2d_transpose_matches_reference(cfg, seed, dtype):
    from advkern.kernels.numba_cpu import transpose as T
    rng = np.random.default_rng(seed)
    x, w, b = _tconv_inputs(cfg, rng, dtype)
    args = (cfg["stride"], cfg["pads"], cfg["extra"])
    o1, c1 = L.conv2d_transpose_forward(x, w, b, *args)
    o2, c2 = T.conv2d_transpose_forward(x, w, b, *args)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    assert o2.dtype == dtype and o2.shape == o1.shape
    np.testing.assert_allclose(o2, o1, rtol=tol, atol=tol * 10)
    dout = rng.standard_normal(o1.shape).astype(dtype)
    dx1, g1 = L.conv2d_transpose_backward(dout, c1)
    dx2, g2 = T.conv2d_transpose_backward(dout, c2)
    np.testing.assert_allclose(dx2, dx1, rtol=tol, atol=tol * 10)
    for k in ("w", "b"):
        np.testing.assert_allclose(g2[k], g1[k], rtol=tol, atol=tol * 10)
    assert T.conv2d_transpose_backward(dout, c2, need_params=False)[1] == {}


def test_conv2d_transpose_spec_shapes_config_and_model_file(tmp_path):
    layer = Conv2DTranspose(4, 3, 2, "same")
    assert layer.output_shape((2, 7, 5)) == (4, 14, 10)
    assert Conv2DTranspose(4, 3, 1, "valid").output_shape((2, 7, 5)) == (4, 9, 7)
    assert Conv2DTranspose(4, (2, 3), (2, 1), 1).output_shape((2, 3, 3)) == (4, 4, 3)
    assert layer.param_shapes((2, 7, 5)) == {"w": (2, 4, 3, 3), "b": (4,)}
    for spec in (layer, Conv2DTranspose(2, (2, 3), (1, 2), [1, 0, 2, 1]), Reshape((2, 3, 4))):
        cfg = json.loads(json.dumps(spec.to_config()))
        assert layer_from_config(cfg) == spec
    with pytest.raises(ShapeError, match="filters"):
        Conv2DTranspose(0)
    with pytest.raises(ShapeError, match="padding"):
        Conv2DTranspose(2, 3, 1, "full")
    with pytest.raises(ShapeError, match="crops the whole"):
        Conv2DTranspose(2, 1, 1, 3).output_shape((1, 2, 2))
    with pytest.raises(ShapeError, match="reshape"):
        Reshape((3, 3)).output_shape((10,))
    # a Sequential decoder with Reshape + Conv2DTranspose runs, saves and loads bit-exactly
    m = Sequential([Dense(2 * 3 * 3), ReLU(), Reshape((2, 3, 3)), Conv2DTranspose(2, 3, 2, "same"),
                    ReLU(), Conv2DTranspose(1, 3, 1, "same"), Flatten(), Dense(3)], (4,), seed=3)
    assert m.shapes[4] == (2, 6, 6)
    path = save(m, tmp_path / "dec.npz")
    m2 = load(path)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_array_equal(m2.logits(x), m.logits(x))


# ----------------------------------------------------------------------------- VAE math


def _randomized(vae, seed):
    rng = np.random.default_rng(seed)
    out = []
    for m in (vae.encoder, vae.decoder):
        ps = []
        for p in m.params:
            q = {}
            for k, a in p.items():
                fan = int(np.prod(a.shape[1:])) if k == "w" and a.ndim == 4 else a.shape[0]
                q[k] = rng.standard_normal(a.shape) * (0.3 if k == "b" else 1.0 / np.sqrt(fan))
            ps.append(q)
        out.append(Sequential(m.layers, m.input_shape, ps, name=m.name))
    return VAE(out[0], out[1], vae.latent, vae.kind)


def _tiny_vae(kind, seed=0):
    if kind == "conv":
        v = build_vae("conv", latent=2, filters=(2, 3), input_shape=(1, 8, 8), seed=seed)
    else:
        v = build_vae("dense", latent=3, hidden=6, input_shape=(1, 4, 4), seed=seed)
    return _randomized(v, seed + 7)


def test_kl_and_bce_pieces_match_their_formulas():
    rng = np.random.default_rng(0)
    mu, lv = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    kl, dmu, dlv = RV.kl_standard_normal(mu, lv)
    # closed form of KL(N(mu, s^2) || N(0, 1)) per coordinate: log(1/s) + (s^2 + mu^2)/2 - 1/2
    s = np.exp(lv / 2)
    np.testing.assert_allclose(kl, np.sum(-np.log(s) + (s * s + mu * mu) / 2 - 0.5, axis=1))
    check_directional(lambda a: RV.kl_standard_normal(a, lv)[0].sum(), mu, dmu, rng)
    check_directional(lambda a: RV.kl_standard_normal(mu, a)[0].sum(), lv, dlv, rng)
    logits = np.array([[-800.0, -3.0, 0.0, 2.0, 800.0]])
    x = np.array([[0.0, 0.2, 0.5, 1.0, 0.7]])
    loss, dl, _ = RV.bce_with_logits(logits, x)
    assert np.isfinite(loss).all() and np.isfinite(dl).all()
    p = 1 / (1 + np.exp(-logits[0, 1:4]))
    want = -(x[0, 1:4] * np.log(p) + (1 - x[0, 1:4]) * np.log(1 - p))
    # the two extreme logits: softplus(-800) - 0 = 0 and softplus(800) - 0.7 * 800 = 240
    np.testing.assert_allclose(loss[0], want.sum() + 0 + 240.0, rtol=1e-12)
    lg = rng.standard_normal((3, 5))
    xt = rng.uniform(0, 1, (3, 5))
    check_directional(lambda a: RV.bce_with_logits(a, xt)[0].sum(), lg,
                      RV.bce_with_logits(lg, xt)[1], rng)


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_whole_elbo_gradient_matches_finite_differences(kind):
    vae = _tiny_vae(kind)
    rng = np.random.default_rng(1)
    x = rng.uniform(0.05, 0.95, (3, *vae.input_shape))
    eps = rng.standard_normal((3, vae.latent))
    out = RV.neg_elbo(vae, x, eps, need_dx=True)
    np.testing.assert_allclose(out["loss"], out["rec"] + out["kl"])

    def total():
        return RV.neg_elbo(vae, x, eps, need_params=False)["loss"].sum()

    scale = abs(total())
    for part, grads in (("encoder", out["enc_grads"]), ("decoder", out["dec_grads"])):
        for i, (p, g) in enumerate(zip(getattr(vae, part).params, grads)):
            for k in p:
                old = p[k].copy()

                def f(a, p=p, k=k):
                    p[k] = a
                    try:
                        return total()
                    finally:
                        p[k] = old
                check_directional(f, old, g[k], rng, n_dirs=1, scale=scale,
                                  what=f"{kind} {part} layer {i} {k}")
    check_directional(lambda a: RV.neg_elbo(vae, a, eps, need_params=False)["loss"].sum(), x,
                      out["dx"], rng, scale=scale, what=f"{kind} dx")


def _tiny_classifier(input_shape, seed=0):
    m = Sequential([Flatten(), Dense(5), ReLU(), Dense(4)], input_shape, seed=seed,
                   dtype=np.float64)
    rng = np.random.default_rng(seed + 1)
    ps = [{k: rng.standard_normal(a.shape) * (0.5 if k == "b" else 1.5) for k, a in p.items()}
          for p in m.params]
    return Sequential(m.layers, input_shape, ps)


def _check_score_gradients(clf, vae, x, y, lam, score, rng, what):
    """detection_score_grad against detection_score: the value, dS/dx and the adaptive
    objective CE - lam * S with its dJ/dx, by central differences."""
    s = RV.detection_score(clf, vae, x, score=score)
    assert (s >= 0).all() and s.max() > 1e-3
    val, s2, g = RV.detection_score_grad(clf, vae, x, score=score)
    np.testing.assert_allclose(val, s)
    np.testing.assert_allclose(s2, s)
    check_directional(lambda a: RV.detection_score(clf, vae, a, score=score).sum(), x, g, rng,
                      scale=s.sum(), what=f"{what} dS/dx")
    val, _, g = RV.detection_score_grad(clf, vae, x, y, lam, score=score)

    def obj(a):
        ce = -log_softmax(clf.logits(a))[np.arange(len(a)), y]
        return (ce - lam * RV.detection_score(clf, vae, a, score=score)).sum()
    np.testing.assert_allclose(val.sum(), obj(x), rtol=1e-12)
    check_directional(obj, x, g, rng, scale=abs(obj(x)), what=f"{what} adaptive dJ/dx")


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_detection_score_and_adaptive_objective_gradients(kind):
    vae = _tiny_vae(kind, seed=2)
    clf = _tiny_classifier(vae.input_shape, seed=4)
    rng = np.random.default_rng(3)
    x = rng.uniform(0.05, 0.95, (3, *vae.input_shape))
    # the definition, written out
    lp = log_softmax(clf.logits(x))
    lq = log_softmax(clf.logits(RV.reconstruct(vae, x)))
    np.testing.assert_allclose(RV.detection_score(clf, vae, x),
                               np.sum(np.exp(lp) * (lp - lq), axis=1), rtol=1e-12)
    _check_score_gradients(clf, vae, x, np.array([0, 2, 3]), 2.5, "classifier", rng, kind)


@pytest.mark.parametrize("kind", ["conv", "dense"])
def test_image_score_and_its_adaptive_objective_gradients(kind):
    vae = _tiny_vae(kind, seed=2)
    clf = _tiny_classifier(vae.input_shape, seed=4)
    rng = np.random.default_rng(5)
    # the definition, written out: each image a distribution over its pixels (with black
    # background pixels, the floor's case)
    x0 = rng.uniform(0.0, 1.0, (3, *vae.input_shape))
    x0[0].reshape(-1)[:4] = 0.0
    c = RV.IMAGE_FLOOR
    a = x0.reshape(3, -1) + c
    b = RV.reconstruct(vae, x0).reshape(3, -1) + c
    p, q = a / a.sum(1, keepdims=True), b / b.sum(1, keepdims=True)
    np.testing.assert_allclose(RV.detection_score(None, vae, x0, score="image"),
                               np.sum(p * np.log(p / q), axis=1), rtol=1e-12)
    # gradients away from the floor (at a pixel of 0 the curvature is ~1 / c: finite
    # differences, not the gradient, break down there)
    x = rng.uniform(0.05, 0.95, (3, *vae.input_shape))
    _check_score_gradients(clf, vae, x, np.array([1, 0, 3]), 3.0, "image", rng,
                           f"{kind} image")


def test_image_score_is_zero_for_a_perfect_reconstruction_and_unknown_scores_fail():
    x = np.random.default_rng(0).uniform(0, 1, (2, 16))
    kl, da, db = RV._kl_images(x, x.copy())
    np.testing.assert_allclose(kl, 0, atol=1e-15)
    np.testing.assert_allclose(da, 0, atol=1e-15)
    np.testing.assert_allclose(db, 0, atol=1e-15)
    with pytest.raises(AdvkernError, match="detection score"):
        RV.detection_score(None, _tiny_vae("dense"), x.reshape(2, 1, 4, 4), score="pixels")


def test_score_is_zero_when_the_classifier_ignores_the_image():
    vae = _tiny_vae("dense")
    clf = Sequential([Flatten(), Dense(3)], vae.input_shape,
                     [{}, {"w": np.zeros((16, 3)), "b": np.array([0.1, -2.0, 1.0])}])
    x = np.random.default_rng(0).uniform(0, 1, (4, *vae.input_shape))
    np.testing.assert_allclose(RV.detection_score(clf, vae, x), 0, atol=1e-15)


# ----------------------------------------------------------------------------- AUC


def _auc_pairs(neg, pos):
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


@given(neg=st.lists(st.integers(0, 5), min_size=1, max_size=12),
       pos=st.lists(st.integers(0, 5), min_size=1, max_size=12))
def test_roc_auc_equals_pair_counting_with_ties(neg, pos):
    assert vd.roc_auc(neg, pos) == pytest.approx(_auc_pairs(neg, pos), abs=1e-12)


def test_roc_auc_and_thresholds_edge_cases():
    assert vd.roc_auc([0, 1], [2, 3]) == 1.0
    assert vd.roc_auc([2, 3], [0, 1]) == 0.0
    assert vd.roc_auc([1, 1], [1]) == 0.5
    assert np.isnan(vd.roc_auc([], [1.0]))
    neg = np.arange(100, dtype=float)
    t = vd.threshold_at_fpr(neg, 0.05)
    assert t == 94.0 and np.mean(neg > t) == 0.05
    assert vd.rates(neg, [94.0, 95.0], t) == (0.5, 0.05)
    rng = np.random.default_rng(0)
    for n in (1, 7, 33):
        s = rng.standard_normal(n)
        t = vd.threshold_at_fpr(s, 0.05)
        assert np.mean(s > t) <= 0.05 and (np.mean(s >= t) > 0.05 or t == s.min())


# ----------------------------------------------------------------------------- training, cache


def test_vae_training_is_seeded_and_lowers_the_loss(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.uniform(0, 1, (64, 1, 4, 4)) > 0.5).astype(np.float32)
    v = build_vae("dense", latent=2, hidden=8, input_shape=(1, 4, 4), seed=1)
    a, ha = train_vae(v, x, epochs=6, lr=1e-2, batch_size=16, seed=5, progress=False)
    b, _ = train_vae(v, x, epochs=6, lr=1e-2, batch_size=16, seed=5, progress=False)
    c, _ = train_vae(v, x, epochs=6, lr=1e-2, batch_size=16, seed=6, progress=False)
    assert ha[-1]["loss"] < ha[0]["loss"]
    assert all(np.array_equal(p[k], q[k]) for p, q in zip(a.params, b.params) for k in p)
    assert not all(np.array_equal(p[k], q[k]) for p, q in zip(a.params, c.params) for k in p)
    assert all(np.array_equal(p[k], q[k]) for p, q in zip(v.params, build_vae(
        "dense", latent=2, hidden=8, input_shape=(1, 4, 4), seed=1).params) for k in p)
    path = save_vae(a, tmp_path / "v.npz")
    r = load_vae(path)
    assert (r.latent, r.kind) == (2, "dense")
    np.testing.assert_array_equal(r.reconstruct(x), a.reconstruct(x))


def test_pretrained_vae_caches_by_recipe(tmp_path, monkeypatch):
    from advkern.nets import vae as V
    monkeypatch.setenv("ADVKERN_CACHE", str(tmp_path))
    monkeypatch.setitem(V.VAE_RECIPES, "dense", {"latent": 2, "hidden": 4, "epochs": 1,
                                                "lr": 1e-3, "batch_size": 500})
    a, ia = V.pretrained_vae("dense", progress=False)
    b, ib = V.pretrained_vae("dense", progress=False)
    assert not ia["cached"] and ib["cached"] and ia["path"] == ib["path"]
    assert all(np.array_equal(p[k], q[k]) for p, q in zip(a.params, b.params) for k in p)
    _, ic = V.pretrained_vae("dense", progress=False, hidden=5)
    assert not ic["cached"] and ic["path"] != ia["path"]


# ----------------------------------------------------------------------------- end to end


def test_vae_detect_quick_end_to_end(tmp_path):
    from advkern.nets.datasets import load_mnist
    from advkern.nets.train import train
    x, y = load_mnist("train")
    clf, _ = train(Sequential([Flatten(), Dense(32), ReLU(), Dense(10)], (1, 28, 28), seed=0),
                   x[:1000], y[:1000], epochs=2, lr=3e-3, progress=False)
    mpath = save(clf, tmp_path / "clf.npz")
    vae, _ = train_vae(build_vae("dense", latent=4, hidden=32, seed=0), x[:1000], epochs=2,
                       progress=False)
    lines = []
    res = vd.run(models=[str(mpath)], out=tmp_path / "out", quick=True, backend="numpy",
                 log=lines.append, vaes={"dense": vae}, lambdas=(0.0, 10.0),
                 sizes={"clean": 40, "fgsm": 40, "pgd": 20, "jsma": 4, "pixel": 4,
                        "adaptive": 10})
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["experiment"] == "vae-detect" and saved["quick"] is True
    key = "clf/dense"
    det = saved["detectors"][key]
    for attack in ("fgsm", "pgd", "jsma", "pixel"):
        a = det["attacks"][attack]
        assert set(a) >= {"auc", "auc_all_adversarials", "detection_at_0.3", "fpr_at_0.3",
                          "detection_at_5fpr", "fpr_at_5fpr"}
        assert a["fpr_at_5fpr"] <= 0.05
    # PGD eps 0.3 fools a 2-epoch 32-unit MLP on (nearly) every image
    assert saved["attacks"]["clf"]["pgd"]["success_rate"] > 0.5
    assert 0 <= det["attacks"]["pgd"]["auc"] <= 1
    # the seed's literal reading: KL between the image and its reconstruction as pixel
    # distributions (this 2-epoch VAE's blurry reconstructions are no test of its power)
    img = saved["detectors_image"][key]
    assert set(img["attacks"]) == {"fgsm", "pgd", "jsma", "pixel"}
    assert 0 <= img["attacks"]["pgd"]["auc"] <= 1 and img["attacks"]["pgd"]["fpr_at_5fpr"] <= 0.05
    for akey in ("adaptive", "adaptive_image"):
        rows = saved[akey][key]["rows"]
        assert [r["lambda"] for r in rows] == [0.0, 10.0]
        assert all(0 <= r["attack_success"] <= 1 for r in rows)
    for fig in saved["figures"].values():
        assert (tmp_path / "out" / fig).stat().st_size > 1000
    assert {"hist_clf_dense", "hist_clf_dense_image", "recon_clf_dense"} <= set(saved["figures"])
    assert res["targets"] == [] or all("mlp" in t["name"] for t in res["targets"])
