"""``verify`` on L2 steps (PGD with norm l2) and on random-start PGD with the candidate's own
draws (``x_start``), against float32 attacks written independently in plain NumPy: the
bundled mlp's forward and backward with its input features and hidden units permuted (other
summation orders in every GEMM) and a softmax computed as exp / sum. Such a candidate differs
from our float32 reference by rounding (and, on saturated images, by whole steps): verify
must call every difference a tie and agree, and must still catch one pixel moved by 0.05."""

import json

import numpy as np
import pytest

from advkern import cli
from advkern.attacks import run_attack
from advkern.errors import AdvkernError, ShapeError
from advkern.nets import save
from advkern.nets.datasets import load_mnist
from advkern.reference.gradient_attacks import random_init

from _helpers import mlp_grad32_permuted
from advkern._validate import per_sample_rngs
from advkern.verify import TIE_CLASSES, _setup, _tie_masks, compare, replay_pgd

N = 40
L2 = {"eps": 2.0, "alpha": 0.2, "steps": 10, "norm": "l2"}
LINF = {"eps": 0.1, "alpha": 0.01, "steps": 10, "norm": "inf"}


_grad32 = mlp_grad32_permuted


def pgd32(model, x, y, x0, eps, alpha, steps, norm):
    """Float32 PGD from x0 (no early stop): L2 (normalised step, guarded, radial projection)
    or L-inf (sign step, per-feature clip), then the box [0, 1]."""
    xf = x.reshape(len(x), -1).astype(np.float32)
    xa = x0.reshape(len(x), -1).astype(np.float32)
    eps, alpha = np.float32(eps), np.float32(alpha)
    for _ in range(steps):
        g = _grad32(model, xa, y)
        if norm == "l2":
            n = np.sqrt((g * g).sum(axis=1, keepdims=True))
            d = xa + alpha * g / np.where(n > 0, n, 1) - xf
            dn = np.sqrt((d * d).sum(axis=1, keepdims=True))
            d = d * np.minimum(np.float32(1), eps / np.where(dn > 0, dn, 1))
        else:
            d = np.clip(xa + alpha * np.sign(g) - xf, -eps, eps)
        xa = np.clip(xf + d, 0, 1)
    return xa.reshape(x.shape)


def own_start(x, eps, norm, seed=1):
    """The candidate's random start, drawn with its own generator (not advkern's)."""
    rng = np.random.default_rng(seed)
    xf = x.reshape(len(x), -1).astype(np.float32)
    if norm == "l2":
        u = rng.standard_normal(xf.shape).astype(np.float32)
        u *= np.float32(eps) * rng.uniform(size=(len(x), 1)).astype(np.float32) \
            / np.linalg.norm(u, axis=1, keepdims=True)
    else:
        u = rng.uniform(-eps, eps, size=xf.shape).astype(np.float32)
    return np.clip(xf + u, 0, 1).reshape(x.shape)


@pytest.fixture(scope="module")
def data(trained):
    x, y = load_mnist("test")
    return trained("mlp").astype(np.float32), x[:N], y[:N]


def _moved_pixel(x, xa, i, avoid=None):
    """A pixel of image i the attack moved, in [0.06, 0.94] so that +-0.05 stays in the box."""
    d = np.abs(xa[i] - x[i]).ravel()
    v = xa[i].ravel()
    ok = (v > 0.06) & (v < 0.94) & (avoid is None or ~avoid)
    return int(np.argmax(np.where(ok, d, -1)))


def _one_wrong_pixel(cand, i, j):
    bad = cand.copy()
    f = bad[i].reshape(-1)
    f[j] += np.float32(0.05) if f[j] < 0.5 else np.float32(-0.05)
    return bad


def _check_l2_report(rep):
    s = rep["summary"]
    assert s["tie_analysis"] == "l2", s
    assert s["n_diff"] > 100, s                       # the implementations really differ
    assert s["agree"] and s["diff_explained_by_ties"] == s["n_diff"], s
    assert set(s["ties_by_class"]) == set(TIE_CLASSES)
    assert sum(s["ties_by_class"].values()) == s["n_diff"]
    assert s["ties_by_class"]["rounding"] > 0 and s["ties_by_class"]["near_zero"] == 0
    return s


def _tight_image(rep):
    """An image whose differences are all explained by a bound far below 0.05."""
    imgs = [r for r in rep["images"] if r["rounding_bound"] < 0.005 and r["n_diff"] > 0
            and r["n_tie"] == r["n_diff"]]
    assert imgs, [r["rounding_bound"] for r in rep["images"]]
    return imgs[0]["index"]


