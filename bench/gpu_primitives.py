"""``python -m bench.gpu_primitives``: the GPU backends' primitives at the issue's sizes, timed
after a device sync (median of a few calls after a warm-up), plus the host-side cost the DE
attack pays per generation (its draws), so that an attack's time can be split into GEMMs,
custom kernels, launches and host work.

Prints one line per (backend, primitive) and writes ``--out FILE.json``. Float32, bundled
mlp / cnn weights (trained and cached on first use, as everywhere in bench/).
"""

import argparse
import json
import statistics
import sys
import time

import numpy as np

from advkern import kernels
from advkern.nets import zoo
from advkern.reference import pixel as rp

from .gpu import gpu_data, sync_for


def _timed(fn, sync, repeats=5):
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(backends, n_pgd=10000, n_de=1000, pop=400, n_jsma=1000, repeats=5):
    x, y = gpu_data(n_pgd)
    models = {m: zoo.pretrained(m, progress=False).astype(np.float32) for m in ("mlp", "cnn")}
    rows = []

    def add(backend, prim, model, n, seconds, units, per):
        rows.append({"backend": backend, "primitive": prim, "model": model, "n": n,
                     "ms": seconds * 1e3, "per_s": units / seconds, "unit": per})
        print(f"{backend:10s} {prim:16s} {model:4s} n={n:6d} {seconds * 1e3:9.3f} ms  "
              f"{units / seconds:11.4g} {per}/s", flush=True)

    rng = np.random.default_rng(0)
    lower, upper = rp.candidate_bounds((1, 28, 28), 1, (0.0, 1.0), np.float32)
    pops = np.stack([rp.init_population(rng, pop, lower, upper) for _ in range(n_de)])
    rngs = [np.random.default_rng(i) for i in range(n_de)]
    t0 = time.perf_counter()
    for _ in range(5):
        rp.generation_draws(rngs, pop, pops.shape[2], None)
    host_draw = (time.perf_counter() - t0) / 5
    add("host", "generation_draws", "-", n_de, host_draw, n_de * pop, "cand")

    for name in backends:
        be = kernels.get(name)
        sync = sync_for(be.xp)
        for m, model in models.items():
            net = be.prepare(model, np.float32)
            xd, yd = be.to_device(x), be.to_device(y)
            n = len(x)
            ones = be.to_device(np.ones(n, bool))
            e = be.to_device(np.full(n, 0.3, np.float32))
            a = be.to_device(np.full(n, 0.01, np.float32))
            add(name, "logits", m, n, _timed(lambda: be.logits(net, xd), sync, repeats), n,
                "img")
            add(name, "loss_grad", m, n,
                _timed(lambda: be.loss_grad(net, xd, yd, "ce"), sync, repeats), n, "img")
            add(name, "pgd_step", m, n,
                _timed(lambda: be.pgd_step(net, xd, yd, "ce", False, xd, e, a, 0.0, 1.0, ones,
                                           "linf"), sync, repeats), n, "img")
            if m == "mlp":
                _, g, _ = be.loss_grad(net, xd, yd, "ce")
                add(name, "linf_step", m, n,
                    _timed(lambda: be.linf_step(xd, g, xd, e, a, 0.0, 1.0, ones), sync,
                           repeats), n, "img")
                nj = min(n_jsma, n)
                ad = be.to_device(rng.standard_normal((nj, 784)).astype(np.float32))
                bd = be.to_device(rng.standard_normal((nj, 784)).astype(np.float32))
                dom = be.to_device(np.ones((nj, 784), bool))
                add(name, "jsma_best_pair", m, nj,
                    _timed(lambda: be.jsma_best_pair(ad, bd, dom, 1.0), sync, repeats), nj,
                    "img")
                seeds = be.to_device(rng.standard_normal((nj, 2, 10)).astype(np.float32))
                add(name, "jacobian(R=2)", m, nj,
                    _timed(lambda: be.jacobian(net, xd[:nj], seeds), sync, repeats), nj,
                    "img")
            xde, yde = be.to_device(x[:n_de]), be.to_device(y[:n_de])
            pd = be.to_device(pops)
            add(name, "de_score", m, n_de,
                _timed(lambda: be.de_score(net, xde, yde, pd, False), sync, max(2, repeats // 2)),
                n_de * pop, "cand")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_primitives", description=__doc__)
    ap.add_argument("--backends", default="cupy,numba_cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    names = [b for b in args.backends.split(",") if b in kernels.available()]
    if not names:
        print("no GPU backend available here", file=sys.stderr)
        return 2
    rows = run(names, repeats=args.repeats)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
