"""advkern.attacks.run_attack: the public API equals the reference called directly.

run_attack adds parameter defaults, target resolution ('next'), chunking (pixel 50, jsma 100,
pgd/bim 250 images per call, each chunk seeded with per-image pairs [seed, i]) and metrics on
top of the reference attacks. None of that may change a single value: every test here calls
the reference function with the same parameters and demands bit-identical results, on
batches larger than one chunk where the attack is chunked.

Tiny random models (25 inputs) keep every call in milliseconds.
"""

import numpy as np
import pytest

from advkern.attacks import (ATTACKS, DEFAULTS, PER_IMAGE, AttackRun, attack_params,
                             run_attack)
from advkern.errors import AdvkernError
from advkern.nets import Dense, Flatten, ReLU, Sequential
from advkern.reference import gradient_attacks as ga
from advkern.reference import jsma as ref_jsma
from advkern.reference import linear as ref_linear
from advkern.reference import pixel as ref_pixel

from _helpers import randomize


@pytest.fixture(autouse=True)
def _reference_by_default(monkeypatch):
    """These tests hold run_attack's plumbing to the reference functions bit for bit, so
    'auto' resolves to the reference here (the engine backends have their own tests)."""
    monkeypatch.setenv("ADVKERN_BACKEND", "reference")

SHAPE = (1, 5, 5)
K = 4

METRIC_KEYS = {"n", "clean_accuracy", "adversarial_accuracy", "success_rate",
               "success_rate_on_correct", "mean_l0_fraction", "median_l0_fraction"} | {
    f"{s}_{k}" for s in ("mean", "median") for k in ("l0", "l1", "l2", "linf")}


def tiny_model(dtype=np.float64, seed=1, logits=K):
    layers = [Flatten(), Dense(7), ReLU(), Dense(logits)]
    return randomize(Sequential(layers, SHAPE, seed=seed, dtype=dtype), seed + 100)


def batch(n, dtype=np.float64, seed=0, k=K):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, *SHAPE)).astype(dtype), rng.integers(0, k, n)


def assert_same_run(run, x_ref, info_ref=None):
    """x_adv equal to the reference's; the reference's info kept (a record under one of the
    evaluation's names as attack_NAME, beside the evaluation's per-image arrays)."""
    assert isinstance(run, AttackRun)
    assert run.x_adv.dtype == x_ref.dtype
    np.testing.assert_array_equal(run.x_adv, x_ref)
    if info_ref is not None:
        renamed = {("attack_" + k if k in PER_IMAGE else k): v for k, v in info_ref.items()}
        assert set(run.info) == set(renamed) | set(PER_IMAGE)
        for k, v in renamed.items():
            np.testing.assert_array_equal(run.info[k], v, err_msg=f"info[{k!r}]")


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fgsm_equals_reference(dtype):
    m, (x, y) = tiny_model(dtype), batch(30, dtype)
    run = run_attack(m, x, y, "fgsm", eps=0.07)
    assert_same_run(run, ga.fgsm(m, x, y, 0.07), {})


def test_fgsm_default_eps_and_targeted_next():
    m, (x, y) = tiny_model(), batch(30)
    assert_same_run(run_attack(m, x, y, "fgsm"), ga.fgsm(m, x, y, DEFAULTS["fgsm"]["eps"]))
    run = run_attack(m, x, y, "fgsm", eps=0.2, targeted=True, target="next", loss="cw")
    t = (y + 1) % K
    assert_same_run(run, ga.fgsm(m, x, y, 0.2, targeted=True, target=t, loss="cw"))
    # Targeted metrics measure success as prediction == target, not != y.
    np.testing.assert_array_equal(run.info["success"], m.predict(run.x_adv) == t)


def test_fgm_and_bim_equal_reference():
    m, (x, y) = tiny_model(), batch(40)
    assert_same_run(run_attack(m, x, y, "fgm", eps=0.5), ga.fgm_l2(m, x, y, 0.5))
    assert_same_run(run_attack(m, x, y, "bim", eps=0.05), ga.bim(m, x, y, 0.05))
    assert_same_run(run_attack(m, x, y, "bim", eps=0.1, alpha=0.02, steps=3, early_stop=True),
                    ga.bim(m, x, y, 0.1, 0.02, 3, early_stop=True))


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
def test_pgd_random_start_over_several_chunks(norm):
    # 260 images: two chunks of the 250-image pgd chunk; random starts drawn per image.
    m, (x, y) = tiny_model(), batch(260, seed=3)
    kw = dict(eps=0.3 if norm == "inf" else 1.0, alpha=0.05, steps=3, norm=norm,
              random_start=True, restarts=2)
    run = run_attack(m, x, y, "pgd", seed=7, **kw)
    assert_same_run(run, ga.pgd(m, x, y, seed=7, **kw))
    # ... which is also the per-image-pair seed form the chunks use.
    pairs = np.stack([np.full(len(x), 7), np.arange(len(x))], 1)
    assert_same_run(run, ga.pgd(m, x, y, seed=pairs, **kw))
    # A different seed gives a different result (the seed is really used).
    assert not np.array_equal(run_attack(m, x, y, "pgd", seed=8, **kw).x_adv, run.x_adv)


