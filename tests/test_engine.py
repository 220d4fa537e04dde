"""Every attack, run by the engine on every available backend, reproduces the reference attack.

The engine (advkern.engine) is written once over the backend contract; the reference attacks
(advkern.reference) are the independent specification. Adding a backend to the registry adds
it to these tests with no new test code.

Comparisons are in float64 on small random models, where gradient-sign ties (the only
legitimate source of disagreement for sign steps) do not occur except for exactly-zero
gradients, which every backend maps to sign 0. float32 runs are compared by the fraction of
features that agree (ties and rounding may flip a few signs).
"""

import subprocess
import sys

import numpy as np
import pytest

from advkern import engine, kernels
from advkern.errors import AdvkernError
from advkern.kernels.contract import PRIMITIVES, missing_primitives
from advkern.nets import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, Tanh
from advkern.reference import gradient_attacks as ga
from advkern.reference import jsma as rj
from advkern.reference import pixel as rp

BACKENDS = kernels.available()


def test_registry_lists_the_cpu_backends():
    assert "numpy" in BACKENDS
    with pytest.raises(AdvkernError, match="unknown backend"):
        kernels.get("tpu")


@pytest.mark.parametrize("name", BACKENDS)
def test_every_backend_implements_every_primitive(name):
    be = kernels.get(name)
    assert missing_primitives(be) == [], f"{name} lacks {missing_primitives(be)}"
    assert be.NAME == name and hasattr(be, "xp")
    assert len(PRIMITIVES) >= 14