def test_l2_pgd_float32_candidate_agrees_and_a_wrong_pixel_is_caught(data):
    m, x, y = data
    ours = run_attack(m, x, y, "pgd", backend="reference", **L2)
    cand = pgd32(m, x, y, x, L2["eps"], L2["alpha"], L2["steps"], "l2")
    rep = compare(m, x, y, ours, cand, "pgd", L2)
    _check_l2_report(rep)
    i = _tight_image(rep)
    j = _moved_pixel(x, cand, i)
    s2 = compare(m, x, y, ours, _one_wrong_pixel(cand, i, j), "pgd", L2)["summary"]
    assert not s2["agree"] and s2["n_diff"] - s2["diff_explained_by_ties"] == 1, s2
    # the same candidate judged as float64 has no float32 rounding to invoke
    s3 = compare(m, x, y, ours, cand.astype(np.float64), "pgd", L2)["summary"]
    assert not s3["agree"] and s3["ties_by_class"]["rounding"] == 0


def test_l2_random_start_with_the_candidates_draws(data):
    m, x, y = data
    kw = {**L2, "random_start": True}
    x0 = own_start(x, L2["eps"], "l2")
    x0_before = x0.copy()
    cand = pgd32(m, x, y, x0, L2["eps"], L2["alpha"], L2["steps"], "l2")
    rep = compare(m, x, y, None, cand, "pgd", kw, x_start=x0)
    assert np.array_equal(x0, x0_before)
    _check_l2_report(rep)
    i = _tight_image(rep)
    j = _moved_pixel(x, cand, i)
    s2 = compare(m, x, y, None, _one_wrong_pixel(cand, i, j), "pgd", kw, x_start=x0)["summary"]
    assert not s2["agree"] and s2["n_diff"] - s2["diff_explained_by_ties"] == 1, s2


def _linf_rs(data):
    m, x, y = data
    kw = {**LINF, "random_start": True}
    x0 = own_start(x, LINF["eps"], "inf")
    cand = pgd32(m, x, y, x0, LINF["eps"], LINF["alpha"], LINF["steps"], "inf")
    return m, x, y, kw, x0, cand


def test_linf_random_start_independent_candidate_agrees(data):
    """After a sign tie the candidate's float32 trajectory leaves ours; the 'propagated' shadow
    (every tie on its other branch) is elsewhere by then, and the last differences are
    explained by the branch search: a trajectory that takes only some ties the other way
    ends at the candidate's values."""
    m, x, y, kw, x0, cand = _linf_rs(data)
    s = compare(m, x, y, None, cand, "pgd", kw, x_start=x0)["summary"]
    assert s["agree"] and s["diff_explained_by_ties"] == s["n_diff"], s
    assert s["ties_by_class"]["branch"] > 0, s


def test_linf_random_start_wrong_pixel_on_a_diverged_image_is_caught(data):
    """On an image whose float32 trajectory left ours (its differences explained, some by the
    branch search), one pixel that is no tie, moved by 0.05, stays unexplained: the search
    explains a value only where a trajectory through ties ends at it."""
    m, x, y, kw, x0, cand = _linf_rs(data)
    rep = compare(m, x, y, None, cand, "pgd", kw, x_start=x0)
    s = rep["summary"]
    st = _setup(m, x, y, "pgd", kw)
    ref = replay_pgd(m, x, st, x0)
    masks = _tie_masks(m, x, st, 1e-4, np.float32, x0, cand=cand, ref=ref)
    tie = np.any([masks[c] for c in TIE_CLASSES], axis=0)
    diverged = [r["index"] for r in rep["images"] if r["n_diff"] and r["n_tie"] == r["n_diff"]
                and masks["branch"][r["index"]].any() and not masks["saturated"][r["index"]].any()]
    assert diverged, s
    i = diverged[0]
    j = _moved_pixel(x, cand, i, avoid=tie[i] | (np.abs(cand[i] - ref[i]) > 0).ravel())
    assert not tie[i, j] and cand[i].ravel()[j] == ref[i].ravel()[j]
    s2 = compare(m, x, y, None, _one_wrong_pixel(cand, i, j), "pgd", kw, x_start=x0)["summary"]
    assert not s2["agree"] and s2["n_diff"] == s["n_diff"] + 1, s2
    assert s2["diff_explained_by_ties"] == s["diff_explained_by_ties"], s2


def test_linf_random_start_with_the_candidates_draws(data):
    m, x, y, kw, x0, cand = _linf_rs(data)
    rep = compare(m, x, y, None, cand, "pgd", kw, x_start=x0)
    s = rep["summary"]
    assert s["tie_analysis"] == "sign" and s["n_diff"] > 20, s
    assert sum(s["ties_by_class"].values()) == s["diff_explained_by_ties"]
    assert s["diff_explained_by_ties"] >= 0.95 * s["n_diff"], s
    # without the draws the start is ours: nearly everything differs and nothing is explained
    ours = run_attack(m, x, y, "pgd", backend="reference", **kw)
    s0 = compare(m, x, y, ours, cand, "pgd", kw)["summary"]
    assert not s0["agree"] and s0["ties_by_class"] is None and "x_start" in s0["tie_note"]
    assert s0["n_diff"] > 10 * s["n_diff"]
    # one pixel that is no tie on any step, moved by 0.05: exactly one more unexplained
    st = _setup(m, x, y, "pgd", kw)
    masks = _tie_masks(m, x, st, 1e-4, np.float32, x0)
    tie = np.any([masks[c] for c in TIE_CLASSES], axis=0)
    i = next(r["index"] for r in rep["images"] if r["n_diff"] == 0
             and not tie[r["index"]].all())
    j = _moved_pixel(x, cand, i, avoid=tie[i])
    assert not tie[i, j]
    s2 = compare(m, x, y, None, _one_wrong_pixel(cand, i, j), "pgd", kw, x_start=x0)["summary"]
    assert not s2["agree"] and s2["n_diff"] == s["n_diff"] + 1
    assert s2["n_diff"] - s2["diff_explained_by_ties"] == s["n_diff"] - s["diff_explained_by_ties"] + 1