def test_pgd_targeted_equals_reference():
    m, (x, y) = tiny_model(np.float32), batch(20, np.float32)
    t = np.where(y == 1, 0, 1)
    run = run_attack(m, x, y, "pgd", eps=0.2, alpha=0.05, steps=4, targeted=True, target=t,
                     early_stop=True)
    assert_same_run(run, ga.pgd(m, x, y, 0.2, 0.05, 4, targeted=True, target=t,
                                early_stop=True))
    np.testing.assert_array_equal(run.info["success"], m.predict(run.x_adv) == t)


@pytest.mark.parametrize("attack,variant", [("jsma", "pair"), ("jsma1", "single")])
def test_jsma_over_several_chunks(attack, variant):
    # 130 images: two chunks of the 100-image jsma chunk; target 'next' by default.
    m, (x, y) = tiny_model(), batch(130, seed=4)
    run = run_attack(m, x, y, attack, gamma=0.5, theta=0.6)
    x_ref, info = ref_jsma.jsma(m, x, y, (y + 1) % K, theta=0.6, gamma=0.5, variant=variant)
    assert_same_run(run, x_ref, info)
    assert run.params["targeted"] is True


def test_pixel_over_several_chunks():
    # 60 images: two chunks of the 50-image pixel chunk; the second chunk must be seeded
    # [seed, 50], ..., [seed, 59], exactly as the whole batch would be.
    m, (x, y) = tiny_model(), batch(60, seed=5)
    n, s = len(x), 3
    run = run_attack(m, x, y, "pixel", seed=s, popsize=6, generations=2, pixels=2)
    seeds = np.stack([np.full(n, s), np.arange(n)], 1)
    x_ref, info = ref_pixel.pixel_attack(m, x, y, pixels=2, popsize=6, generations=2, seed=seeds)
    assert_same_run(run, x_ref, info)
    # The int seed is the same stream as the pairs.
    x_int, _ = ref_pixel.pixel_attack(m, x, y, pixels=2, popsize=6, generations=2, seed=s)
    np.testing.assert_array_equal(x_int, x_ref)
    assert run.params["seed"] == s


def test_pixel_targeted_and_per_image_seeds():
    m, (x, y) = tiny_model(np.float32), batch(55, np.float32, seed=6)
    seeds = np.arange(100, 155)
    run = run_attack(m, x, y, "pixel", seed=seeds, popsize=6, generations=2, targeted=True,
                     target="next", F=0.7, CR=0.5)
    x_ref, info = ref_pixel.pixel_attack(m, x, y, popsize=6, generations=2, targeted=True,
                                         target=(y + 1) % K, F=0.7, CR=0.5, seed=seeds)
    assert_same_run(run, x_ref, info)
    assert run.params["seed"] == "per-image"


def test_pixel_early_stop_false_is_honoured():
    m, (x, y) = tiny_model(), batch(20, seed=7)
    run = run_attack(m, x, y, "pixel", popsize=6, generations=2, early_stop=False)
    x_ref, info = ref_pixel.pixel_attack(m, x, y, popsize=6, generations=2, early_stop=False,
                                         seed=0)
    assert_same_run(run, x_ref, info)


def test_linear_equals_reference():
    m = randomize(Sequential([Flatten(), Dense(1)], SHAPE, seed=2, dtype=np.float64), 9)
    x, y = batch(25, seed=8, k=2)
    run = run_attack(m, x, y, "linear", eps=0.15)
    assert_same_run(run, ref_linear.linear_attack(m, x, y, 0.15), {})
    assert_same_run(run_attack(m, x, y, "linear"),
                    ref_linear.linear_attack(m, x, y, DEFAULTS["linear"]["eps"]))


# ----------------------------------------------------------------------------- metrics, params


