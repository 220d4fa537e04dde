"""The GPU mode of the benchmark harness (bench/gpu.py, ``python -m bench --gpu``), on a CPU.

Nothing here needs a GPU, CuPy, torch or torchattacks: the pure-Python parts are tested with
fake numbers (argument parsing, the timing loop on a fake clock, the deadline and the
per-item failure handling, the ratios and the GEMM bound, the report's GPU tables and
summary), and one quick end-to-end run uses the ``numpy`` backend as a stand-in GPU backend.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from advkern import engine
from bench import flops, gpu, report, run


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    d.mkdir()
    monkeypatch.setenv("ADVKERN_CACHE", str(d))
    return d


# -- arguments, environment ------------------------------------------------------------------


def test_gpu_arguments():
    args = run.parse_args(["--gpu", "--quick", "--only", "pgd,torchattacks", "--total", "60",
                           "--torch-device", "cpu"])
    assert args.gpu and args.quick and args.only == {"pgd", "torchattacks"}
    assert args.total == 60 and args.torch_device == "cpu"
    assert run.parse_args(["--gpu"]).torch_device == "cuda"
    for bad in (["--gpu", "--only", "loss_grad"],  # a CPU-mode item
                ["--only", "torchattacks"],  # a GPU-mode item without --gpu
                ["--total", "60"], ["--torch-device", "cpu"]):
        with pytest.raises(SystemExit):
            run.parse_args(bad)


def test_cupy_tf32_must_be_unset():
    gpu.check_tf32_env({})
    for value in ("1", "0", ""):
        with pytest.raises(Exception, match="CUPY_TF32"):
            gpu.check_tf32_env({"CUPY_TF32": value})


def test_gpu_settings_keep_the_issue_sizes_and_the_cpu_validation():
    cfg = gpu.settings(quick=False)
    assert cfg["pgd"] == {"images": 10000, "steps": 40, "eps": 0.3, "alpha": 0.01}
    assert cfg["pixel"] == {"images": 1000, "popsize": 400, "generations": 100}
    assert cfg["jsma"] == {"images": 1000, "theta": 1.0, "gamma": 0.1}
    assert cfg["gemm_batch"] == 10000 and cfg["data_images"] == 10000
    assert all(cfg[k] == run.FULL[k] for k in gpu.VALIDATION)
    assert all(gpu.settings(quick=True)[k] == run.QUICK[k] for k in gpu.VALIDATION)
    cfg["pgd"]["images"] = 1
    assert gpu.FULL["pgd"]["images"] == 10000  # settings() copies


def test_gpu_data_is_the_test_split_then_train_repeated():
    from advkern.nets.datasets import load_mnist
    x, y = gpu.gpu_data(10000)
    xt, yt = load_mnist("test", dtype=np.float32)
    xr, _ = load_mnist("train", dtype=np.float32)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32 and y.shape == (10000,)
    assert np.array_equal(x[:1000], xt) and np.array_equal(y[:1000], yt)
    assert np.array_equal(x[1000:5000], xr) and np.array_equal(x[5000:], x[:5000])


# -- timing ----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def fake_attack(clock, per_image, overhead=0.001):
    """call(n, steps=10): costs overhead + per_image * n * steps / 10 fake seconds."""
    calls = []

    def call(n, steps=10):
        calls.append((n, steps))
        clock.t += overhead + per_image * n * steps / 10
        return n
    return call, calls


def test_measure_times_all_images_with_a_warm_up_and_repeats():
    clock, syncs = FakeClock(), []
    call, calls = fake_attack(clock, per_image=1e-4)
    n, out, timing, notes = gpu.measure(call, 1000, (2, {"steps": 1}, 10.0), 3, 5.0,
                                        lambda: syncs.append(clock.t), clock)
    assert n == 1000 and out == 1000 and notes == []
    full = [c for c in calls if c == (1000, 10)]
    assert len(full) == 4  # one warm-up at full size, then 3 timed
    assert timing["times_s"] == pytest.approx([0.001 + 0.1] * 3)
    assert timing["median_s"] == pytest.approx(0.101)
    assert timing["first_s"] == pytest.approx(0.001 + 2e-5)  # the first probe call
    assert len(syncs) == 2 * len(calls)  # before and after every timed call


def test_measure_takes_the_first_images_that_fit_the_budget():
    clock = FakeClock()
    call, calls = fake_attack(clock, per_image=0.01)  # 10 s for all: over a 5 s budget
    n, _, timing, notes = gpu.measure(call, 1000, (2, {"steps": 1}, 10.0), 3, 5.0,
                                      lambda: None, clock)
    assert 300 < n < 1000 and n * 0.01 <= 5.0
    assert timing["times_s"] == [pytest.approx(0.001 + 0.01 * n)]
    assert notes and "one run" in notes[0]
    assert clock.t <= 5.0 + 1e-9


def test_measure_resizes_when_the_probe_overestimates():
    clock = FakeClock()

    def call(n, steps=10):  # small batches cost 20x more per image (a GPU's launches)
        rate = 1e-4 if n >= 500 else 2e-3
        clock.t += rate * n * steps / 10
        return n
    n, _, timing, _ = gpu.measure(call, 1000, (2, {"steps": 1}, 10.0), 2, 5.0,
                                  lambda: None, clock)
    assert n == 1000 and len(timing["times_s"]) == 2


# -- the item loop ---------------------------------------------------------------------------


def test_budget_for_shares_the_time_left_by_weight():
    items = [SimpleNamespace(weight=w) for w in (1.0, 2.0, 1.0)]
    cfg = {"budget_s": 12.0}
    assert gpu.budget_for(items, 0, cfg, 40.0) == pytest.approx(10.0)
    assert gpu.budget_for(items, 1, cfg, 30.0) == pytest.approx(20.0)
    assert gpu.budget_for(items, 1, cfg, 300.0) == pytest.approx(24.0)  # the cap
    assert gpu.budget_for(items, 2, cfg, 5.0) == pytest.approx(5.0)


def _row(item, model, backend, ms, images=100, **kw):
    t = ms * images / 1e3
    row = run.make_row(item, "attack", model, backend, images, images, images,
                       {"first_s": 0.5, "times_s": [t], "median_s": t}, kw.pop("gflop", None),
                       f"{item}/{model}")
    row.update(kw)
    return gpu.finish_row(row)


def test_run_items_survives_a_failing_item_and_skips_what_no_longer_fits():
    clock = FakeClock()
    ctx = SimpleNamespace(cfg={"budget_s": 10.0, "min_item_s": 1.0}, torch=None)
    budgets, written = [], []

    def good(budget):
        budgets.append(budget)
        clock.t += 2.0
        return _row("pgd", "mlp", "good", 1.0)

    def bad(budget):
        clock.t += 26.0
        raise RuntimeError("an illegal memory access was encountered")

    items = [gpu.Item("pgd", "mlp", "good", 100, 1.0, good),
             gpu.Item("pixel", "cnn", "bad", 100, 2.0, bad),
             gpu.Item("pgd", "cnn", "good", 100, 1.0, good),
             gpu.Item("jsma", "cnn", "late", 100, 1.0, good)]
    rows = gpu.run_items(ctx, items, deadline=30.0, checkpoint=lambda r: written.append(len(r)),
                         clock=clock)
    assert written == [1, 2, 3, 4]  # the report is rewritten after every item
    assert [r["status"] for r in rows] == ["ok", "FAILED", "ok", "skipped"]
    assert budgets[0] == pytest.approx(30.0 / 5)
    assert budgets[1] == pytest.approx(1.0)  # 2 s left, shared by the last two items
    failed = rows[1]
    assert "RuntimeError: an illegal memory access" in failed["notes"]
    assert "Traceback" in failed["error"] and "in bad" in failed["error"]
    assert failed["median_s"] is None and failed["item_s"] == pytest.approx(26.0)
    assert "left of the --total budget" in rows[3]["notes"]


# -- ratios, GEMM bound, reports -------------------------------------------------------------


RATES = {"square": {"shapes": "8192x8192x8192", "gflops": 50000.0},
         "10000x784x256": {"shapes": "10000x784 @ 784x256", "gflops": 40000.0},
         "model mlp": {"shapes": "...", "gflops": 25000.0},
         "model cnn": {"shapes": "...", "gflops": 10000.0}}


def fake_rows():
    pixel = _row("pixel", "mlp", "cupy", 2.0, images=1000, gflop=1000.0)
    pixel["cand_per_s"], pixel["mcand_per_s"] = 40.4e6 / 2.0, 20.2
    ta_pixel = _row("pixel", "mlp", "torchattacks", 2000.0, images=2)
    ta_pixel["cand_per_s"], ta_pixel["mcand_per_s"] = 2e4, 0.02
    return [
        _row("pgd", "mlp", "cupy", 0.01, images=10000, gflop=440.0),
        _row("pgd", "mlp", "numba_cuda", 0.02, images=10000, gflop=440.0),
        _row("pgd", "mlp", "torch", 0.05, images=10000, gflop=440.0),
        _row("pgd", "mlp", "torch (defaults)", 0.04, images=10000, gflop=440.0),
        _row("pgd", "mlp", "torchattacks", 0.08, images=10000, gflop=440.0),
        _row("pgd", "cnn", "cupy", 0.2, images=10000, gflop=2560.0),
        pixel, ta_pixel,
        _row("jsma", "mlp", "cupy", 0.5, images=1000),
        _row("jsma", "mlp", "torchattacks", 300.0, images=10),
        gpu.failed_row("jsma", "cnn", "cupy", 1000, "FAILED", "CUDARuntimeError: boom",
                       "Traceback (most recent call last):\n  ...\nCUDARuntimeError: boom"),
        gpu.failed_row("jsma", "cnn", "torchattacks", 10, "skipped", "not run: 0.0 s left"),
    ]


def test_ratios_and_the_gemm_bound():
    rows = gpu.add_gpu_ratios(fake_rows(), RATES)
    by = {(r["item"], r["model"], r["backend"]): r for r in rows}
    cupy = by["pgd", "mlp", "cupy"]
    assert cupy["x_torch"] == pytest.approx(5.0)  # 0.05 / 0.01 ms per image
    assert cupy["x_ta"] == pytest.approx(8.0)
    assert cupy["bound_s"] == pytest.approx(440.0 / 25000.0)
    assert cupy["x_bound"] == pytest.approx(0.1 / (440.0 / 25000.0))  # 0.1 s median
    assert cupy["x_bound_square"] == pytest.approx(0.1 / (440.0 / 50000.0))
    assert by["pgd", "mlp", "torch"]["x_torch"] == pytest.approx(1.0)
    assert by["pgd", "mlp", "torch (defaults)"]["x_torch"] == pytest.approx(1.25)
    assert by["pgd", "cnn", "cupy"]["x_torch"] is None  # no torch row for the cnn
    assert by["pgd", "cnn", "cupy"]["x_bound"] == pytest.approx(2.0 / (2560.0 / 10000.0))
    assert by["pixel", "mlp", "cupy"]["x_ta"] == pytest.approx(20.2e6 / 2e4)  # candidates/s
    assert by["jsma", "mlp", "cupy"]["x_ta"] == pytest.approx(600.0)  # per image
    assert by["jsma", "mlp", "cupy"]["x_bound"] is None  # no FLOPs given
    failed = by["jsma", "cnn", "cupy"]
    assert failed["x_ta"] is None and failed["x_bound"] is None


def test_sgemm_rate_on_a_device_path():
    syncs = []
    lib = flops.GemmLib("fake", np, lambda shape, rng: rng.standard_normal(shape, np.float32),
                        lambda: syncs.append(1))
    assert flops.sgemm_rate(64, 32, 16, repeats=2, lib=lib) > 0
    assert len(syncs) >= 2 * 2 + 2  # after the warm-up, the calibration and every sample
    assert flops.model_rate(gpu.cpu.load_models(True)["mlp"], 8, repeats=1, lib=lib) > 0


def fake_rep(status="complete"):
    rows = gpu.add_gpu_ratios(fake_rows(), RATES)
    return {"schema": 1, "date": "2026-12-04T10:00:00+00:00", "stamp": "20261204-100000",
            "command": "python -m bench --gpu", "mode": "gpu", "status": status,
            "machine": report.machine_info(), "load_avg_start": None, "load_avg_end": None,
            "device": {"name": "NVIDIA H200", "driver": "580.159.03", "memory_gib": 139.8,
                       "sms": 132, "compute_capability": "9.0", "cuda_driver": "13.0",
                       "cuda_runtime": "13.0", "cublas": 130000, "cudnn": 91000},
            "settings": gpu.settings(False),
            "backends": {"cupy": {"status": "ok", "checks": [{"check": "c", "ok": True,
                                                               "detail": ""}],
                                  "validate_s": 3.0, "note": ""},
                         "numba_cuda": {"status": "unavailable", "note": "not registered"}},
            "gemm": RATES, "gemm_lib": "cupy.matmul", "results": rows, "notes": ["a note"],
            "versions": {"advkern": "0.1.0", "cupy": "14.2.0", "numba-cuda": "0.30",
                         "torch": "2.11.0"}, "elapsed_s": 120.0}


def test_gpu_markdown_and_files(tmp_path):
    rep = fake_rep()
    md = report.markdown(rep)
    assert md.startswith("# advkern GPU benchmark")
    assert "NVIDIA H200" in md and "driver 580.159.03" in md and "CUDA driver 13.0" in md
    assert "cupy 14.2.0" in md and "numba-cuda 0.30" in md and "torch 2.11.0" in md
    assert "## sgemm rates (cupy.matmul, float32, this run)" in md
    header = next(line for line in md.splitlines() if line.startswith("| item |"))
    for col in ("ms/img", "img/s", "Mcand/s", "x torch", "x torchattacks", "x bound"):
        assert f"| {col} |" in header
    cupy_pgd = next(line for line in md.splitlines() if line.startswith("| pgd | mlp | cupy |"))
    assert "| 5.00 | 8.00 |" in cupy_pgd  # x torch, x torchattacks
    assert "| jsma | cnn | cupy | -/1000 | - | FAILED |" in md
    assert "| skipped |" in md
    assert "## Failures" in md and "CUDARuntimeError: boom" in md and "Partial" not in md
    assert "Partial" in report.markdown(fake_rep("running"))

    paths = report.write(rep, tmp_path)
    assert paths[0].name.startswith("20261204-100000-") and paths[0].name.endswith("-gpu.json")
    assert paths[1].name == paths[0].name.replace(".json", ".md")
    assert paths[2].name == "latest-gpu.md"
    back = json.loads(paths[0].read_text())
    assert back["results"][10]["status"] == "FAILED"
    rep["mode"] = "gpu-quick"
    assert report.write(rep, tmp_path)[2].name == "latest-gpu-quick.md"

    text = "\n".join(gpu.summary_lines(rep))
    assert "NVIDIA H200" in text and "backend cupy: ok (1/1 checks)" in text
    assert "rows: 10 ok, 1 FAILED, 1 skipped" in text
    assert "x torch 5.00" in text and "x torchattacks 8.00" in text and "Mcand/s" in text


# -- end to end, numpy standing in for a GPU backend -----------------------------------------


def test_quick_gpu_run_with_a_stand_in_backend(tmp_path, cache, monkeypatch, capsys):
    def broken_jsma(*a, **kw):
        raise RuntimeError("jsma kernel crashed")
    # the timed attacks crash; validation (bench/validate.py's own engine) does not
    monkeypatch.setattr(gpu, "engine", SimpleNamespace(pgd=engine.pgd, jsma=broken_jsma,
                                                       pixel_attack=engine.pixel_attack))
    out = tmp_path / "results"
    rc = run.main(["--gpu", "--quick", "--no-torch", "--backends", "numpy,ghost",
                   "--only", "pgd,jsma", "--budget", "60", "--out", str(out)])  # no subsets
    assert rc == 1  # a FAILED row
    (path,) = out.glob("*-gpu-quick.json")
    rep = json.loads(path.read_text())
    assert rep["mode"] == "gpu-quick" and rep["status"] == "complete"
    assert rep["backends"]["numpy"]["status"] == "ok"
    assert rep["backends"]["ghost"]["status"] == "unavailable"
    assert rep["gemm_lib"].startswith(("cupy.matmul", "np.dot"))
    assert {"square", "64x784x256", "model mlp", "model cnn"} <= set(rep["gemm"])
    rows = {(r["item"], r["model"]): r for r in rep["results"]}
    assert set(rows) == {("pgd", "mlp"), ("pgd", "cnn"), ("jsma", "mlp"), ("jsma", "cnn")}
    for m in ("mlp", "cnn"):
        assert rows["pgd", m]["status"] == "ok" and rows["pgd", m]["images"] == 64
        assert rows["pgd", m]["x_bound"] > 0 and rows["pgd", m]["median_s"] > 0
        assert rows["jsma", m]["status"] == "FAILED"
        assert "jsma kernel crashed" in rows["jsma", m]["error"]
    md = (out / "latest-gpu-quick.md").read_text()
    assert "## Failures" in md and "jsma kernel crashed" in md
    captured = capsys.readouterr()
    assert captured.err.index("numpy: ok") < captured.err.index("pgd")  # validated first
    assert "advkern GPU bench" in captured.out
    assert "rows: 2 ok, 2 FAILED, 0 skipped" in captured.out
    # the cluster arithmetic reads the same report: the validated backend's PGD on the cnn
    # (numpy stands in) and the square sgemm rate, in TFLOP/s
    from bench import cluster_plan
    rates = dict(cluster_plan.gpu_rates(str(path)))
    assert rates == {"advkern numpy PGD on the cnn, measured": rows["pgd", "cnn"]["gflops"] / 1e3,
                     "cuBLAS square sgemm, measured": rep["gemm"]["square"]["gflops"] / 1e3}
    (row,) = cluster_plan.plan([("r", 33.0)], 0.1, nodes=10, gpus=8, steps=100, gflop=8.2)
    assert row["gpu_images_s"] == pytest.approx(33e12 / (201 * 8.2e9))
    assert row["cluster_images_s"] == pytest.approx(80 * row["gpu_images_s"] / 1.1)
    assert row["seconds"]["ImageNet validation (50,000)"] == pytest.approx(
        50_000 / row["cluster_images_s"])


# -- the baselines' code, on the CPU (where torch / torchattacks are installed) ---------------


def test_torch_tf32_switches_and_the_torch_loop_on_a_device_argument():
    torch = pytest.importorskip("torch")
    from advkern.nets import build
    from bench import torch_pgd

    before = torch_pgd.tf32_flags(torch)
    try:
        torch_pgd.set_tf32(torch, False, False)
        assert torch_pgd.tf32_flags(torch) == {"matmul": False, "cudnn": False}
        torch_pgd.set_tf32(torch, True, True)
        assert torch_pgd.tf32_flags(torch) == {"matmul": True, "cudnn": True}
    finally:
        torch_pgd.set_tf32(torch, **before)
    assert torch_pgd.tf32_flags(torch) == before
    torch_pgd.synchronize(torch, "cpu")  # a no-op off CUDA

    model = build("mlp", seed=0)
    x, y = gpu.gpu_data(6)
    net = torch_pgd.build(torch, model, "cpu")
    adv = torch_pgd.pgd(torch, net, x, y, 0.3, 0.01, 3, batch=6)
    ref = engine.pgd(model, x, y, 0.3, 0.01, 3)
    assert np.mean(np.isclose(adv, ref, rtol=0, atol=1e-6)) >= 0.99


def test_torchattacks_wrappers_on_the_cpu():
    torch = pytest.importorskip("torch")
    ta = pytest.importorskip("torchattacks")
    from advkern.nets import build
    from bench import torch_pgd
    from bench import torchattacks_baseline as tab

    model = build("mlp", seed=0)
    x, y = gpu.gpu_data(4)
    net = torch_pgd.build(torch, model, "cpu")

    adv = tab.pgd(ta, torch, net, x, y, 0.3, 0.01, 3)
    assert adv.shape == x.shape and adv.dtype == np.float32
    assert np.abs(adv - x).max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    same = torch_pgd.pgd(torch, net, x, y, 0.3, 0.01, 3, batch=4)  # summed vs mean loss
    assert np.mean(np.isclose(adv, same, rtol=0, atol=1e-6)) >= 0.99

    adv, info = tab.onepixel(ta, torch, net, x[:2], y[:2], steps=2, popsize=12, inf_batch=12)
    assert info["members"] == 12 and info["candidates"] == 2 * (2 + 1) * 12  # no early stop
    assert adv.shape == (2, 1, 28, 28)
    assert all(np.count_nonzero(a != b) <= 1 for a, b in zip(adv, x[:2]))

    adv, info = tab.jsma(ta, torch, net, x[:2], y[:2], 1.0, 0.02)
    assert adv.shape == (2, 1, 28, 28) and 0 < info["jacobians"] <= 2 * 8  # ceil(784*.02/2)
    assert all(np.count_nonzero(a != b) <= 2 * 8 for a, b in zip(adv, x[:2]))