@pytest.mark.parametrize("norm,eps,alpha", [("inf", 0.1, 0.02), ("l2", 2.0, 0.3)])
@pytest.mark.parametrize("early_stop", [False, True])
def test_replay_from_our_own_draw_is_the_reference(data, norm, eps, alpha, early_stop):
    """The replay from x_start is exactly the reference PGD when x_start is its own draw."""
    m, x, y = data
    kw = {"eps": eps, "alpha": alpha, "steps": 5, "norm": norm, "random_start": True,
          "early_stop": early_stop}
    ours = run_attack(m, x, y, "pgd", backend="reference", seed=3, **kw)
    x0 = random_init(x, eps, norm, per_sample_rngs(3, len(x)), (0.0, 1.0))
    assert np.array_equal(replay_pgd(m, x, _setup(m, x, y, "pgd", kw), x0), ours.x_adv)
    s = compare(m, x, y, None, ours.x_adv, "pgd", kw, x_start=x0)["summary"]
    assert s["agree"] and s["n_diff"] == 0 and s["ties_by_class"] is not None


def test_x_start_is_validated(data):
    m, x, y = data
    kw = {**L2, "random_start": True}
    x0 = own_start(x, 2.0, "l2")
    cand = x0.copy()
    bad = {"shape": (x0[:, :, :5], ShapeError, "x_start"),
           "nan": (np.where(np.arange(x0.size).reshape(x0.shape) == 7, np.nan, x0), AdvkernError,
                   "x_start"),
           "ball": (np.clip(x + 0.5, 0, 1), AdvkernError, "ball"),
           "box": (x0 + np.float32(0.01), AdvkernError, "box"),
           "dtype": (x0.astype(np.int64), AdvkernError, "x_start")}
    for name, (xs, err, word) in bad.items():
        with pytest.raises(err, match=word):
            compare(m, x, y, None, cand, "pgd", kw, x_start=xs)
    with pytest.raises(AdvkernError, match="restarts"):
        compare(m, x, y, None, cand, "pgd", {**kw, "restarts": 2}, x_start=x0)
    with pytest.raises(AdvkernError, match="random_start"):
        compare(m, x, y, None, cand, "pgd", L2, x_start=x0)
    with pytest.raises(AdvkernError, match="random_start"):
        compare(m, x, y, None, cand, "fgsm", {"eps": 0.1}, x_start=x0)


def _cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("random_start", [False, True])
def test_cli_verify_l2(capsys, data, tmp_path, random_start):
    m, x, y = data
    model = save(m, tmp_path / "mlp.npz")
    x, y = x[:20], y[:20]
    x0 = own_start(x, 2.0, "l2") if random_start else x
    cand = pgd32(m, x, y, x0, 2.0, 0.2, 10, "l2")
    extra = {"x_start": x0} if random_start else {}
    np.savez(tmp_path / "c.npz", x=x, y=y, x_adv=cand, **extra)
    argv = ["verify", "--model", model, "--attack", "pgd", "--norm", "2", "--eps", "2",
            "--alpha", "0.2", "--steps", "10", "--backend", "reference",
            "--candidate", tmp_path / "c.npz"] + (["--random-start"] if random_start else [])
    rc, out, err = _cli(capsys, *argv)
    assert rc == 0, (out, err)
    assert "differing pixels are L2-step ties" in out and "ties by class" in out
    rc, out, err = _cli(capsys, *argv, "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["summary"]["agree"] and rep["summary"]["tie_analysis"] == "l2"
    i = _tight_image(rep)
    np.savez(tmp_path / "c.npz", x=x, y=y, x_adv=_one_wrong_pixel(cand, i, _moved_pixel(x, cand, i)),
             **extra)
    rc, out, err = _cli(capsys, *argv)
    assert rc == 1, (out, err)
    if random_start:  # without the draws: n/a, and the message says how to enable it
        np.savez(tmp_path / "c.npz", x=x, y=y, x_adv=cand)
        rc, out, err = _cli(capsys, *argv)
        assert rc == 1 and "tie analysis n/a" in out and "x_start" in out