@pytest.mark.parametrize("attack", ATTACKS)
def test_every_attack_runs_with_metrics_and_keeps_inputs(attack):
    if attack == "linear":
        m = randomize(Sequential([Flatten(), Dense(1)], SHAPE, seed=2, dtype=np.float64), 9)
        x, y = batch(12, seed=9, k=2)
    else:
        m, (x, y) = tiny_model(), batch(12, seed=9)
    kw = {"pixel": dict(popsize=6, generations=2), "pgd": dict(steps=3, random_start=True),
          "jsma": dict(gamma=0.3), "jsma1": dict(gamma=0.3)}.get(attack, {})
    x0, y0 = x.copy(), y.copy()
    run = run_attack(m, x, y, attack, **kw)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(y, y0)
    assert run.x_adv is not x and run.x_adv.shape == x.shape and run.x_adv.dtype == x.dtype
    assert set(run.metrics) == METRIC_KEYS          # scalars only
    assert all(np.ndim(v) == 0 for v in run.metrics.values())
    assert run.metrics["n"] == len(x)
    for k in PER_IMAGE:
        assert run.info[k].shape == (len(x),)
    assert run.info["l0"].dtype == np.int64
    d = (run.x_adv.astype(np.float64) - x).reshape(len(x), -1)
    np.testing.assert_array_equal(run.info["l0"], np.count_nonzero(d, axis=1))
    assert run.metrics["mean_l0_fraction"] == pytest.approx(
        run.metrics["mean_l0"] / d.shape[1])
    np.testing.assert_array_equal(run.info["pred_adv"], m.predict(run.x_adv))
    assert run.seconds >= 0
    assert run.params["attack"] == attack and run.params["seed"] == 0
    assert run.params["clip"] == (0.0, 1.0)
    assert 0.0 <= run.x_adv.min() and run.x_adv.max() <= 1.0


def test_defaults_recorded_in_params():
    m, (x, y) = tiny_model(), batch(4)
    run = run_attack(m, x, y, "pgd")
    for k, v in {"eps": 0.3, "alpha": 0.01, "steps": 40, "norm": "inf"}.items():
        assert run.params[k] == v
    assert run.info["linf"].max() <= 0.3 + 1e-12
    # Given values override the defaults; None means "the default".
    p = attack_params("pgd", eps=0.1, steps=None)
    assert p["eps"] == 0.1 and p["steps"] == 40
    assert attack_params("pixel") == {"pixels": 1, "popsize": 400, "generations": 100}
    # A targeted run records targeted but not the (per-image) target array.
    run = run_attack(m, x, y, "fgsm", targeted=True, target="next")
    assert run.params["targeted"] is True and "target" not in run.params


def test_unknown_attack_and_bad_arguments():
    m, (x, y) = tiny_model(), batch(4)
    with pytest.raises(AdvkernError, match="unknown attack 'boundary'.*fgsm"):
        run_attack(m, x, y, "boundary")
    with pytest.raises(AdvkernError, match="target"):
        run_attack(m, x, y, "fgsm", targeted=True)  # no target given
    with pytest.raises(AdvkernError, match="target"):
        run_attack(m, x, y, "fgsm", targeted=True, target="prev")
    with pytest.raises(AdvkernError, match="eps"):
        run_attack(m, x, y, "fgsm", eps=-0.1)
    with pytest.raises(AdvkernError, match="steps"):
        run_attack(m, x, y, "pgd", steps=0)
    with pytest.raises(AdvkernError, match="seed"):
        run_attack(m, x, y, "pgd", seed=-1, steps=1)
    with pytest.raises(AdvkernError, match="box"):
        run_attack(m, x + 1.5, y, "fgsm")


def test_empty_batch():
    m, (x, y) = tiny_model(), batch(0)
    run = run_attack(m, x, y, "pgd", steps=2)
    assert run.x_adv.shape == (0, *SHAPE) and run.metrics["n"] == 0


def test_auto_backend_is_the_fastest_here_and_recorded(monkeypatch):
    from advkern import kernels

    monkeypatch.delenv("ADVKERN_BACKEND")
    fast = kernels.resolve("auto")
    assert fast in kernels.available() and fast != "numpy"
    assert not getattr(kernels.get(fast), "SIMULATED", False)
    m, (x, y) = tiny_model(), batch(6)
    run = run_attack(m, x, y, "fgsm", eps=0.1)
    assert run.params["backend"] == fast
    np.testing.assert_array_equal(run.x_adv, run_attack(m, x, y, "fgsm", eps=0.1,
                                                        backend=fast).x_adv)
    assert run_attack(m, x, y, "fgsm", eps=0.1, backend="reference").params["backend"] == \
        "reference"
    lin = Sequential([Flatten(), Dense(1)], SHAPE, seed=0, dtype=np.float64)
    assert run_attack(lin, x, y % 2, "linear", eps=0.1).params["backend"] == "reference"
    monkeypatch.setenv("ADVKERN_BACKEND", "numpy")
    assert run_attack(m, x, y, "fgsm", eps=0.1).params["backend"] == "numpy"
    monkeypatch.setenv("ADVKERN_BACKEND", "tpu")
    with pytest.raises(AdvkernError, match="unknown backend 'tpu'"):
        run_attack(m, x, y, "fgsm", eps=0.1)
