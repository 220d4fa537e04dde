"""``python -m bench.peer_attacks``: the attacks every peer has, advkern against torchattacks
on the CPU, on the bundled models and the first test images (float32, same weights).

Per attack and model: ms per image (median of the timed runs after a warm-up), the success
rate on the clean-correct images, the median L2 of the successful perturbations, and the
speed ratio. Settings are matched where both libraries have them:

- MI-FGSM: eps 0.3, 40 steps, alpha eps / 40, decay 1.0 (both);
- DeepFool: L2, overshoot 0.02, at most 50 steps (both; torchattacks loops over images);
- C&W L2 ("cw"): advkern's 9 binary-search rounds x 100 Adam steps (lr 0.1) against
  torchattacks' single c = 1, 100 steps, lr 0.01 (it has no binary search), kappa 0; and
  like for like ("cw 1x100"): advkern with torchattacks' settings (one c = 1, 100 steps,
  lr 0.01, kappa 0; both stop early when the loss stops falling).

Both libraries attack the same n images, except torchattacks' DeepFool (n_peer: it loops
over images in Python, ~50 ms each).

The GEMM bound (MI-FGSM, "cw 1x100"): the attack's matrix products, steps x (forward +
input-gradient backward) = 2 x steps x fwd FLOPs per image (``bench.flops``), at the
float32 rate ``np.dot`` reaches on this model's own GEMM shapes at batch n
(``flops.model_rate``). No implementation that does these products runs faster than
bound_s, so torchattacks_s / bound_s is the largest speed-up over torchattacks that any
CPU implementation can show on this machine ("max x").

torch and torchattacks are imported only here; advkern runs on the ``auto`` backend (or
``--backend``). Writes ``bench/results/<stamp>-peer-attacks.{json,md}``.
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np

import advkern
from advkern import kernels
from advkern.nets.datasets import load_mnist

from . import flops, torch_pgd

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _timed(fn, repeats):
    fn()                                           # warm-up (JIT, caches)
    ts, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def _stats(x, x_adv, ok, fooled):
    d = np.sqrt(((x_adv.astype(np.float64) - x) ** 2).reshape(len(x), -1).sum(1))
    s = ok & fooled
    return float(s.sum() / max(ok.sum(), 1)), float(np.median(d[s])) if s.any() else float("nan")


def run(n=100, n_peer=20, repeats=2, backend="auto"):
    torch, why = torch_pgd.load()
    if torch is None:
        raise SystemExit(f"peer_attacks needs torch: {why}")
    import torchattacks

    backend = kernels.resolve(backend)
    x, y = load_mnist("test")
    rows = []
    for name in ("mlp", "cnn"):
        model = advkern.pretrained(name)
        net = torch_pgd.build(torch, model)
        ok = model.predict(x[:n]) == y[:n]
        # (label, advkern attack, its parameters, torchattacks' attack, gradient steps per
        # image for the GEMM bound (None: no fixed count))
        cases = [
            ("mifgsm", "mifgsm", {"eps": 0.3, "steps": 40, "decay": 1.0},
             lambda: torchattacks.MIFGSM(net, eps=0.3, alpha=0.3 / 40, steps=40, decay=1.0),
             40),
            ("deepfool", "deepfool", {"overshoot": 0.02, "max_iter": 50},
             lambda: torchattacks.DeepFool(net, steps=50, overshoot=0.02), None),
            ("cw", "cw", {},
             lambda: torchattacks.CW(net, c=1, kappa=0, steps=100, lr=0.01), None),
            ("cw 1x100", "cw", {"initial_const": 1.0, "search_steps": 1, "steps": 100,
                                "lr": 0.01, "kappa": 0.0},
             lambda: torchattacks.CW(net, c=1, kappa=0, steps=100, lr=0.01), 100),
        ]
        rate = flops.model_rate(model, n)
        for label, attack, kw, make, steps in cases:
            m = n_peer if attack == "deepfool" else n
            tx = torch.from_numpy(np.ascontiguousarray(x[:m]))
            ty = torch.from_numpy(y[:m].astype(np.int64))
            sec, r = _timed(lambda: advkern.attack(model, x[:n], y[:n], attack,
                                                   backend=backend, **kw), repeats)
            ours = _stats(x[:n], r.x_adv, ok, model.predict(r.x_adv) != y[:n])
            atk = make()
            psec, adv = _timed(lambda: atk(tx, ty).detach().numpy(), 1 if m < n else repeats)
            ok_p = ok[:m]
            theirs = _stats(x[:m], adv, ok_p, model.predict(adv) != y[:m])
            ours_p = _stats(x[:m], r.x_adv[:m], ok_p, model.predict(r.x_adv[:m]) != y[:m])
            row = {"model": name, "attack": label, "backend": backend, "params": kw,
                   "ms_per_image": 1e3 * sec / n, "torchattacks_ms_per_image": 1e3 * psec / m,
                   "speedup": (psec / m) / (sec / n),
                   "success": ours[0], "median_l2": ours[1],
                   "success_same_images": ours_p[0], "median_l2_same_images": ours_p[1],
                   "torchattacks_success": theirs[0], "torchattacks_median_l2": theirs[1],
                   "images": n, "torchattacks_images": m}
            if steps:
                gf = 2 * steps * flops.fwd(model)            # GEMM FLOPs per image
                bound = gf / (rate * 1e9)                     # s per image
                row.update({"gemm_gflop_per_image": gf / 1e9, "np_dot_gflops": rate,
                            "gemm_bound_ms_per_image": 1e3 * bound,
                            "advkern_gflops": gf * n / sec / 1e9,
                            "torchattacks_gflops": gf * m / psec / 1e9,
                            "max_speedup_over_torchattacks": (psec / m) / bound})
            rows.append(row)
            bound_txt = (f"   GEMM bound {row['gemm_bound_ms_per_image']:.2f} ms/img "
                         f"(max x{row['max_speedup_over_torchattacks']:.2g})" if steps else "")
            print(f"{name:4s} {label:9s} advkern {row['ms_per_image']:8.2f} ms/img "
                  f"(success {ours[0]:.0%}, median L2 {ours[1]:.3f})   torchattacks "
                  f"{row['torchattacks_ms_per_image']:9.2f} ms/img (success {theirs[0]:.0%}, "
                  f"median L2 {theirs[1]:.3f} on {m}; ours there {ours_p[0]:.0%}, "
                  f"{ours_p[1]:.3f})   x{row['speedup']:.2g}{bound_txt}", flush=True)
    return rows, {"torch": torch.__version__, "torchattacks": torchattacks.__version__,
                  "threads": torch_pgd.THREADS}


def markdown(rows, meta, stamp):
    lines = [f"# advkern vs torchattacks on the CPU ({stamp})", "",
             f"torch {meta['torch']} ({meta['threads']} threads), torchattacks "
             f"{meta['torchattacks']}; float32, bundled models, first test images. "
             "`python -m bench.peer_attacks`.", "",
             "| model | attack | advkern ms/img | torchattacks ms/img | x faster | "
             "advkern success / median L2 | torchattacks success / median L2 (same images) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['attack']} | {r['ms_per_image']:.2f} | "
            f"{r['torchattacks_ms_per_image']:.2f} | {r['speedup']:.2g} | "
            f"{r['success']:.0%} / {r['median_l2']:.3f} ({r['images']} img) | "
            f"{r['torchattacks_success']:.0%} / {r['torchattacks_median_l2']:.3f} "
            f"(ours {r['success_same_images']:.0%} / {r['median_l2_same_images']:.3f}, "
            f"{r['torchattacks_images']} img) |")
    bound = [r for r in rows if "gemm_bound_ms_per_image" in r]
    if bound:
        lines += ["", "GEMM bound (see the module docstring): the attack's matrix products at "
                  "the float32 rate np.dot reaches on the model's own GEMM shapes.", "",
                  "| model | attack | GFLOP/img | np.dot GFLOP/s | bound ms/img | advkern "
                  "GFLOP/s | torchattacks GFLOP/s | max x over torchattacks |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in bound:
            lines.append(
                f"| {r['model']} | {r['attack']} | {r['gemm_gflop_per_image']:.3f} | "
                f"{r['np_dot_gflops']:.1f} | {r['gemm_bound_ms_per_image']:.2f} | "
                f"{r['advkern_gflops']:.1f} | {r['torchattacks_gflops']:.1f} | "
                f"{r['max_speedup_over_torchattacks']:.2g} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.peer_attacks", description=__doc__)
    ap.add_argument("--n", type=int, default=100, help="advkern's images (100)")
    ap.add_argument("--n-peer", type=int, default=20, help="torchattacks' images (20)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    rows, meta = run(args.n, args.n_peer, args.repeats, args.backend)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"{stamp}-peer-attacks")
    with open(base + ".json", "w") as f:
        json.dump({"rows": rows, "meta": meta}, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(rows, meta, stamp))
    print(f"wrote {base}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
