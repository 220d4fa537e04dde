"""Smoke tests of the benchmark harness (bench/): it validates before timing, skips what is
unavailable, refuses to time a backend that fails validation, and writes its reports.

No timing is asserted. --quick uses small untrained models (nothing is trained) and tiny
sizes; only the numpy backend is run (a JIT backend's compilation would dominate).
"""

import json
import sys
import types

import numpy as np
import pytest

from advkern import kernels
from advkern.kernels import numpy_backend
from advkern.kernels.contract import composed_pgd_step
from advkern.nets import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, Tanh, build
from bench import flops, run

ROW_KEYS = {"item", "kind", "model", "backend", "batch", "images", "images_total", "repeats",
            "first_s", "times_s", "median_s", "ms_per_image", "images_per_s", "gflop",
            "gflops", "bound_s", "x_bound", "x_bound_square", "x_numpy", "extra", "notes"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    d.mkdir()
    monkeypatch.setenv("ADVKERN_CACHE", str(d))
    return d


def _report(out):
    (path,) = out.glob("*-quick.json")
    return json.loads(path.read_text())


def test_quick_run_validates_times_and_writes_reports(tmp_path, cache, capsys):
    out = tmp_path / "results"
    rc = run.main(["--quick", "--no-torch", "--backends", "numpy", "--out", str(out)])
    assert rc == 0
    rep = _report(out)
    assert (out / "latest-quick.md").read_text() == next(out.glob("*-quick.md")).read_text()
    assert list(cache.iterdir()) == []  # --quick never trains (nor loads) a bundled model

    for key in ("schema", "date", "command", "mode", "machine", "versions", "settings",
                "backends", "gemm", "results", "notes", "load_avg_start", "load_avg_end"):
        assert key in rep, key
    assert rep["mode"] == "quick" and "--quick" in rep["command"]
    assert {"cpu_model", "cpu_count", "platform", "blas"} <= set(rep["machine"])
    assert rep["versions"]["numpy"] == np.__version__
    assert {"square", "model mlp", "model cnn"} <= set(rep["gemm"])

    numpy = rep["backends"]["numpy"]
    assert numpy["status"] == "ok" and numpy["checks"] and all(c["ok"] for c in numpy["checks"])
    rows = rep["results"]
    assert {r["item"] for r in rows} == set(run.ITEMS) - {"torch"}
    for r in rows:
        assert ROW_KEYS <= set(r) and r["backend"] == "numpy"
        assert r["median_s"] > 0 and r["repeats"] >= 1 and r["x_numpy"] == pytest.approx(1)
        assert (r["gflops"] is None) == (r["item"] in ("linf_step", "jsma_best_pair"))
    assert any("--no-torch" in n for n in rep["notes"])

    err = capsys.readouterr().err
    assert err.index("numpy: ok") < err.index("loss_grad")  # validated before timed
    md = next(out.glob("*-quick.md")).read_text()
    assert "## Backends" in md and "## Results" in md and "pgd" in md


def test_failed_and_unavailable_backends_are_reported_not_timed(tmp_path, cache, monkeypatch):
    broken = types.ModuleType("bench_test_broken_backend")
    for name in dir(numpy_backend):
        if not name.startswith("__"):
            setattr(broken, name, getattr(numpy_backend, name))
    broken.NAME = "broken"
    broken.linf_step = lambda xa, g, x0, eps, alpha, lo, hi, active: \
        numpy_backend.linf_step(xa, -g, x0, eps, alpha, lo, hi, active)  # a sign bug
    # composed from the broken module's own primitives, as a backend module's pgd_step is
    broken.pgd_step = lambda *a: composed_pgd_step(broken, *a)
    monkeypatch.setitem(sys.modules, "bench_test_broken_backend", broken)
    monkeypatch.setitem(kernels._BACKENDS, "broken", "bench_test_broken_backend")
    monkeypatch.setitem(kernels._BACKENDS, "ghost", "bench_test_no_such_module")

    out = tmp_path / "results"
    rc = run.main(["--quick", "--no-torch", "--backends", "numpy,broken,ghost",
                   "--only", "linf_step", "--out", str(out)])
    assert rc == 1  # a backend failed validation
    rep = _report(out)
    b = rep["backends"]
    assert b["numpy"]["status"] == "ok"
    assert b["broken"]["status"] == "FAILED"
    failed = {c["check"] for c in b["broken"]["checks"] if not c["ok"]}
    assert "mlp linf_step" in failed and "cnn pgd" in failed
    assert b["ghost"]["status"] == "unavailable" and "not available" in b["ghost"]["note"]
    assert [r["backend"] for r in rep["results"]] == ["numpy"]  # --only linf_step, numpy only


def test_bad_usage_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        run.main(["--only", "nonsense"])
    assert run.main(["--quick", "--backends", "tpu", "--out", str(tmp_path)]) == 2


def test_gemm_flop_counts_of_the_bundled_architectures():
    mlp, cnn = build("mlp"), build("cnn")
    assert flops.fwd(mlp) == 2 * (784 * 256 + 256 * 256 + 256 * 10)
    conv = 2 * (16 * 1 * 9 * 28 * 28 + 32 * 16 * 9 * 13 * 13 + 64 * 32 * 9 * 6 * 6)
    assert flops.fwd(cnn) == conv + 2 * 2304 * 10
    assert flops.loss_grad(cnn, 3) == 2 * 3 * flops.fwd(cnn)
    assert flops.pgd(mlp, 10, 40) == 10 * 81 * flops.fwd(mlp)
    assert flops.jsma(mlp, np.array([0, 2])) == 4 * 11 * flops.fwd(mlp)
    assert sum(2 * m * k * n for m, k, n in flops.gemm_shapes(cnn, 5)) == 2 * 5 * flops.fwd(cnn)


def test_torch_baseline_reproduces_advkern_logits():
    torch = pytest.importorskip("torch")
    from bench import torch_pgd

    model = Sequential([Conv2D(3, 3, 1, (0, 1, 1, 0)), Tanh(), Conv2D(4, 2, 2, "same"), ReLU(),
                        MaxPool2D(2, 1), Flatten(), Dense(5)], (2, 7, 7), seed=3)
    x = np.random.default_rng(0).random((4, 2, 7, 7)).astype(np.float32)
    net = torch_pgd.build(torch, model)
    np.testing.assert_allclose(torch_pgd.logits(torch, net, x), model.logits(x), rtol=1e-5,
                               atol=1e-5)
