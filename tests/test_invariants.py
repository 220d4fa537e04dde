"""Invariants every backend keeps, attack by attack: the same seed gives the same bits in
another run and in another process; a batch equals its images attacked alone and any split
of it (bit for bit, except the last bit of the continuous steps — L2 PGD, DeepFool, C&W,
L-BFGS — which BLAS's batch-size-dependent GEMM order reaches); float32 and float64 both run, keep their dtype and stay in the box and the
ball.

Parametrized over the reference and every backend available here (the GPU backends' CPU
stand-ins included, on tiny inputs), so a new backend is held to them with no new code.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from advkern import kernels
from advkern.attacks import run_attack
from advkern.nets import Dense, Flatten, ReLU, Sequential

from _helpers import randomize

SHAPE = (1, 5, 5)
BACKENDS = ["reference"] + kernels.available()
ATTACKS = {
    "fgsm": {"eps": 0.1},
    "pgd": {"eps": 0.2, "alpha": 0.05, "steps": 3, "random_start": True, "restarts": 2},
    "pgd_l2": {"eps": 1.0, "alpha": 0.3, "steps": 3, "norm": "2", "random_start": True},
    "jsma": {"gamma": 0.2, "theta": 1.0},
    "pixel": {"popsize": 6, "generations": 3, "pixels": 2},
    "mifgsm": {"eps": 0.2, "steps": 3, "decay": 0.9},
    "deepfool": {"max_iter": 10},
    "cw": {"steps": 10, "search_steps": 2},
    "lbfgs": {"search_steps": 2, "max_iter": 5},
}


def model(dtype=np.float64):
    m = Sequential([Flatten(), Dense(7), ReLU(), Dense(3)], SHAPE, seed=2, dtype=dtype)
    return randomize(m, 11)


def batch(n=6, dtype=np.float64):
    rng = np.random.default_rng(5)
    return rng.uniform(0, 1, (n, *SHAPE)).astype(dtype), rng.integers(0, 3, n)


def attack(name, m, x, y, backend, seed=4):
    kw = dict(ATTACKS[name])
    return run_attack(m, x, y, "pgd" if name == "pgd_l2" else name, backend=backend, seed=seed,
                      **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_same_seed_same_bits_and_other_seed_other_draws(name, backend):
    m, (x, y) = model(), batch()
    a, b = attack(name, m, x, y, backend), attack(name, m, x, y, backend)
    np.testing.assert_array_equal(a.x_adv, b.x_adv)
    if name in ("pgd", "pgd_l2", "pixel"):       # the seed is really used
        c = attack(name, m, x, y, backend, seed=5)
        assert not np.array_equal(c.x_adv, a.x_adv)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("reference", "numpy",
                                                                  "numba_cpu")])
def test_same_bits_in_another_process(backend, tmp_path):
    m, (x, y) = model(), batch()
    here = {n: attack(n, m, x, y, backend).x_adv for n in ("pgd", "pixel")}
    code = f"""
import sys, json, numpy as np
sys.path.insert(0, {str(sys.path[0])!r})
sys.path.insert(0, {str((__import__('pathlib').Path(__file__).parent))!r})
import test_invariants as t
m, (x, y) = t.model(), t.batch()
out = {{n: t.attack(n, m, x, y, {backend!r}).x_adv.tolist() for n in ("pgd", "pixel")}}
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    for n in here:
        np.testing.assert_array_equal(np.array(there[n]), here[n])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_batch_equals_images_alone_and_any_split(name, backend):
    m, (x, y) = model(), batch()
    whole = attack(name, m, x, y, backend).x_adv
    seeds = np.stack([np.full(len(x), 4), np.arange(len(x))], 1)
    for a, b in ((0, 1), (1, 4), (4, 6)):      # image 0 alone, then two other slices
        kw = dict(ATTACKS[name])
        part = run_attack(m, x[a:b], y[a:b], "pgd" if name == "pgd_l2" else name,
                          backend=backend, seed=seeds[a:b], **kw).x_adv
        if name in ("pgd_l2", "deepfool", "cw", "lbfgs"):
            # BLAS may sum a 1-row GEMM in another order than a 6-row one: continuous steps
            # carry that last-bit difference (sign steps, argmaxes and DE do not)
            np.testing.assert_allclose(part, whole[a:b], rtol=1e-12, atol=1e-12,
                                       err_msg=f"images {a}:{b}")
        else:
            np.testing.assert_array_equal(part, whole[a:b], err_msg=f"images {a}:{b}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_both_dtypes_run_keep_their_dtype_and_stay_in_box_and_ball(name, dtype, backend):
    m, (x, y) = model(dtype), batch(dtype=dtype)
    run = attack(name, m, x, y, backend)
    assert run.x_adv.dtype == dtype and run.x_adv.shape == x.shape
    assert run.x_adv.min() >= 0 and run.x_adv.max() <= 1
    d = (run.x_adv.astype(np.float64) - x).reshape(len(x), -1)
    kw = ATTACKS[name]
    tol = 1e-6 if dtype == np.float32 else 1e-12
    if name in ("fgsm", "pgd", "mifgsm"):
        assert np.abs(d).max() <= kw["eps"] + tol
    elif name == "pgd_l2":
        assert np.sqrt((d * d).sum(1)).max() <= kw["eps"] * (1 + tol)
    elif name == "pixel":
        assert (np.abs(d).reshape(len(x), 1, -1).max(1) > 0).sum(1).max() <= kw["pixels"]
