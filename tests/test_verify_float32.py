"""``verify`` against a float32 implementation written independently: plain NumPy FGSM on
the bundled mlp with its input features and hidden units permuted (the same function, other
summation orders in every GEMM) and a softmax computed as exp / sum rather than by
log-sum-exp. Its sign steps differ from ours wherever float32 cannot decide the gradient's
sign (saturated softmaxes, gradients within rounding of 0): verify must call every such pixel
a tie and agree, and must still catch one genuinely wrong pixel."""

import numpy as np

from advkern.attacks import run_attack
from advkern.nets.datasets import load_mnist
from advkern.reference import network
from advkern.verify import TIE_CLASSES, compare

from _helpers import mlp_grad32_permuted


def fgsm32_permuted(model, x, y, eps, seed=0):
    g = mlp_grad32_permuted(model, x, y, seed)
    return np.clip(x + np.float32(eps) * np.sign(g).reshape(x.shape), 0, 1).astype(np.float32)


def test_verify_agrees_with_an_independent_float32_fgsm_and_catches_a_wrong_pixel(trained):
    x, y = load_mnist("test")
    m = trained("mlp").astype(np.float32)
    ours = run_attack(m, x, y, "fgsm", eps=0.1, backend="reference")
    cand = fgsm32_permuted(m, x, y, 0.1)
    rep = compare(m, x, y, ours, cand, "fgsm", {"eps": 0.1})
    s = rep["summary"]
    # the implementations really differ (else this test would prove nothing) ...
    assert s["n_diff"] > 100, s
    # ... and every difference is a float32 tie, of the classes the report names
    assert s["agree"] and s["diff_explained_by_ties"] == s["n_diff"], s
    assert set(s["ties_by_class"]) == set(TIE_CLASSES)
    assert sum(s["ties_by_class"].values()) == s["n_diff"]
    assert s["ties_by_class"]["saturated"] > 0 and s["ties_by_class"]["rounding"] > 0

    # one genuinely wrong pixel: the step against the sign of a large float64 gradient
    _, g = network.loss_and_input_grad(m.astype(np.float64), x[:1].astype(np.float64), y[:1])
    i = int(np.abs(g.ravel()).argmax())
    bad = cand.copy()
    flat = bad[0].reshape(-1)
    flat[i] = np.clip(x[0].reshape(-1)[i] - 0.1 * np.sign(g.ravel()[i]), 0, 1)
    s2 = compare(m, x, y, ours, bad, "fgsm", {"eps": 0.1})["summary"]
    assert not s2["agree"] and s2["n_diff"] - s2["diff_explained_by_ties"] == 1


def test_verify_mi_fgsm_own_output_and_a_wrong_pixel(trained):
    """MI-FGSM's sign steps are the momentum's: our own run agrees; one pixel stepped against
    the sign of a large momentum is caught."""
    x, y = load_mnist("test")
    x, y = x[:200], y[:200]
    m = trained("mlp").astype(np.float32)
    kw = {"eps": 0.1, "steps": 5}
    ours = run_attack(m, x, y, "mifgsm", backend="reference", **kw)
    rep = compare(m, x, y, ours, ours.x_adv.copy(), "mifgsm", kw)
    assert rep["summary"]["agree"] and rep["summary"]["n_diff"] == 0
    assert rep["summary"]["ties_by_class"] is not None       # the tie analysis ran
    bad = ours.x_adv.copy()
    d = (bad[0] - x[0]).reshape(-1)
    i = int(np.abs(d).argmax())                 # a pixel the attack moved by a full eps
    bad[0].reshape(-1)[i] = np.clip(x[0].reshape(-1)[i] - d[i], 0, 1)
    s = compare(m, x, y, ours, bad, "mifgsm", kw)["summary"]
    assert s["n_diff"] == 1 and not s["agree"]
