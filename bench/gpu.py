"""``python -m bench --gpu``: the GPU backends' whole attacks beside PyTorch and torchattacks.

1. Validation, exactly as the CPU mode (``bench/validate.py`` through ``run.validate_backend``):
   each GPU backend (default ``cupy`` and ``numba_cuda``; a name the registry does not know
   or that does not import is reported unavailable) against the ``numpy`` backend on the
   first 8 test images of each bundled model. A backend that fails is not timed.
2. Whole attacks, float32, on the bundled ``mlp`` and ``cnn`` and the bundled MNIST images
   (the 1,000 test images, then the 4,000 train images, repeated to 10,000):
   - PGD-40 L-inf, eps 0.3, alpha 0.01, 10,000 images in one batch;
   - one-pixel DE, popsize 400, 100 generations, ``early_stop=False`` (so exactly
     1000 * 400 * 101 candidates), 1,000 images: candidate evaluations/s;
   - JSMA pair-wise, theta 1, gamma 0.1, target (y + 1) mod 10, 1,000 images (the cnn last:
     it runs if time is left);
   beside, in the same run: a plain PyTorch autograd PGD-40 loop on CUDA (``torch_pgd``,
   one batch, cuDNN for the cnn) with TF32 off in cuBLAS and cuDNN (the main figure) and
   again with torch's default TF32 settings, and torchattacks' PGD, JSMA and OnePixel
   (``torchattacks_baseline``; its per-image JSMA and OnePixel on a few images only).
3. GEMM bound: the attack's GEMM FLOPs (``flops.py``) over the cuBLAS sgemm rate measured in
   the same run with ``cupy.matmul`` on float32 (TF32 off: CUPY_TF32 must be unset): a big
   square, the (10000 x 784) @ (784 x 256) product and each model's own GEMMs at batch 10,000.

Timing: every clock read follows a device synchronisation. Per item: a probe (PGD 1 step, DE
1 generation, JSMA as it is) on 2 images twice (the first call, "first s", compiles), then on
more images to estimate the full cost; the full workload (or, if it would not fit the item's
budget, the first images that do: ``images a/b``) once as a warm-up, then the median of up to
``--repeats`` timed runs within the budget (a row whose only run was that first one says so).
Items share one deadline (``--total`` seconds from the start): each gets at most
``--budget`` * its weight, and its weighted share of the time left. An exception in one item
is caught: the row is FAILED with its traceback in the report, and the run goes on. The report
is rewritten after every item, so a run killed by a timeout still leaves one.

torch and torchattacks are imported here only, and only in this mode; advkern never imports
them.
"""

import datetime
import importlib.metadata
import os
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np

from advkern import engine, kernels
from advkern.errors import AdvkernError
from advkern.kernels import numpy_backend

from . import flops, report, torch_pgd, validate
from . import run as cpu
from . import torchattacks_baseline as tab

F32 = np.float32
GPU_BACKENDS = ("cupy", "numba_cuda")
ATTACKS = ("pgd", "pixel", "jsma")
ITEMS = cpu.GPU_ITEMS  # the attacks, then the baselines "torch" and "torchattacks"
MODELS = ("mlp", "cnn")

# The sizes. Weights: each item's share of the time (see run_items).
FULL = {
    "pgd": {"images": 10000, "steps": 40, "eps": 0.3, "alpha": 0.01},
    "pixel": {"images": 1000, "popsize": 400, "generations": 100},
    "jsma": {"images": 1000, "theta": 1.0, "gamma": 0.1},
    "ta_jsma_images": 10, "ta_pixel_images": 3, "ta_pixel_inf_batch": 400,
    "gemm_square": 8192, "gemm_batch": 10000,
    "repeats_attack": 3, "budget_s": 12.0, "total_s": 130.0, "min_item_s": 1.0,
    "data_images": 10000,
}
QUICK = {
    "pgd": {"images": 64, "steps": 3, "eps": 0.3, "alpha": 0.01},
    "pixel": {"images": 4, "popsize": 12, "generations": 3},
    "jsma": {"images": 4, "theta": 1.0, "gamma": 0.01},
    "ta_jsma_images": 2, "ta_pixel_images": 1, "ta_pixel_inf_batch": 12,
    "gemm_square": 256, "gemm_batch": 64,
    "repeats_attack": 1, "budget_s": 2.0, "total_s": 120.0, "min_item_s": 0.05,
    "data_images": 64,
}
VALIDATION = ("val_images", "val_pgd_steps", "val_jsma_gamma", "val_popsize", "val_generations")
WEIGHTS = {("pgd", "mlp"): 1.0, ("pgd", "cnn"): 1.5, ("pixel", "mlp"): 2.0,
           ("pixel", "cnn"): 3.0, ("jsma", "mlp"): 1.0, ("jsma", "cnn"): 1.0}
