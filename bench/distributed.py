"""``python -m bench.distributed``: the cost of sharding over Dask, at equal cores.

PGD-40 L-inf (eps 0.3, alpha 0.01, no random start) on the bundled cnn over the 5,000
bundled MNIST images (``load_mnist("all")``: train then test), float32, backend ``auto``:

- ``one process``: ``advkern.attacks.run_attack`` on all images (a fast backend takes the
  whole batch at once), using every core of this process;
- ``LocalCluster 1 x C``: ``advkern.distributed.evaluate`` on one worker process pinned to
  the same C cores (``distributed.local_cluster``);
- ``LocalCluster 2 x C/2``: two worker processes, C/2 cores each.

All clusters are started first (their start-up is reported apart, once per cluster), then
every process runs a warm-up (for a cluster: an evaluation of its first chunks, which loads
the kernels in the workers), then ``--repeats`` rounds in which every setup runs once, each
round starting with the next setup, so that a change of the machine's load hits all setups
alike. A cluster run's time is the whole ``evaluate`` call as a user sees it: shipping the
model, the workers reading their chunks, the chunk tasks, gathering, and the metrics over all
images. Two one-process rows: as a user runs it, and with NumPy's BLAS single-threaded (as
Dask runs its workers: OpenBLAS's idle threads spin after each multi-threaded GEMM, see
section 2 of the README, and the evaluation's reference forward uses NumPy's BLAS); a round's
baseline is the faster of the two. ``overhead (paired)``: the median over rounds of the run's
time / its round's baseline, minus 1 (the issue's target: <= 10%); ``overhead (medians)``: the
median time / the median baseline, minus 1. Every distributed result is checked to equal the
one-process result bit for bit (x_adv and the per-image records).

Writes ``bench/results/<stamp>-distributed.{json,md}`` (``--out``). ``--quick``: the
untrained cnn, 200 images, PGD-5 (a smoke run of the script, not a measurement).

``--malloc``: why ``local_cluster`` unsets Dask's ``MALLOC_TRIM_THRESHOLD_=65536``: PGD-40 on
500 images in a fresh process with and without the variable (BLAS single-threaded, as in a
worker), ``--repeats`` runs each after a warm-up, wall time and minor page faults per run.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from advkern import distributed as D
from advkern.attacks import run_attack
from advkern.nets import build
from advkern.nets.datasets import load_mnist

from . import report

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PGD = {"eps": 0.3, "alpha": 0.01, "steps": 40}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _same(a, b):
    return np.array_equal(a.x_adv, b.x_adv) and a.info.keys() == b.info.keys() and all(
        np.array_equal(a.info[k], b.info[k], equal_nan=a.info[k].dtype.kind == "f")
        for k in a.info)


def run(quick=False, repeats=3, chunk=D.DEFAULT_CHUNK, workers=(1, 2), log=print):
    """The rows (one process first, then one per cluster size) and the settings.

    The setups are timed in turns (one process, 1 worker, 2 workers, then again, starting
    each round with the next setup), so a change of the machine's load hits them alike; a
    cluster's overhead is the median over rounds of its time / the one-process time of the
    same round, minus 1.
    """
    if quick:
        model, n, params = build("cnn", seed=0), 200, dict(PGD, steps=5)
    else:
        from advkern.nets.zoo import pretrained
        model, n, params = pretrained("cnn"), 5000, PGD
    x, y = load_mnist("all")
    x, y = x[:n], y[:n]
    cores = len(D._cores())
    clients, startup = {}, {}
    try:
        for w in workers:
            log(f"LocalCluster {w} x {cores // w} cores: start ...")
            startup[w], clients[w] = _timed(lambda: D.local_cluster(w))
        def one_blas1():
            # as the Dask workers run: OpenBLAS single-threaded (Dask's default for workers;
            # numba_cpu runs its own GEMMs single-threaded per thread anyway, but the
            # evaluation's reference forward uses NumPy's BLAS, whose idle threads spin)
            with threadpool_limits(1, user_api="blas"):
                return run_attack(model, x, y, "pgd", **params)

        setups = [(0, lambda: run_attack(model, x, y, "pgd", **params)), (-1, one_blas1)]
        setups += [(w, lambda c=c: D.evaluate(model, "all", "pgd", params, client=c, n=n,
                                              chunk=chunk)) for w, c in clients.items()]
        log("warm-up (kernels loaded in every process) ...")
        run_attack(model, x[:chunk], y[:chunk], "pgd", **params)
        for w, c in clients.items():
            D.evaluate(model, "all", "pgd", params, client=c, n=min(n, w * chunk), chunk=chunk)
        times, results = {w: [] for w, _ in setups}, {}
        for r in range(repeats):
            for k in range(len(setups)):
                w, fn = setups[(r + k) % len(setups)]
                t, results[w] = _timed(fn)
                times[w].append(t)
                log(f"round {r + 1}: {w if w > 0 else ''} "
                    f"{'one process' if w == 0 else 'one process, BLAS 1' if w < 0 else 'worker(s)'}"
                    f" {t:.2f} s")
    finally:
        for c in clients.values():
            cluster = c.cluster
            c.close()
            cluster.close()
    one = results[0]
    # the baseline of a round: the faster of the two one-process runs
    base_r = [min(a, b) for a, b in zip(times[0], times[-1])]
    base = statistics.median(base_r)
    rows = []
    names = {0: "one process", -1: "one process, BLAS 1 thread"}
    for w, _ in setups:
        med = statistics.median(times[w])
        paired = [t / t0 - 1 for t, t0 in zip(times[w], base_r)]
        rows.append({"setup": names[w] if w <= 0 else f"LocalCluster {w} x {cores // w}",
                     "workers": max(w, 0), "cores_per_worker": cores // max(w, 1),
                     "times_s": times[w], "median_s": med, "ms_per_image": 1e3 * med / n,
                     "overhead": statistics.median(paired),
                     "overhead_of_medians": med / base - 1,
                     "startup_s": startup.get(w, 0.0), "equal": _same(one, results[w]),
                     "backend": results[w].params["backend"]})
    return rows, {"images": n, "params": params, "chunk": chunk, "repeats": repeats,
                  "model": "cnn (untrained)" if quick else "cnn (bundled, trained)",
                  "cores": cores}


_MALLOC_CHILD = """
import json, resource, sys, time
from threadpoolctl import threadpool_limits
from advkern.attacks import run_attack
from advkern.nets.datasets import load_mnist
from advkern.nets.zoo import pretrained
m = pretrained("cnn", progress=False)
x, y = load_mnist("all")
x, y = x[:500], y[:500]
p = json.loads(sys.argv[2])
out = []
with threadpool_limits(1, user_api="blas"):
    run_attack(m, x, y, "pgd", progress=False, **p)
    for _ in range(int(sys.argv[1])):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run_attack(m, x, y, "pgd", progress=False, **p)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        out.append([time.perf_counter() - t0, r1.ru_minflt - r0.ru_minflt])