def test_importing_the_registry_imports_no_backend():
    code = ("import sys, advkern.kernels, advkern.engine; "
            "print(any(m.split('.')[0] in ('numba', 'cupy') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def mlp(dtype=np.float64, seed=0):
    return Sequential([Flatten(), Dense(12), ReLU(), Dense(12), ReLU(), Dense(4)], (1, 6, 6),
                      seed=seed, dtype=dtype)


def cnn(dtype=np.float64, seed=0):
    return Sequential([Conv2D(4, 3, 1, "same"), ReLU(), Conv2D(6, 3, 2, "valid"), Tanh(),
                       MaxPool2D(2, 1), Flatten(), Dense(4)], (1, 8, 8), seed=seed, dtype=dtype)


def data(model, n=12, seed=1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.random((n, *model.input_shape)).astype(dtype)
    return x, model.predict(x)


MODELS = {"mlp": mlp, "cnn": cnn}
PGD_CASES = [
    {"norm": "inf"},
    {"norm": "inf", "random_start": True, "restarts": 2, "early_stop": True},
    {"norm": "inf", "targeted": True, "target": "next", "loss": "cw"},
    {"norm": 2},
    {"norm": 2, "random_start": True},
    {"norm": 1},
]


def _target(kw, y, k=4):
    kw = dict(kw)
    if kw.get("target") == "next":
        kw["target"] = (y + 1) % k
    return kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("case", range(len(PGD_CASES)))
def test_pgd_matches_reference(backend, arch, case):
    model = MODELS[arch]()
    x, y = data(model)
    kw = _target(PGD_CASES[case], y)
    eps, alpha = (0.3, 0.05) if kw["norm"] == "inf" else (1.5, 0.4)
    ref = ga.pgd(model, x, y, eps, alpha, 6, seed=3, **kw)
    got = engine.pgd(model, x, y, eps, alpha, 6, seed=3, backend=backend, **kw)
    assert got.dtype == x.dtype and got.shape == x.shape
    if kw["norm"] == "inf":
        np.testing.assert_array_equal(got, ref)  # sign steps: exact in float64
    else:
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fgsm_and_fgm_match_reference(backend):
    model = cnn()
    x, y = data(model)
    np.testing.assert_array_equal(engine.fgsm(model, x, y, 0.1, backend=backend),
                                  ga.fgsm(model, x, y, 0.1))
    eps = np.linspace(0, 0.2, len(x))  # per-image eps, one of them 0
    np.testing.assert_array_equal(engine.fgsm(model, x, y, eps, backend=backend),
                                  ga.fgsm(model, x, y, eps))
    np.testing.assert_allclose(engine.fgm_l2(model, x, y, 1.0, backend=backend),
                               ga.fgm_l2(model, x, y, 1.0), atol=1e-9)
    np.testing.assert_array_equal(engine.bim(model, x, y, 0.05, backend=backend),
                                  ga.bim(model, x, y, 0.05))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fgsm_float32_agrees_up_to_sign_ties(backend):
    model = mlp(np.float32)
    x, y = data(model, n=30, dtype=np.float32)
    ref = ga.fgsm(model, x.astype(np.float64), y, 0.1)
    got = engine.fgsm(model, x, y, 0.1, backend=backend)
    assert got.dtype == np.float32
    agree = np.isclose(got, ref, atol=1e-6)
    assert agree.mean() > 0.995


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["pair", "single"])
@pytest.mark.parametrize("use_logits", [True, False])
def test_jsma_matches_reference(backend, variant, use_logits):
    model = mlp(seed=2)
    x, y = data(model, n=8, seed=4)
    ref, ri = rj.jsma(model, x, y, "next", theta=1.0, gamma=0.3, variant=variant,
                      use_logits=use_logits)
    got, gi = engine.jsma(model, x, y, "next", theta=1.0, gamma=0.3, variant=variant,
                          use_logits=use_logits, backend=backend)
    np.testing.assert_array_equal(got, ref)
    for key in ri:
        np.testing.assert_array_equal(gi[key], ri[key])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("kw", [{"pixels": 1}, {"pixels": 3, "CR": 0.7},
                                {"pixels": 2, "targeted": True}, {"pixels": 1, "early_stop": False}])
def test_pixel_attack_follows_the_reference_trajectory(backend, arch, kw):
    model = MODELS[arch](seed=5)
    x, y = data(model, n=6, seed=6)
    kw = dict(kw)
    if kw.get("targeted"):
        kw["target"] = (y + 1) % 4
    ref, ri = rp.pixel_attack(model, x, y, popsize=12, generations=6, seed=7, **kw)
    got, gi = engine.pixel_attack(model, x, y, popsize=12, generations=6, seed=7,
                                  backend=backend, **kw)
    np.testing.assert_array_equal(got, ref)
    for key in ("success", "generations", "queries", "pred", "candidate"):
        np.testing.assert_array_equal(gi[key], ri[key])
    np.testing.assert_allclose(gi["best_fitness"], ri["best_fitness"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engine_never_modifies_inputs_and_validates_like_the_reference(backend):
    model = mlp()
    x, y = data(model)
    x0, y0 = x.copy(), y.copy()
    engine.pgd(model, x, y, 0.2, 0.05, 3, random_start=True, backend=backend)
    engine.jsma(model, x, y, "next", gamma=0.2, backend=backend)
    engine.pixel_attack(model, x, y, popsize=6, generations=2, backend=backend)
    assert np.array_equal(x, x0) and np.array_equal(y, y0)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    for call in (lambda: engine.pgd(model, bad, y, 0.1, 0.1, 1, backend=backend),
                 lambda: engine.pgd(model, x, y, -1, 0.1, 1, backend=backend),
                 lambda: engine.pgd(model, x, y, 0.1, 0.1, 0, backend=backend),
                 lambda: engine.jsma(model, x, y, y, backend=backend),
                 lambda: engine.pixel_attack(model, x, y, popsize=3, backend=backend)):
        with pytest.raises(AdvkernError):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("adversarial", [None, "fgsm", "pgd"])
def test_training_on_a_backend_matches_the_reference(backend, adversarial):
    from advkern.nets.train import train
    model = cnn(seed=3)
    rng = np.random.default_rng(0)
    x = rng.random((40, *model.input_shape))
    y = rng.integers(0, 4, 40)
    kw = dict(epochs=1, batch_size=16, adversarial=adversarial, eps=0.1, pgd_steps=2,
              progress=False, optimizer="sgd", lr=0.05)
    ref, _ = train(model, x, y, **kw)
    got, _ = train(model, x, y, backend=backend, **kw)
    for pr, pg in zip(ref.params, got.params):
        for k in pr:
            np.testing.assert_allclose(pg[k], pr[k], rtol=1e-9, atol=1e-12)
