"""``python -m bench``: validate every backend against the reference, then time it.

Like llm.c's dev/cuda: each kernel is checked beside its CPU reference before it is timed,
and a backend that fails a check is reported FAILED and never timed. Then, for each
validated backend, float32:

- primitives: loss_grad (mlp batch 1000, cnn 250 and 1000), jacobian (mlp, 100 images),
  linf_step (1000 images), jsma_best_pair (100 images, n = 784, full domain), de_score
  (50 images x 400 one-pixel candidates, mlp and cnn);
- attacks through ``advkern.engine``: PGD-40 L-inf (eps 0.3, alpha 0.01, 1000 images in one
  batch), JSMA pair-wise (theta 1, gamma 0.1, target (y + 1) mod 10, 100 images), the
  one-pixel DE attack (popsize 400, 75 generations, early stop, 50 images), on the bundled
  mlp and cnn and the bundled MNIST test split;
- a plain PyTorch autograd PGD-40 loop on the same weights and images, when torch imports.

Each item: one warm-up call (reported as "first s": it includes any JIT compilation that
validation did not already do), then the median of a few repeats, within a time budget per
item (a slow backend is timed on fewer repeats, and an attack on the first images only; the
row says so). See bench/README.md for the FLOP accounting and the columns.

``python -m bench --gpu`` is the GPU mode (``bench/gpu.py``): the same validation for the GPU
backends, then whole attacks at GPU sizes beside PyTorch-CUDA, torchattacks and the cuBLAS
GEMM bound.
"""

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time

import numpy as np

from advkern import engine, kernels
from advkern.errors import AdvkernError
from advkern.kernels import numpy_backend
from advkern.kernels.contract import missing_primitives
from advkern.reference import jsma as rj
from advkern.reference import pixel as rp

from . import flops, report, torch_pgd, validate

F32 = np.float32
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ITEMS = ("loss_grad", "jacobian", "linf_step", "jsma_best_pair", "de_score", "pgd", "jsma",
         "pixel", "torch")
MODELS = ("mlp", "cnn")
GPU_ITEMS = ("pgd", "pixel", "jsma", "torch", "torchattacks")  # --gpu (bench/gpu.py)