print(json.dumps(out))
"""


def malloc_check(repeats=4, log=print):
    """{setting: [[seconds, minor faults], ...]}: PGD-40 on 500 images, fresh processes with
    and without MALLOC_TRIM_THRESHOLD_=65536, alternated twice."""
    import subprocess
    out = {"unset": [], "65536": []}
    for _ in range(2):
        for k in out:
            env = {e: v for e, v in os.environ.items() if e != "MALLOC_TRIM_THRESHOLD_"}
            if k != "unset":
                env["MALLOC_TRIM_THRESHOLD_"] = k
            r = subprocess.run([sys.executable, "-c", _MALLOC_CHILD, str(repeats),
                                json.dumps(PGD)], env=env, capture_output=True, text=True,
                               check=True)
            out[k] += json.loads(r.stdout)
            log(f"MALLOC_TRIM_THRESHOLD_ {k}: {out[k][-repeats:]}")
    return out


def malloc_markdown(res, rep):
    lines = [f"# Dask's MALLOC_TRIM_THRESHOLD_ and an attack ({rep['stamp']})", "",
             f"`{rep['command']}` on {rep['machine']['cpu_model']}; PGD-40 L-inf on the bundled "
             "cnn, 500 images, float32, BLAS 1 thread, one process per setting (two each, "
             f"alternated); load average {rep['load_avg_start']} at start, "
             f"{rep['load_avg_end']} at end.", "",
             "| MALLOC_TRIM_THRESHOLD_ | median s | range s | median minor page faults |",
             "|---|---|---|---|"]
    for k, runs in res.items():
        t = [a for a, _ in runs]
        f = [b for _, b in runs]
        lines.append(f"| {k} | {statistics.median(t):.3f} | {min(t):.3f}-{max(t):.3f} | "
                     f"{statistics.median(f):,.0f} |")
    return "\n".join(lines) + "\n"


def markdown(rows, meta, rep):
    lines = [f"# advkern.distributed overhead ({rep['stamp']})", "",
             f"`{rep['command']}` on {rep['machine']['cpu_model']}, {meta['cores']} cores; "
             f"PGD-{meta['params']['steps']} L-inf on the {meta['model']}, {meta['images']} "
             f"images, chunks of {meta['chunk']}, median of {meta['repeats']}; load average "
             f"{rep['load_avg_start']} at start, {rep['load_avg_end']} at end (a shared "
             "machine: noisy).", "",
             "| setup | backend | median s | ms/img | overhead (paired) | overhead (medians) "
             "| runs s, in rounds | cluster start s | equal to one process |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['backend']} | {r['median_s']:.2f} | "
                     f"{r['ms_per_image']:.3f} | {100 * r['overhead']:+.1f}% | "
                     f"{100 * r['overhead_of_medians']:+.1f}% | "
                     f"{', '.join(f'{t:.2f}' for t in r['times_s'])} | "
                     f"{r['startup_s']:.1f} | {'yes' if r['equal'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.distributed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: untrained cnn, 200 "
                    "images, PGD-5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=D.DEFAULT_CHUNK)
    ap.add_argument("--workers", default="1,2", help="cluster sizes (1,2)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--malloc", action="store_true", help="only the MALLOC_TRIM_THRESHOLD_ "
                    "check (two processes per setting, --repeats runs each)")
    args = ap.parse_args(argv)
    now = datetime.datetime.now().astimezone()
    rep = {"stamp": now.strftime("%Y%m%d-%H%M%S"), "date": now.isoformat(timespec="seconds"),
           "command": " ".join(["python -m bench.distributed", *(sys.argv[1:] if argv is None
                                                                 else argv)]),
           "machine": report.machine_info(), "load_avg_start": report.load_avg()}
    if args.malloc:
        res = malloc_check(args.repeats, log=lambda m: print(m, file=sys.stderr, flush=True))
        rep.update(load_avg_end=report.load_avg(), runs=res, versions=report.versions())
        text = malloc_markdown(res, rep)
        print(text)
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, f"{rep['stamp']}-malloc-trim")
        with open(base + ".json", "w") as f:
            json.dump(rep, f, indent=1, default=str)
        with open(base + ".md", "w") as f:
            f.write(text)
        print(f"wrote {base}.md and .json")
        return 0
    rows, meta = run(args.quick, args.repeats, args.chunk,
                     [int(w) for w in args.workers.split(",")],
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    rep.update(load_avg_end=report.load_avg(), meta=meta, rows=rows,
               versions=report.versions())
    text = markdown(rows, meta, rep)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"{rep['stamp']}-distributed" + ("-quick" if args.quick
                                                                    else ""))
    with open(base + ".json", "w") as f:
        json.dump(rep, f, indent=1, default=str)
    with open(base + ".md", "w") as f:
        f.write(text)
    print(f"wrote {base}.md and .json")
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