BASELINE_WEIGHT = {"torch": 1.0, "torchattacks": {"pgd": 1.0, "jsma": 1.5, "pixel": 2.0}}

log = cpu.log


def settings(quick):
    """The GPU mode's sizes, with the CPU mode's validation sizes (validation is the same)."""
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in
           (QUICK if quick else FULL).items()}
    base = cpu.QUICK if quick else cpu.FULL
    cfg.update({k: base[k] for k in VALIDATION})
    return cfg


# -- device, versions ---------------------------------------------------------------------


def check_tf32_env(environ=None):
    """CuPy uses TF32 for float32 GEMMs only when CUPY_TF32=1: the bound needs it unset."""
    env = os.environ if environ is None else environ
    if "CUPY_TF32" in env:
        raise AdvkernError(f"CUPY_TF32={env['CUPY_TF32']!r} is set: unset it (the GEMM bound "
                           "and the backends must run float32 GEMMs without TF32)")


def import_cupy():
    """(cupy, None), or (None, why) where CuPy or a CUDA device is missing."""
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return None, f"CuPy unusable here: {type(e).__name__}: {e}"
    return cupy, None


def _cuda_version(v):
    return f"{v // 1000}.{(v % 1000) // 10}" if isinstance(v, int) else v


def device_info(cupy=None, torch=None):
    """The GPU: name, memory, SMs, compute capability, driver, CUDA driver/runtime, cuBLAS."""
    info = {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            name, driver, mem = [s.strip() for s in out.stdout.splitlines()[0].split(",")]
            info.update(name=name, driver=driver, memory=mem)
    except Exception as e:  # no nvidia-smi (a CPU machine), or it hung
        info["nvidia_smi"] = f"{type(e).__name__}: {e}"
    if cupy is not None:
        try:
            rt = cupy.cuda.runtime
            props = rt.getDeviceProperties(cupy.cuda.Device().id)
            name = props["name"]
            info.setdefault("name", name.decode() if isinstance(name, bytes) else name)
            info["sms"] = props.get("multiProcessorCount")
            info["compute_capability"] = f"{props.get('major')}.{props.get('minor')}"
            info["memory_gib"] = round(props.get("totalGlobalMem", 0) / 2**30, 1)
            info["cuda_driver"] = _cuda_version(rt.driverGetVersion())
            info["cuda_runtime"] = _cuda_version(rt.runtimeGetVersion())
            try:
                info["cublas"] = cupy.cuda.cublas.getVersion(cupy.cuda.device.get_cublas_handle())
            except Exception:
                pass
        except Exception as e:
            info["cupy_error"] = f"{type(e).__name__}: {e}"
    if torch is not None:
        info["torch_cuda"] = torch.version.cuda
        try:
            info["cudnn"] = torch.backends.cudnn.version()
            if torch.cuda.is_available():
                info.setdefault("name", torch.cuda.get_device_name())
        except Exception:
            pass
    return info


def gpu_versions(torch=None):
    """report.versions plus CuPy, numba-cuda and torchattacks (those that are installed)."""
    out = report.versions(torch)
    for dist in ("cupy-cuda13x", "cupy-cuda12x", "cupy", "numba", "numba-cuda", "torchattacks"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    if "cupy" in sys.modules:
        out["cupy_module"] = sys.modules["cupy"].__version__
    if torch is not None:
        out["torch_cuda"] = torch.version.cuda
    return out


def sync_for(xp):
    """A callable that waits for xp's device (a no-op for numpy arrays)."""
    cuda = getattr(xp, "cuda", None)
    if cuda is None or not hasattr(cuda, "Device"):
        return lambda: None
    return lambda: cuda.Device().synchronize()


# -- timing -------------------------------------------------------------------------------


def measure(call, n_total, probe, repeats, budget, sync, clock=time.perf_counter):
    """Time ``call(n, **kw)`` (the attack on the first n images) within ``budget`` s.

    probe (n1, kw, scale): a cheap version (kw: fewer steps / generations; scale: full cost
    over probe cost). It runs on n1 images twice (the first call compiles; "first s"), then
    on as many images as 5% of the budget allows (a GPU's per-image cost falls steeply with
    the batch), which estimates the full attack's seconds per image. n = all images if that
    estimate fits the budget, else the first ones that do; a first run at n is the warm-up
    (when its time says all images would fit after all, n is re-sized to them and run again);
    then up to ``repeats`` timed runs while they fit the budget, their median. When none
    fits, the first run is the one sample (note). Every clock read follows ``sync()``.
    Returns (n, the last result, timing dict, notes).
    """
    t_start = clock()

    def timed(n, **kw):
        sync()
        t0 = clock()
        out = call(n, **kw)
        sync()
        return clock() - t0, out

    def left():
        return budget - (clock() - t_start)

    n1, kw, scale = probe
    n1 = max(1, min(n1, n_total))
    first, _ = timed(n1, **kw)
    t1, _ = timed(n1, **kw)
    n2 = min(n_total, max(n1, int(0.05 * budget * n1 / max(t1, 1e-6))))
    t2 = timed(n2, **kw)[0] if n2 > n1 else t1
    per_image = t2 * scale / n2
    n = n_total if per_image * n_total <= left() else max(1, int(0.9 * left() / per_image))
    notes = []
    t, out = timed(n)
    if n < n_total:  # the probe overestimates what a big batch costs: re-size from this run
        n_new = n_total if t * n_total / n <= left() else int(0.9 * left() * n / max(t, 1e-9))
        if n_new >= n_total or n_new > 1.25 * n:
            n = min(n_total, n_new)
            t, out = timed(n)
    times = []
    while len(times) < repeats and t <= left():
        t, out = timed(n)
        times.append(t)
    if not times:
        times = [t]
        notes.append("one run: no warm-up at this size fitted the budget")
    return n, out, {"first_s": first, "times_s": times, "median_s": statistics.median(times),
                    "cold": False}, notes


# -- rows, ratios -------------------------------------------------------------------------


def finish_row(row, status="ok"):
    row["status"] = status
    row.setdefault("x_torch", None)
    row.setdefault("x_ta", None)
    row.setdefault("cand_per_s", None)
    row.setdefault("mcand_per_s", None)
    return row


def failed_row(item, model, backend, images_total, status, notes, error=None):
    """A row for an item that raised (FAILED, with the traceback) or did not run (skipped)."""
    row = {"item": item, "kind": "attack", "model": model, "backend": backend, "batch": None,
           "images": None, "images_total": images_total, "repeats": 0, "first_s": None,
           "times_s": [], "median_s": None, "min_s": None, "ms_per_image": None,
           "images_per_s": None, "gflop": None, "gflops": None, "bound_s": None,
           "x_bound": None, "x_bound_square": None, "x_numpy": None, "key": f"{item}/{model}",
           "extra": {}, "notes": notes}
    if error:
        row["error"] = error
    return finish_row(row, status)


def add_gpu_ratios(rows, rates):
    """x torch, x torchattacks and the GEMM bound of every row that ran (in place).

    x torch: the PyTorch loop's (TF32 off) ms/img over the row's, same model, PGD only.
    x torchattacks: torchattacks' ms/img over the row's (per image), for DE its candidate
    rate: the row's candidates/s over torchattacks' (its population is 399, not 400).
    x bound: median / (GEMM FLOPs / the model's shape-matched cuBLAS rate); x bound sq the
    same at the square product's rate. > 1 on x torch / x torchattacks: this row is faster.
    """
    ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get("median_s")]
    torch_ms = {r["model"]: r["ms_per_image"] for r in ok
                if r["item"] == "pgd" and r["backend"] == "torch"}
    ta = {(r["item"], r["model"]): r for r in ok if r["backend"] == "torchattacks"}
    for r in ok:
        if r["item"] == "pgd" and r["model"] in torch_ms:
            r["x_torch"] = torch_ms[r["model"]] / r["ms_per_image"]
        t = ta.get((r["item"], r["model"]))
        if t is not None:
            if r["item"] == "pixel":
                if r.get("cand_per_s") and t.get("cand_per_s"):
                    r["x_ta"] = r["cand_per_s"] / t["cand_per_s"]
            else:
                r["x_ta"] = t["ms_per_image"] / r["ms_per_image"]
        model_rate, square = rates.get(f"model {r['model']}"), rates.get("square")
        if r.get("gflop") and model_rate:
            r["bound_s"] = r["gflop"] / model_rate["gflops"]
            r["x_bound"] = r["median_s"] / r["bound_s"]
        if r.get("gflop") and square:
            r["x_bound_square"] = r["median_s"] / (r["gflop"] / square["gflops"])
    return rows


def summary_lines(rep):
    """The short summary printed at the end (and by bench/gpu_check.sh from the JSON)."""
    dev = rep.get("device", {})
    lines = [f"advkern GPU bench: {dev.get('name', '?')}, driver {dev.get('driver', '?')}, "
             f"{rep.get('status', '?')} ({rep.get('elapsed_s', 0):.0f} s)"]
    for name, b in rep.get("backends", {}).items():
        checks = b.get("checks", [])
        lines.append(f"  backend {name}: {b['status']}"
                     + (f" ({sum(c['ok'] for c in checks)}/{len(checks)} checks)"
                        if checks else "") + (f" {b['note']}" if b.get("note") else ""))
    rows = rep.get("results", [])
    count = {s: sum(r.get("status", "ok") == s for r in rows) for s in ("ok", "FAILED", "skipped")}
    lines.append(f"  rows: {count['ok']} ok, {count['FAILED']} FAILED, "
                 f"{count['skipped']} skipped")
    for r in rows:
        if r.get("status", "ok") != "ok":
            lines.append(f"  {r['item']:5s} {r['model']:3s} {r['backend']:17s} "
                         f"{r['status']}: {r['notes']}")
            continue
        imgs = r["images"] if r["images"] == r["images_total"] else \
            f"{r['images']}/{r['images_total']}"
        parts = [f"{report._fmt(r['ms_per_image'])} ms/img ({imgs} img)"]
        if r.get("mcand_per_s"):
            parts.append(f"{report._fmt(r['mcand_per_s'])} Mcand/s")
        for key, label in (("x_torch", "x torch"), ("x_ta", "x torchattacks"),
                           ("x_bound", "x bound")):
            if r.get(key) is not None:
                parts.append(f"{label} {report._fmt(r[key])}")
        lines.append(f"  {r['item']:5s} {r['model']:3s} {r['backend']:17s} " + ", ".join(parts))
    return lines


# -- the run ------------------------------------------------------------------------------


def gpu_data(n):
    """float32 images (n, 1, 28, 28) and labels: the bundled test split, then the train split,
    repeated to n (so the first 1,000 are the test images)."""
    from advkern.nets.datasets import load_mnist
    xt, yt = load_mnist("test", dtype=F32)
    xr, yr = load_mnist("train", dtype=F32)
    x, y = np.concatenate([xt, xr]), np.concatenate([yt, yr])
    reps = -(-n // len(x))
    return (np.ascontiguousarray(np.concatenate([x] * reps)[:n]),
            np.ascontiguousarray(np.concatenate([y] * reps)[:n]))


def resolve(names):
    """[(name, module or None, note)]; unknown names are unavailable here, not an error."""
    out = []
    for name in names:
        if name not in kernels._BACKENDS:
            out.append((name, None, f"not registered in advkern.kernels "
                                    f"(known: {', '.join(sorted(kernels._BACKENDS))})"))
            continue
        try:
            out.append((name, kernels.get(name), ""))
        except AdvkernError as e:
            out.append((name, None, str(e)))
    return out


class Item:
    def __init__(self, item, model, backend, images_total, weight, run):
        self.item, self.model, self.backend = item, model, backend
        self.images_total, self.weight, self.run = images_total, weight, run


class Ctx:
    """What the items share: settings, models, data, the validated backends, torch."""

    def __init__(self, cfg, models, x, y):
        self.cfg, self.models, self.x, self.y = cfg, models, x, y
        self.keep = {}  # (model, backend) -> PGD result, for the agreement fractions
        self.pred_be = None  # a validated GPU backend for the success rates (else numpy)
        self._nets = {}
        self.torch = self.ta = None
        self.torch_device = None
        self.torch_nets = {}
        self.tf32_default = None

    def predict(self, name, x):
        """Labels of the model on x, on the GPU when a backend is validated (fast)."""
        m, be = self.models[name], self.pred_be
        if be is None or be.xp is np:
            return m.predict(x)
        if name not in self._nets:
            self._nets[name] = be.prepare(m, F32)
        out = []
        for a in range(0, len(x), 10000):
            z = be.to_host(be.logits(self._nets[name], be.to_device(x[a:a + 10000])))
            out.append((z[:, 0] > 0).astype(np.int64) if z.shape[1] == 1 else z.argmax(1))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def agreement(self, name, out):
        """{agree_vs_<backend>: fraction of features equal (atol 1e-6)} to the first kept
        PGD result of a GPU backend on the same model."""
        for (mname, bname), ref in self.keep.items():
            if mname == name:
                k = min(len(ref), len(out))
                return {f"agree_vs_{bname}": float(np.mean(np.isclose(
                    out[:k], ref[:k], rtol=0, atol=1e-6)))}
        return {}


def backend_item(ctx, attack, name, bname):
    """The Item that times advkern's engine on backend ``bname``."""
    cfg, m, x, y = ctx.cfg, ctx.models[name], ctx.x, ctx.y
    be = kernels.get(bname)
    sync = sync_for(be.xp)
    reps = cfg["repeats_attack"]
    a = cfg[attack]

    if attack == "pgd":
        def call(n, steps=a["steps"]):
            return engine.pgd(m, x[:n], y[:n], a["eps"], a["alpha"], steps, backend=bname)
        probe = (2, {"steps": 1}, (a["steps"] + 1) / 2)
    elif attack == "jsma":
        def call(n):
            return engine.jsma(m, x[:n], y[:n], "next", theta=a["theta"], gamma=a["gamma"],
                               backend=bname)
        probe = (2, {}, 1.0)
    else:
        def call(n, generations=a["generations"]):
            return engine.pixel_attack(m, x[:n], y[:n], pixels=1, popsize=a["popsize"],
                                       generations=generations, seed=0, early_stop=False,
                                       backend=bname)
        probe = (2, {"generations": 1}, (a["generations"] + 1) / 2)

    def run(budget):
        n, out, timing, notes = measure(call, a["images"], probe, reps, budget, sync)
        if attack == "pgd":
            gflop = flops.pgd(m, n, a["steps"]) / 1e9
            extra = {"success_rate": float(np.mean(ctx.predict(name, out) != y[:n])),
                     **ctx.agreement(name, out)}  # vs the backend timed before, if any
            ctx.keep.setdefault((name, bname), out)
            batch = n
        elif attack == "jsma":
            info = out[1]
            gflop = flops.jsma(m, info["iterations"]) / 1e9
            extra = {"success_rate": float(info["success"].mean()),
                     "mean_iterations": float(info["iterations"].mean()),
                     "mean_l0": float(info["l0"].mean())}
            batch = n
        else:
            info = out[1]
            cands = int(np.sum(info["queries"]))
            gflop = flops.pixel(m, info["queries"]) / 1e9
            extra = {"success_rate": float(info["success"].mean()), "candidates": cands,
                     "generations_max": int(info["generations"].max())}
            batch = f"{n}x{a['popsize']}"
        row = cpu.make_row(attack, "attack", name, bname, batch, n, a["images"], timing, gflop,
                           f"{attack}/{name}", extra, "; ".join(notes))
        if attack == "pixel":
            row["cand_per_s"] = extra["candidates"] / timing["median_s"]
            row["mcand_per_s"] = row["cand_per_s"] / 1e6
        return finish_row(row)

    return Item(attack, name, bname, a["images"], WEIGHTS[attack, name], run)


def torch_item(ctx, name, label, flags):
    """PyTorch's PGD loop with the TF32 switches ``flags`` (one batch of all the images)."""
    torch, cfg, m, x, y = ctx.torch, ctx.cfg, ctx.models[name], ctx.x, ctx.y
    a = cfg["pgd"]
    net = ctx.torch_nets[name]

    def call(n, steps=a["steps"]):
        return torch_pgd.pgd(torch, net, x[:n], y[:n], a["eps"], a["alpha"], steps, n)

    def run(budget):
        torch_pgd.set_tf32(torch, **flags)
        try:
            n, out, timing, notes = measure(call, a["images"], (2, {"steps": 1}, a["steps"]),
                                            cfg["repeats_attack"], budget,
                                            lambda: torch_pgd.synchronize(torch, ctx.torch_device))
        finally:
            torch_pgd.set_tf32(torch, False, False)
        extra = {"success_rate": float(np.mean(ctx.predict(name, out) != y[:n])),
                 "tf32": dict(flags), **ctx.agreement(name, out)}
        notes = [f"TF32 cuBLAS {flags['matmul']}, cuDNN {flags['cudnn']}"] + notes
        row = cpu.make_row("pgd", "torch", name, label, n, n, a["images"], timing,
                           flops.pgd(m, n, a["steps"]) / 1e9, f"pgd/{name}", extra,
                           "; ".join(notes))
        return finish_row(row)

    return Item("pgd", name, label, a["images"], BASELINE_WEIGHT["torch"], run)


def torchattacks_item(ctx, attack, name):
    """torchattacks' PGD / JSMA / OnePixel (TF32 off) on the first images."""
    torch, ta, cfg, m, x, y = ctx.torch, ctx.ta, ctx.cfg, ctx.models[name], ctx.x, ctx.y
    net = ctx.torch_nets[name]
    a = cfg[attack]
    sync = lambda: torch_pgd.synchronize(torch, ctx.torch_device)  # noqa: E731
    if attack == "pgd":
        total = a["images"]

        def call(n, steps=a["steps"]):
            return tab.pgd(ta, torch, net, x[:n], y[:n], a["eps"], a["alpha"], steps)
        probe = (2, {"steps": 1}, a["steps"])
    elif attack == "jsma":
        total = min(cfg["ta_jsma_images"], a["images"])

        def call(n):
            return tab.jsma(ta, torch, net, x[:n], y[:n], a["theta"], a["gamma"])
        probe = (1, {}, 1.0)
    else:
        total = min(cfg["ta_pixel_images"], a["images"])

        def call(n, steps=a["generations"]):
            return tab.onepixel(ta, torch, net, x[:n], y[:n], steps, a["popsize"],
                                cfg["ta_pixel_inf_batch"], early_stop=False)
        probe = (1, {"steps": 1}, (a["generations"] + 1) / 2)

    def run(budget):
        torch_pgd.set_tf32(torch, False, False)
        n, out, timing, notes = measure(call, total, probe, cfg["repeats_attack"], budget, sync)
        if attack != "pgd":
            notes.insert(0, "per-image loop")
        cand = None
        if attack == "pgd":
            adv = out
            gflop = flops.pgd(m, n, a["steps"]) / 1e9
            extra = ctx.agreement(name, adv)
        elif attack == "jsma":
            adv, info = out
            gflop = info["jacobians"] * (1 + m.num_logits) * flops.fwd(m) / 1e9
            extra = {"jacobians": info["jacobians"], "mean_iterations": info["jacobians"] / n}
        else:
            adv, info = out
            cand = info["candidates"]
            gflop = cand * flops.fwd(m) / 1e9
            extra = {"candidates": cand, "population": info["members"],
                     "inf_batch": cfg["ta_pixel_inf_batch"]}
            notes.append(f"population {info['members']}, early stop off")
        pred = ctx.predict(name, adv)
        target = (y[:n] + 1) % m.num_classes
        extra["success_rate"] = float(np.mean(pred == target if attack == "jsma"
                                              else pred != y[:n]))
        row = cpu.make_row(attack, "torchattacks", name, "torchattacks", n, n, total, timing,
                           gflop, f"{attack}/{name}", extra, "; ".join(notes))
        if cand is not None:
            row["cand_per_s"] = cand / timing["median_s"]
            row["mcand_per_s"] = row["cand_per_s"] / 1e6
        return finish_row(row)

    weight = BASELINE_WEIGHT["torchattacks"][attack]
    return Item(attack, name, "torchattacks", total, weight, run)


def free_memory(ctx):
    """Give the CuPy pool's and torch's cached blocks back between items."""
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        try:
            cupy.get_default_memory_pool().free_all_blocks()
        except Exception:
            pass
    if ctx.torch is not None and str(ctx.torch_device).startswith("cuda"):
        try:
            ctx.torch.cuda.empty_cache()
        except Exception:
            pass


def budget_for(items, i, cfg, remaining):
    """Item i's seconds: its weighted share of the time left, at most budget_s * weight."""
    w = items[i].weight
    share = remaining * w / max(sum(it.weight for it in items[i:]), 1e-9)
    return min(cfg["budget_s"] * w, share)


def run_items(ctx, items, deadline, checkpoint, clock=time.perf_counter):
    """Run every item within the deadline; an exception fails its row only."""
    rows = []
    for i, it in enumerate(items):
        remaining = deadline - clock()
        budget = budget_for(items, i, ctx.cfg, remaining)
        if budget < ctx.cfg["min_item_s"]:
            row = failed_row(it.item, it.model, it.backend, it.images_total, "skipped",
                             f"not run: {max(remaining, 0):.1f} s left of the --total budget")
            log(f"  {it.backend:17s} {it.item:5s} {it.model:3s}: skipped (out of time)")
        else:
            log(f"  {it.backend:17s} {it.item:5s} {it.model:3s}: budget {budget:.1f} s ...")
            t0 = clock()
            try:
                row = it.run(budget)
                row["item_s"] = clock() - t0
                log(f"  {it.backend:17s} {it.item:5s} {it.model:3s}: "
                    f"{row['images']}/{row['images_total']} images, "
                    f"{1e3 * row['median_s']:.1f} ms ({row['item_s']:.1f} s)")
            except Exception as e:  # one item's failure must not end a scarce GPU run
                tb = traceback.format_exc()
                row = failed_row(it.item, it.model, it.backend, it.images_total, "FAILED",
                                 f"{type(e).__name__}: {e}".splitlines()[0][:200], tb)
                row["item_s"] = clock() - t0
                log(f"  {it.backend:17s} {it.item:5s} {it.model:3s}: FAILED\n{tb}")
            finally:
                free_memory(ctx)
        rows.append(row)
        checkpoint(rows)
    return rows


def setup_torch(ctx, rep, device):
    """Import torch, build the nets on ``device`` and check their logits with TF32 off; the
    status goes into rep['backends']['torch (baseline)'] (never raises). ctx.torch is set
    only when the check passed."""
    torch, why = torch_pgd.load(threads=None)
    if torch is None:
        rep["backends"]["torch (baseline)"] = {"status": "skipped", "note": why}
        rep["notes"].append(why)
        return
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        why = f"torch {torch.__version__}: CUDA not available (torch baselines skipped)"
        rep["backends"]["torch (baseline)"] = {"status": "skipped", "note": why}
        rep["notes"].append(why)
        return
    ctx.tf32_default = torch_pgd.tf32_flags(torch)
    torch_pgd.set_tf32(torch, False, False)
    checks = []
    nv = ctx.cfg["val_images"]
    try:
        for name, m in ctx.models.items():
            ctx.torch_nets[name] = torch_pgd.build(torch, m, device)
            checks.append(validate._close(
                f"{name} torch logits (TF32 off)",
                torch_pgd.logits(torch, ctx.torch_nets[name], ctx.x[:nv]),
                numpy_backend.logits(numpy_backend.prepare(m, F32), ctx.x[:nv]),
                validate.tolerance(m)))
    except Exception as e:
        checks.append(validate._check("torch setup", False, f"{type(e).__name__}: {e}"))
        rep["notes"].append("torch setup failed:\n" + traceback.format_exc())
    ok = all(c["ok"] for c in checks)
    rep["backends"]["torch (baseline)"] = {
        "status": "ok" if ok else "FAILED", "checks": checks,
        "note": f"torch {torch.__version__} on {device}; defaults: TF32 cuBLAS "
                f"{ctx.tf32_default['matmul']}, cuDNN {ctx.tf32_default['cudnn']}"}
    if ok:
        ctx.torch, ctx.torch_device = torch, device


def build_items(ctx, timed, attacks, with_backends, want_torch, want_ta):
    """The items in order: per attack and model, the backends, then the baselines (so the
    JSMA on the cnn, the least needed, comes last)."""
    items = []
    for attack in attacks:
        for name in MODELS:
            if with_backends:
                items += [backend_item(ctx, attack, name, b) for b in timed]
            if attack == "pgd" and want_torch and ctx.torch is not None:
                items.append(torch_item(ctx, name, "torch", {"matmul": False, "cudnn": False}))
                items.append(torch_item(ctx, name, "torch (defaults)", ctx.tf32_default))
            if want_ta and ctx.ta is not None:
                items.append(torchattacks_item(ctx, attack, name))
    return items


def run(args, command):
    """The GPU mode: validate, time, write the reports; 0, or 1 when anything FAILED."""
    t_start = time.perf_counter()
    check_tf32_env()
    cfg = settings(args.quick)
    if args.budget is not None:
        cfg["budget_s"] = args.budget
    if args.repeats is not None:
        cfg["repeats_attack"] = max(1, args.repeats)
    if args.total is not None:
        cfg["total_s"] = args.total
    deadline = t_start + cfg["total_s"]
    now = datetime.datetime.now().astimezone()
    cupy, cupy_why = import_cupy()
    rep = {"schema": 1, "date": now.isoformat(timespec="seconds"),
           "stamp": now.strftime("%Y%m%d-%H%M%S"), "command": command,
           "mode": "gpu-quick" if args.quick else "gpu", "status": "running",
           "machine": report.machine_info(), "device": device_info(cupy),
           "load_avg_start": report.load_avg(), "settings": cfg, "backends": {}, "gemm": {},
           "gemm_lib": None, "results": [], "notes": [], "versions": gpu_versions()}
    if cupy is None:
        rep["notes"].append(cupy_why)

    def checkpoint(rows=None):
        if rows is not None:
            rep["results"] = rows
        rep["elapsed_s"] = time.perf_counter() - t_start
        try:
            report.write(rep, args.out)
        except Exception as e:  # a report that cannot be written must not end the run
            log(f"could not write the report: {e}")

    x, y = gpu_data(cfg["data_images"])
    models = cpu.load_models(args.quick)
    ctx = Ctx(cfg, models, x, y)
    nv = cfg["val_images"]

    # 1. validation (the CPU mode's checks).
    refs = validate.RefAttacks(cfg)
    timed = []
    names = args.backends.split(",") if args.backends else list(GPU_BACKENDS)
    checkpoint()  # a report exists from the start (a validation that hangs still leaves one)
    for name, be, note in resolve(names):
        if be is None:
            rep["backends"][name] = {"status": "unavailable", "note": note}
            rep["notes"].append(f"backend {name} skipped: {note}")
            log(f"{name}: unavailable, skipped ({note})")
            continue
        log(f"{name}: validating ...")
        status, checks, secs = cpu.validate_backend(name, be, models, x[:nv], y[:nv], cfg, refs)
        rep["backends"][name] = {"status": status, "checks": checks, "validate_s": secs,
                                 "note": "" if status == "ok" else "not timed",
                                 "xp": getattr(be.xp, "__name__", str(be.xp))}
        log(f"{name}: {status} ({sum(c['ok'] for c in checks)}/{len(checks)} checks, "
            f"{secs:.1f} s)")
        if status == "ok":
            timed.append(name)
            if ctx.pred_be is None and be.xp is not np:
                ctx.pred_be = be
        checkpoint()

    only = args.only
    attacks = [a for a in ATTACKS if only is None or a in only]
    with_backends = bool(attacks)
    if not attacks:
        attacks = list(ATTACKS)  # only baselines named: theirs for every attack
    want_torch = not args.no_torch and (only is None or "torch" in only)
    want_ta = not args.no_torch and (only is None or "torchattacks" in only)

    # 2. the cuBLAS sgemm rates (np.dot where CuPy is missing: a smoke run on a CPU).
    if timed or want_torch or want_ta:
        lib = flops.cupy_lib(cupy) if cupy is not None else flops.NUMPY
        rep["gemm_lib"] = lib.name + ("" if cupy is not None else " (CuPy missing)")
        log(f"measuring sgemm rates ({rep['gemm_lib']}) ...")
        try:
            rep["gemm"] = gemm_rates(cfg, models, lib)
        except Exception:
            rep["notes"].append("sgemm rates FAILED:\n" + traceback.format_exc())

    # 3. the baselines' setup (torch imported here only).
    if want_torch or want_ta:
        setup_torch(ctx, rep, args.torch_device)
        if want_ta and ctx.torch is not None:
            ctx.ta, why = tab.load()
            if ctx.ta is None:
                rep["notes"].append(why)
                rep["backends"]["torchattacks"] = {"status": "skipped", "note": why}
            else:
                rep["backends"]["torchattacks"] = {
                    "status": "ok", "note": f"torchattacks {ctx.ta.__version__}; TF32 off; "
                                            "JSMA and OnePixel: a few images (per-image loops)"}
    rep["versions"] = gpu_versions(ctx.torch)
    rep["device"] = device_info(cupy, ctx.torch)
    checkpoint()

    # 4. the items, one deadline for all.
    items = build_items(ctx, timed, attacks, with_backends, want_torch, want_ta)
    if with_backends and not timed:
        rep["notes"].append("no GPU backend validated: nothing of advkern's was timed")
    rows = run_items(ctx, items, deadline, checkpoint)

    add_gpu_ratios(rows, rep["gemm"])
    rep["results"] = rows
    rep["load_avg_end"] = report.load_avg()
    rep["status"] = "complete"
    rep["notes"].append("TF32: CuPy's GEMMs without (CUPY_TF32 unset); the torch and "
                        "torchattacks rows with TF32 off in cuBLAS and cuDNN except "
                        "'torch (defaults)'")
    rep["elapsed_s"] = time.perf_counter() - t_start
    report.print_report(rep)
    for path in report.write(rep, args.out):
        print(f"wrote {path}")
    print("\n".join(summary_lines(rep)))
    failed = [n for n, b in rep["backends"].items() if b["status"] == "FAILED"]
    bad_rows = [r for r in rows if r["status"] == "FAILED"]
    return 1 if failed or bad_rows else 0


def gemm_rates(cfg, models, lib):
    """The square, the (B x 784) @ (784 x 256) and each model's shape-matched rate at B."""
    sq, b = cfg["gemm_square"], cfg["gemm_batch"]
    rates = {"square": {"shapes": f"{sq}x{sq}x{sq}",
                        "gflops": flops.sgemm_rate(sq, sq, sq, repeats=3, lib=lib)},
             f"{b}x784x256": {"shapes": f"{b}x784 @ 784x256",
                              "gflops": flops.sgemm_rate(b, 784, 256, lib=lib)}}
    for name, m in models.items():
        rates[f"model {name}"] = {
            "shapes": f"the {name}'s forward + dx GEMMs at batch {b} (im2col for conv): "
                      + ", ".join(f"{p}x{q}x{r}" for p, q, r in flops.gemm_shapes(m, b)),
            "gflops": flops.model_rate(m, b, repeats=3, lib=lib)}
    return rates