# The sizes. budget_s: the most seconds one item should take per backend.
FULL = {
    "loss_grad": {"mlp": [1000], "cnn": [250, 1000]}, "jacobian": {"mlp": 100},
    "linf_step": 1000, "jsma_best_pair": 100, "de_score": (50, 400),
    "pgd": {"images": 1000, "steps": 40, "eps": 0.3, "alpha": 0.01},
    "jsma": {"images": 100, "theta": 1.0, "gamma": 0.1},
    "pixel": {"images": 50, "popsize": 400, "generations": 75},
    "torch_batches": {"mlp": [1000], "cnn": [50, 100, 250, 1000]},
    "gemm_square": 1024, "gemm_batch": 1000,
    "repeats_primitive": 5, "repeats_attack": 3, "budget_s": 60.0, "settle_s": 0.3,
    "val_images": 8, "val_pgd_steps": 10, "val_jsma_gamma": 0.1, "val_popsize": 40,
    "val_generations": 5,
}
# A smoke run: small untrained models (advkern.nets.build, nothing is trained), tiny sizes.
QUICK = {
    "loss_grad": {"mlp": [64], "cnn": [16, 64]}, "jacobian": {"mlp": 8},
    "linf_step": 64, "jsma_best_pair": 8, "de_score": (4, 20),
    "pgd": {"images": 32, "steps": 3, "eps": 0.3, "alpha": 0.01},
    "jsma": {"images": 2, "theta": 1.0, "gamma": 0.01},
    "pixel": {"images": 4, "popsize": 12, "generations": 3},
    "torch_batches": {"mlp": [32], "cnn": [8, 32]},
    "gemm_square": 256, "gemm_batch": 64,
    "repeats_primitive": 2, "repeats_attack": 1, "budget_s": 2.0, "settle_s": 0.0,
    "val_images": 3, "val_pgd_steps": 3, "val_jsma_gamma": 0.01, "val_popsize": 12,
    "val_generations": 3,
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# -- timing ------------------------------------------------------------------------------------


def settle(seconds):
    """Idle before an item is timed. OpenBLAS's pthread workers spin for ~0.1 s after each
    multithreaded GEMM (the sgemm rates, the numpy backend, the previous item) and take a
    core from whatever runs next: measured here, numba_cpu's mlp loss_grad 4.6 ms alone,
    9.2 ms right after a multithreaded np.dot."""
    if seconds > 0:
        time.sleep(seconds)


def _timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def measure(fn, repeats, budget, cold_ok):
    """One warm-up call, then up to ``repeats`` timed calls within ``budget`` s; the median.

    cold_ok (a backend without a JIT, e.g. numpy): when the warm-up alone takes over half
    the budget it is the one sample (it has nothing to compile).
    """
    first, _ = _timed(fn)
    if cold_ok and first > budget / 2:
        return {"first_s": first, "times_s": [first], "median_s": first, "cold": True}
    times = [_timed(fn)[0] for _ in range(max(1, min(repeats, int(budget // max(first, 1e-6)))))]
    return {"first_s": first, "times_s": times, "median_s": statistics.median(times),
            "cold": False}


def measure_attack(call, n_total, probe, repeats, budget):
    """Time ``call(n, **kw)`` (the attack on the first n images) within ``budget`` s.

    probe (n1, kw, scale): a cheap version of the attack (kw: fewer steps or generations;
    scale: full cost / probe cost). It runs on n1 images twice (a warm-up, which includes
    any JIT compilation, then timed), then once more on as many images as 10% of the budget
    allows (per-image costs shrink with the batch, so the estimate is taken near the real
    one). Its time * scale / images estimates the attack's seconds per image, which picks
    the images (all, or the first ones that fit the budget); when the first full run takes
    under a third of the budget on a subset, the subset is re-sized from that run. Repeats
    then fill the budget.
    Returns (images, the last result, timing dict).
    """
    n1, kw, scale = probe
    n1 = min(n1, n_total)
    first, _ = _timed(call, n1, **kw)
    t1 = _timed(call, n1, **kw)[0]
    n2 = min(n_total, max(n1, int(0.1 * budget * n1 / max(t1, 1e-6))))
    per_image = (_timed(call, n2, **kw)[0] if n2 > n1 else t1) * scale / n2
    n = n_total if per_image * n_total <= budget else max(1, int(budget / per_image))
    t, out = _timed(call, n)
    if n < n_total and t < budget / 3:
        # The probe overestimated (per-call overheads, a late JIT specialisation, load):
        # size the subset from this real run instead, which then counts as a warm-up.
        n = n_total if t * n_total / n <= budget else max(n + 1, int(budget * n / t))
        t, out = _timed(call, n)
    times = [t]
    for _ in range(min(repeats, int(budget // max(t, 1e-6))) - 1):
        t, out = _timed(call, n)
        times.append(t)
    return n, out, {"first_s": first, "times_s": times, "median_s": statistics.median(times),
                    "cold": False}


def make_row(item, kind, model, backend, batch, images, images_total, timing, gflop, key,
             extra=None, notes=""):
    """One result: the timing, images/s and GFLOP/s (the bounds are added at the end)."""
    t = timing["median_s"]
    row = {"item": item, "kind": kind, "model": model, "backend": backend, "batch": batch,
           "images": images, "images_total": images_total, "repeats": len(timing["times_s"]),
           "first_s": timing["first_s"], "times_s": timing["times_s"], "median_s": t,
           "min_s": min(timing["times_s"]), "ms_per_image": 1e3 * t / images,
           "images_per_s": images / t, "gflop": gflop, "gflops": gflop / t if gflop else None,
           "bound_s": None, "x_bound": None, "x_bound_square": None, "x_numpy": None,
           "key": key, "extra": extra or {}, "notes": notes}
    if timing.get("cold"):
        row["notes"] = (notes + "; " if notes else "") + "one cold call (over budget)"
    return row


def add_ratios(rows, rates):
    """x numpy (the numpy backend's ms/img over the row's) and the distance to the GEMM bound."""
    numpy_ms = {r["key"]: r["ms_per_image"] for r in rows if r["backend"] == "numpy"}
    for r in rows:
        if r["key"] in numpy_ms:
            r["x_numpy"] = numpy_ms[r["key"]] / r["ms_per_image"]
        rate = rates.get(f"model {r['model']}")
        if r["gflop"] and rate and "square" in rates:
            r["bound_s"] = r["gflop"] / rate["gflops"]
            r["x_bound"] = r["median_s"] / r["bound_s"]
            r["x_bound_square"] = r["median_s"] / (r["gflop"] / rates["square"]["gflops"])


def bound_note(rows, rates):
    """A note when a kernel doing full GEMM work beat the measured sgemm rate by > 20%."""
    full_work = ("loss_grad", "jacobian", "pgd")  # de_score / DE may score incrementally
    fast = [r for r in rows if r["item"] in full_work and r["gflops"]
            and r["gflops"] > 1.2 * rates[f"model {r['model']}"]["gflops"]]
    if not fast:
        return None
    r = max(fast, key=lambda r: r["gflops"] / rates[f"model {r['model']}"]["gflops"])
    sgemm = rates[f"model {r['model']}"]["gflops"]
    return (f"{r['backend']} {r['item']} ({r['model']}) ran at {r['gflops']:.0f} GFLOP/s, above "
            f"the sgemm rate np.dot reached on the same shapes ({sgemm:.1f} GFLOP/s): np.dot "
            "was slowed in this run (e.g. BLAS threads competing with other load), so the GEMM "
            "bounds are pessimistic (x bound < 1)")


# -- the benchmarked items ---------------------------------------------------------------------


def primitive_items(cfg, models, x, y, only):
    """[(item, model, batch label, images, GFLOP, work, make)]; make(be) -> a timed callable.

    work: (unit, amount) for the items that are not GEMMs: linf_step counts bytes moved
    (x, g, x0 read, x' written: 16 bytes a feature in float32), jsma_best_pair the pairs
    of the search (n (n - 1) / 2 per image, credited whether scored or pruned).
    """
    items = []

    def want(name):
        return only is None or name in only

    for name, batches in cfg["loss_grad"].items():
        for b in batches if want("loss_grad") else ():
            def make(be, m=models[name], b=b):
                net, xd, yd = be.prepare(m, F32), be.to_device(x[:b]), be.to_device(y[:b])
                return lambda: be.loss_grad(net, xd, yd, "ce")
            items.append(("loss_grad", name, b, b, flops.loss_grad(models[name], b) / 1e9,
                          None, make))
    for name, b in cfg["jacobian"].items() if want("jacobian") else ():
        def make(be, m=models[name], b=b):
            net, xd = be.prepare(m, F32), be.to_device(x[:b])
            return lambda: be.jacobian(net, xd)
        items.append(("jacobian", name, b, b, flops.jacobian(models[name], b) / 1e9, None,
                      make))
    if want("linf_step"):
        n = cfg["linf_step"]
        rng = np.random.default_rng(0)
        x0 = x[:n].reshape(n, -1)
        xa = np.clip(x0 + rng.uniform(-0.2, 0.2, x0.shape), 0, 1).astype(F32)
        g = rng.standard_normal(x0.shape, dtype=F32)

        def make(be, n=n):
            args = [be.to_device(a) for a in (xa, g, x0, np.full(n, 0.3, F32),
                                              np.full(n, 0.01, F32))]
            active = be.to_device(np.ones(n, bool))
            return lambda: be.linf_step(*args, 0.0, 1.0, active)
        items.append(("linf_step", "-", n, n, None, ("GB/s", 16 * x0.size / 1e9), make))
    if want("jsma_best_pair"):
        n = cfg["jsma_best_pair"]
        net = numpy_backend.prepare(models["mlp"], F32)
        jac, z = numpy_backend.jacobian(net, x[:n])
        a, b = rj.saliency_terms(jac, z, (y[:n] + 1) % models["mlp"].num_classes, True)
        d = a.shape[1]

        def make(be):
            ad, bd, dom = be.to_device(a), be.to_device(b), be.to_device(np.ones(a.shape, bool))
            return lambda: be.jsma_best_pair(ad, bd, dom, 1.0)
        items.append(("jsma_best_pair", "mlp", n, n, None,
                      ("Gpair/s", n * d * (d - 1) / 2 / 1e9), make))
    n, p = cfg["de_score"]
    for name in MODELS if want("de_score") else ():
        m = models[name]
        lower, upper = rp.candidate_bounds(m.input_shape, 1, (0.0, 1.0), F32)
        pop = np.stack([rp.init_population(np.random.default_rng([0, i]), p, lower, upper)
                        for i in range(n)])

        def make(be, m=m, pop=pop, n=n):
            net = be.prepare(m, F32)
            xd, yd, pd = be.to_device(x[:n]), be.to_device(y[:n]), be.to_device(pop)
            return lambda: be.de_score(net, xd, yd, pd, False)
        items.append(("de_score", name, f"{n}x{p}", n, flops.de_score(m, n, p) / 1e9,
                      ("Mcand/s", n * p / 1e6), make))
    return items


def attack_items(cfg, models, x, y, only):
    """[(item, model, images, call(backend) -> run(n, **kw), probe, gflop_of, extra_of)]."""
    items = []
    pg, js, px = cfg["pgd"], cfg["jsma"], cfg["pixel"]
    for name in MODELS:
        m = models[name]
        if only is None or "pgd" in only:
            def call(backend, m=m):
                return lambda n, steps=pg["steps"]: (engine.pgd(
                    m, x[:n], y[:n], pg["eps"], pg["alpha"], steps, backend=backend), None)
            # The engine runs steps + 1 loss_grad calls; the probe runs 1 step.
            items.append(("pgd", name, pg["images"], call,
                          (2, {"steps": 1}, (pg["steps"] + 1) / 2),
                          lambda n, out, m=m: flops.pgd(m, n, pg["steps"]) / 1e9,
                          lambda n, out, m=m: {"success_rate": float(np.mean(
                              m.predict(out[0]) != y[:n]))}))
        if only is None or "jsma" in only:
            def call(backend, m=m):
                return lambda n: engine.jsma(m, x[:n], y[:n], "next", theta=js["theta"],
                                             gamma=js["gamma"], backend=backend)
            items.append(("jsma", name, js["images"], call, (2, {}, 1.0),
                          lambda n, out, m=m: flops.jsma(m, out[1]["iterations"]) / 1e9,
                          lambda n, out: {"success_rate": float(out[1]["success"].mean()),
                                          "mean_iterations": float(out[1]["iterations"].mean()),
                                          "mean_l0": float(out[1]["l0"].mean())}))
        if only is None or "pixel" in only:
            def call(backend, m=m):
                return lambda n, generations=px["generations"]: engine.pixel_attack(
                    m, x[:n], y[:n], pixels=1, popsize=px["popsize"], generations=generations,
                    seed=0, backend=backend)
            # Worst case for the estimate: no image stops early.
            items.append(("pixel", name, px["images"], call,
                          (2, {"generations": 1}, (px["generations"] + 1) / 2),
                          lambda n, out, m=m: flops.pixel(m, out[1]["queries"]) / 1e9,
                          lambda n, out: {
                              "success_rate": float(out[1]["success"].mean()),
                              "generations_mean": float(out[1]["generations"].mean()),
                              "generations_max": int(out[1]["generations"].max()),
                              "queries_mean": float(out[1]["queries"].mean())}))
    return items


# -- the run -----------------------------------------------------------------------------------


def load_models(quick):
    from advkern.nets import build
    from advkern.nets.zoo import cache_path, pretrained

    if quick:
        return {name: build(name, seed=0) for name in MODELS}
    for name in MODELS:
        if not cache_path(name).exists():
            log(f"training the bundled {name} (first use; cached under $ADVKERN_CACHE) ...")
    return {name: pretrained(name, progress=False) for name in MODELS}


def resolve_backends(requested):
    """[(name, module or None, note)] for the requested names (default: every registered)."""
    names = requested or list(kernels._BACKENDS)  # the registry's names, importable or not
    out = []
    for name in names:
        try:
            out.append((name, kernels.get(name), ""))
        except AdvkernError as e:
            if "unknown backend" in str(e):
                raise
            out.append((name, None, str(e)))
    return out


def validate_backend(name, be, models, x, y, cfg, refs):
    """(status, checks, seconds) for one backend; never raises."""
    t0 = time.perf_counter()
    missing = missing_primitives(be)
    if missing:
        return "FAILED", [validate._check("contract", False, f"missing {missing}")], 0.0
    checks = []
    try:
        for tag, m in models.items():
            if name == "numpy":
                checks += validate.check_engine_numpy(m, tag, x, y, refs)
            else:
                checks += validate.check_primitives(be, m, tag, x, y, cfg)
                checks += validate.check_attacks(name, be, m, tag, x, y, refs)
    except Exception as e:  # a crashing kernel is a failed validation, not a crashed run
        checks.append(validate._check("exception", False, f"{type(e).__name__}: {e}"))
    ok = all(c["ok"] for c in checks)
    return ("ok" if ok else "FAILED"), checks, time.perf_counter() - t0


def gemm_rates(cfg, models):
    sq, b = cfg["gemm_square"], cfg["gemm_batch"]
    rates = {"square": {"shapes": f"{sq}x{sq}x{sq}", "gflops": flops.sgemm_rate(sq, sq, sq)},
             f"{b}x784x256": {"shapes": f"{b}x784 @ 784x256",
                              "gflops": flops.sgemm_rate(b, 784, 256)}}
    for name, m in models.items():
        rates[f"model {name}"] = {
            "shapes": f"the {name}'s forward + dx GEMMs at batch {b} (im2col for conv): "
                      + ", ".join(f"{p}x{q}x{r}" for p, q, r in flops.gemm_shapes(m, b)),
            "gflops": flops.model_rate(m, b)}
    return rates


def time_backend(name, be, prims, attacks, cfg, keep):
    rows = []
    budget, cold_ok = cfg["budget_s"], name == "numpy"
    for item, model, batch, n, gflop, work, make in prims:
        fn = make(be)
        settle(cfg["settle_s"])
        timing = measure(fn, cfg["repeats_primitive"], budget, cold_ok)
        extra = {work[0]: work[1] / timing["median_s"]} if work else {}
        rows.append(make_row(item, "primitive", model, name, batch, n, n, timing, gflop,
                             f"{item}/{model}/{batch}", extra))
        log(f"  {name:10s} {item:15s} {model:4s} {batch!s:>8}: "
            f"{1e3 * timing['median_s']:.2f} ms")
    for item, model, n_total, call, probe, gflop_of, extra_of in attacks:
        settle(cfg["settle_s"])
        n, out, timing = measure_attack(call(name), n_total, probe, cfg["repeats_attack"],
                                        budget)
        if item == "pgd":
            keep[model, name] = out[0]
        rows.append(make_row(item, "attack", model, name, n, n, n_total, timing,
                             gflop_of(n, out), f"{item}/{model}", extra_of(n, out)))
        log(f"  {name:10s} {item:15s} {model:4s} {n:>4}/{n_total} images: "
            f"{timing['median_s']:.2f} s")
    return rows


def torch_baseline(cfg, models, x, y, keep, status):
    """Time the PyTorch PGD loop on the advkern weights, after checking its logits."""
    torch, why = torch_pgd.load()
    if torch is None:
        status["torch (baseline)"] = {"status": "skipped", "note": why}
        return [], None
    tol_checks, nets = [], {}
    nv = cfg["val_images"]
    for name, m in models.items():
        nets[name] = torch_pgd.build(torch, m)
        tol_checks.append(validate._close(
            f"{name} torch logits", torch_pgd.logits(torch, nets[name], x[:nv]),
            numpy_backend.logits(numpy_backend.prepare(m, F32), x[:nv]),
            validate.tolerance(m)))
    ok = all(c["ok"] for c in tol_checks)
    status["torch (baseline)"] = {"status": "ok" if ok else "FAILED", "checks": tol_checks,
                                  "note": f"torch {torch.__version__}, "
                                          f"set_num_threads({torch_pgd.THREADS})"}
    if not ok:
        return [], torch
    pg, rows = cfg["pgd"], []
    for name, batches in cfg["torch_batches"].items():
        for batch in batches:
            def call(n, steps=pg["steps"], net=nets[name], batch=batch):
                return torch_pgd.pgd(torch, net, x[:n], y[:n], pg["eps"], pg["alpha"], steps,
                                     batch)
            settle(cfg["settle_s"])
            n, out, timing = measure_attack(call, pg["images"],
                                            (batch, {"steps": 1}, pg["steps"]),
                                            cfg["repeats_attack"], cfg["budget_s"])
            extra = {"success_rate": float(np.mean(models[name].predict(out) != y[:n]))}
            ref = keep.get((name, "numpy"))
            if ref is not None:
                k = min(len(ref), n)
                extra["agree_vs_numpy"] = float(np.mean(np.isclose(out[:k], ref[:k], rtol=0,
                                                                   atol=1e-6)))
            rows.append(make_row("pgd", "torch", name, "torch", batch, n, pg["images"], timing,
                                 flops.pgd(models[name], n, pg["steps"]) / 1e9, f"pgd/{name}",
                                 extra))
            log(f"  torch      pgd             {name:4s} batch {batch}: "
                f"{timing['median_s']:.2f} s")
        group = [r for r in rows if r["model"] == name]
        if len(group) > 1:
            best = min(group, key=lambda r: r["ms_per_image"])
            best["notes"] = "best torch batch"
    return rows, torch


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes on small untrained models (a smoke run, seconds)")
    p.add_argument("--gpu", action="store_true",
                   help="GPU mode (bench/gpu.py): validate the GPU backends, then time whole "
                        "attacks beside PyTorch-CUDA and torchattacks and the cuBLAS bound")
    p.add_argument("--backends", help="comma-separated backends (default: every registered "
                                      "one; --gpu: cupy,numba_cuda; unavailable ones are "
                                      "skipped with a note)")
    p.add_argument("--only", help="comma-separated items: " + ",".join(ITEMS)
                   + "; --gpu: pgd,pixel,jsma,torch,torchattacks")
    p.add_argument("--no-torch", action="store_true",
                   help="skip the PyTorch baseline (--gpu: and torchattacks)")
    p.add_argument("--out", default=RESULTS, help="results folder (default: bench/results)")
    p.add_argument("--budget", type=float, help="seconds per item and backend (default: 60, "
                                                "quick 2; --gpu: 12 times the item's weight)")
    p.add_argument("--repeats", type=int, help="timed repeats per item (default: 5 for "
                                               "primitives, 3 for attacks)")
    p.add_argument("--total", type=float, help="--gpu: seconds for the whole run, validation "
                                               "included (default 130); items that no "
                                               "longer fit are reported skipped")
    p.add_argument("--torch-device", default="cuda",
                   help="--gpu: the device of the torch and torchattacks baselines (default "
                        "cuda; cpu exercises their code on a machine without a GPU)")
    args = p.parse_args(argv)
    if args.only:
        args.only = {s.strip() for s in args.only.split(",") if s.strip()}
        known = GPU_ITEMS if args.gpu else ITEMS
        bad = sorted(args.only - set(known))
        if bad:
            p.error(f"unknown items {bad}: use {', '.join(known)}")
    if not args.gpu and (args.total is not None or args.torch_device != "cuda"):
        p.error("--total and --torch-device go with --gpu")
    return args


def main(argv=None):
    """Run the benchmark; returns 0, or 1 when a backend failed validation (2: bad usage)."""
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    args = parse_args(argv)
    try:
        if args.gpu:
            from . import gpu  # imported in this mode only (it brings torch and torchattacks)
            return gpu.run(args, command)
        return _run(args, command)
    except AdvkernError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2


def _run(args, command):
    cfg = dict(QUICK if args.quick else FULL)
    if args.budget is not None:
        cfg["budget_s"] = args.budget
    if args.repeats is not None:
        cfg["repeats_primitive"] = cfg["repeats_attack"] = max(1, args.repeats)
    now = datetime.datetime.now().astimezone()
    backends = resolve_backends(args.backends.split(",") if args.backends else None)
    rep = {"schema": 1, "date": now.isoformat(timespec="seconds"),
           "stamp": now.strftime("%Y%m%d-%H%M%S"), "command": command,
           "mode": "quick" if args.quick else "full", "machine": report.machine_info(),
           "load_avg_start": report.load_avg(), "settings": cfg, "backends": {}, "gemm": {},
           "results": [], "notes": []}
    x, y = _data()
    models = load_models(args.quick)
    nv = cfg["val_images"]

    # 1. validate every available backend (the numpy backend first: it is the yardstick).
    refs = validate.RefAttacks(cfg)
    timed = []
    for name, be, note in sorted(backends, key=lambda b: b[0] != "numpy"):
        if be is None:
            rep["backends"][name] = {"status": "unavailable", "note": note}
            rep["notes"].append(f"backend {name} skipped: {note}")
            log(f"{name}: unavailable, skipped ({note})")
            continue
        log(f"{name}: validating ...")
        status, checks, secs = validate_backend(name, be, models, x[:nv], y[:nv], cfg, refs)
        rep["backends"][name] = {"status": status, "checks": checks, "validate_s": secs,
                                 "note": "" if status == "ok" else "not timed"}
        log(f"{name}: {status} ({sum(c['ok'] for c in checks)}/{len(checks)} checks, "
            f"{secs:.1f} s)")
        if status == "ok":
            timed.append((name, be))

    # 2. time them.
    only = args.only
    prims = primitive_items(cfg, models, x, y, only) if timed else []
    attacks = attack_items(cfg, models, x, y, only) if timed else []
    run_torch = not args.no_torch and (only is None or "torch" in only)
    if prims or attacks or run_torch:
        log("measuring sgemm rates ...")
        rep["gemm"] = gemm_rates(cfg, models)
    keep, torch = {}, None
    for name, be in timed:
        rep["results"] += time_backend(name, be, prims, attacks, cfg, keep)
    if run_torch:
        rows, torch = torch_baseline(cfg, models, x, y, keep, rep["backends"])
        rep["results"] += rows
        if rep["backends"]["torch (baseline)"]["status"] == "skipped":
            rep["notes"].append(rep["backends"]["torch (baseline)"]["note"])
    elif args.no_torch:
        rep["notes"].append("PyTorch baseline skipped (--no-torch)")

    # 3. the sgemm rates once more (the best of the two measurements counts), the ratios to
    # the numpy backend and to the GEMM bound, and the outputs.
    if rep["gemm"]:
        log("measuring sgemm rates again ...")
        for key, again in gemm_rates(cfg, models).items():
            r = rep["gemm"][key]
            r["measured"] = [r["gflops"], again["gflops"]]
            r["gflops"] = max(r["measured"])
    add_ratios(rep["results"], rep["gemm"])
    note = bound_note(rep["results"], rep["gemm"]) if rep["gemm"] else None
    if note:
        rep["notes"].append(note)
    rep["versions"] = report.versions(torch)
    rep["load_avg_end"] = report.load_avg()
    rep["notes"].append("timings on a shared machine are noisy: compare rows of one run, and "
                        f"see the load average ({rep['load_avg_start']} at start, "
                        f"{rep['load_avg_end']} at end)")
    report.print_report(rep)
    for path in report.write(rep, args.out):
        print(f"wrote {path}")
    failed = [n for n, b in rep["backends"].items() if b["status"] == "FAILED"]
    return 1 if failed else 0


def _data():
    from advkern.nets.datasets import load_mnist
    x, y = load_mnist("test", dtype=F32)
    return x, y


if __name__ == "__main__":
    sys.exit(main())
