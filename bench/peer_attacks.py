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

advkern's attacks run in a spawned process that never imports torch (with torch imported
first, numba's OpenMP threading layer runs advkern's kernels much slower: see ``_Ours``);
one advkern run and one torchattacks run in turn, each after 1 s idle (``SETTLE_S``). torch
and torchattacks are imported only here; advkern runs on the ``auto`` backend (or
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
from .run import settle

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Idle before each timed run: the other side's idle threads (OpenBLAS after advkern's metrics,
# torch's OpenMP pool) spin for a while after a run. Measured here: torchattacks' MI-FGSM on
# the mlp 0.42 ms/image alone, 0.87-1.22 right after an advkern run, 0.42-0.58 after 1 s.
SETTLE_S = 1.0


def _stats(x, x_adv, ok, fooled):
    d = np.sqrt(((x_adv.astype(np.float64) - x) ** 2).reshape(len(x), -1).sum(1))
    s = ok & fooled
    return float(s.sum() / max(ok.sum(), 1)), float(np.median(d[s])) if s.any() else float("nan")


# (label, advkern attack, its parameters, torchattacks' attack (torchattacks, net) -> attack,
# gradient steps per image for the GEMM bound (None: no fixed count))
CASES = [
    ("mifgsm", "mifgsm", {"eps": 0.3, "steps": 40, "decay": 1.0},
     lambda ta, net: ta.MIFGSM(net, eps=0.3, alpha=0.3 / 40, steps=40, decay=1.0), 40),
    ("deepfool", "deepfool", {"overshoot": 0.02, "max_iter": 50},
     lambda ta, net: ta.DeepFool(net, steps=50, overshoot=0.02), None),
    ("cw", "cw", {}, lambda ta, net: ta.CW(net, c=1, kappa=0, steps=100, lr=0.01), None),
    ("cw 1x100", "cw", {"initial_const": 1.0, "search_steps": 1, "steps": 100, "lr": 0.01,
                        "kappa": 0.0},
     lambda ta, net: ta.CW(net, c=1, kappa=0, steps=100, lr=0.01), 100),
]


def _ours_loop(conn, n, backend):
    """The child process: advkern's attacks on request, in a process without torch.
    Request (model name, case index, warm-up first); reply (seconds, x_adv, whether torch is
    in this process) or the exception."""
    x, y = load_mnist("test")
    models = {}
    while True:
        msg = conn.recv()
        if msg is None:
            return
        name, i, warm = msg
        try:
            if name not in models:
                models[name] = advkern.pretrained(name)
            _, attack, kw, _, _ = CASES[i]

            def call():
                return advkern.attack(models[name], x[:n], y[:n], attack, backend=backend,
                                      **kw)
            if warm:
                call()
            t0 = time.perf_counter()
            r = call()
            conn.send((time.perf_counter() - t0, r.x_adv, "torch" in sys.modules))
        except Exception as e:                     # reported in the parent
            conn.send(e)


class _Ours:
    """advkern's side of the comparison in a spawned process that never imports torch: with
    torch imported first, numba's OpenMP threading layer (advkern's numba_cpu kernels) ran
    65% slower here (MI-FGSM on the mlp, 100 images: 1.28-1.34 against 0.77-0.80 ms/image in
    one process; README, "Next to PyTorch"). The two sides still alternate run by run, so a
    change of the machine's load hits both."""

    def __init__(self, n, backend):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_ours_loop, args=(child, n, backend), daemon=True)
        self.proc.start()

    def __call__(self, name, i, warm=False):
        self.conn.send((name, i, warm))
        out = self.conn.recv()
        if isinstance(out, BaseException):
            raise out
        return out

    def close(self):
        self.conn.send(None)
        self.proc.join(30)


BLOCKS = 2


def _split(blocks):
    """(median of the blocks' first runs, median of their other runs; the first runs' when a
    block has one run)."""
    first = [b[0] for b in blocks]
    rest = [t for b in blocks for t in b[1:]]
    return statistics.median(first), statistics.median(rest or first)


def run(n=100, n_peer=20, repeats=3, backend="auto"):
    """Per model and case: a warm-up of each side, then BLOCKS rounds of a block of
    ``repeats`` advkern runs (in the torch-free child) and a block of ``repeats`` torchattacks
    runs (its per-image DeepFool: one), each block after 1 s idle. ms/image: the steady runs
    (a block's later runs); "after idle": a block's first run."""
    backend = kernels.resolve(backend)
    torch, why = torch_pgd.load()
    if torch is None:
        raise SystemExit(f"peer_attacks needs torch: {why}")
    import torchattacks

    x, y = load_mnist("test")
    rows = []
    ours_proc = _Ours(n, backend)
    try:
        for name in ("mlp", "cnn"):
            model = advkern.pretrained(name)
            net = torch_pgd.build(torch, model)
            ok = model.predict(x[:n]) == y[:n]
            rate = flops.model_rate(model, n)
            for i, (label, attack, kw, make, steps) in enumerate(CASES):
                m = n_peer if attack == "deepfool" else n
                tx = torch.from_numpy(np.ascontiguousarray(x[:m]))
                ty = torch.from_numpy(y[:m].astype(np.int64))
                atk = make(torchattacks, net)

                def theirs():
                    t0 = time.perf_counter()
                    out = atk(tx, ty).detach().numpy()
                    return time.perf_counter() - t0, out
                ours_proc(name, i, warm=True)
                theirs()                                  # warm-up
                # blocks: each side runs `repeats` times back to back after 1 s idle, the
                # sides alternating block by block; a block's first run is "after idle",
                # the others "steady" (torchattacks' per-image DeepFool: one run a block)
                t_ours, t_theirs = [], []
                for b in range(BLOCKS):
                    settle(SETTLE_S)
                    t_ours.append([])
                    for r in range(repeats):
                        t, x_adv, torch_there = ours_proc(name, i)
                        assert not torch_there, "torch was imported in advkern's process"
                        t_ours[-1].append(t)
                    t_theirs.append([])
                    for r in range(repeats if m == n else 1):
                        if r == 0:
                            settle(SETTLE_S)
                        t, adv = theirs()
                        t_theirs[-1].append(t)
                (sec_idle, sec), (psec_idle, psec) = _split(t_ours), _split(t_theirs)
                ours = _stats(x[:n], x_adv, ok, model.predict(x_adv) != y[:n])
                ok_p = ok[:m]
                theirs_s = _stats(x[:m], adv, ok_p, model.predict(adv) != y[:m])
                ours_p = _stats(x[:m], x_adv[:m], ok_p, model.predict(x_adv[:m]) != y[:m])
                row = {"model": name, "attack": label, "backend": backend, "params": kw,
                       "ms_per_image": 1e3 * sec / n,
                       "torchattacks_ms_per_image": 1e3 * psec / m,
                       "ms_per_image_after_idle": 1e3 * sec_idle / n,
                       "torchattacks_ms_per_image_after_idle": 1e3 * psec_idle / m,
                       "speedup_after_idle": (psec_idle / m) / (sec_idle / n),
                       "times_s": t_ours, "torchattacks_times_s": t_theirs,
                       "speedup": (psec / m) / (sec / n),
                       "success": ours[0], "median_l2": ours[1],
                       "success_same_images": ours_p[0], "median_l2_same_images": ours_p[1],
                       "torchattacks_success": theirs_s[0],
                       "torchattacks_median_l2": theirs_s[1],
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
                             f"(max x{row['max_speedup_over_torchattacks']:.2g})"
                             if steps else "")
                print(f"{name:4s} {label:9s} advkern {row['ms_per_image']:8.2f} ms/img "
                      f"(success {ours[0]:.0%}, median L2 {ours[1]:.3f})   torchattacks "
                      f"{row['torchattacks_ms_per_image']:9.2f} ms/img "
                      f"(success {theirs_s[0]:.0%}, "
                      f"median L2 {theirs_s[1]:.3f} on {m}; ours there {ours_p[0]:.0%}, "
                      f"{ours_p[1]:.3f})   x{row['speedup']:.2g} (after idle "
                      f"x{row['speedup_after_idle']:.2g}){bound_txt}", flush=True)
    finally:
        ours_proc.close()
    return rows, {"torch": torch.__version__, "torchattacks": torchattacks.__version__,
                  "threads": torch_pgd.THREADS}


def markdown(rows, meta, stamp):
    lines = [f"# advkern vs torchattacks on the CPU ({stamp})", "",
             f"torch {meta['torch']} ({meta['threads']} threads), torchattacks "
             f"{meta['torchattacks']}; float32, bundled models, first test images. "
             "`python -m bench.peer_attacks`.", "",
             "Steady: the later runs of blocks run back to back; after idle: a block's first "
             "run, after 1 s idle (advkern in a process without torch; see the module "
             "docstring).", "",
             "| model | attack | advkern ms/img | torchattacks ms/img | x faster | after idle: "
             "advkern / torchattacks ms/img, x faster | "
             "advkern success / median L2 | torchattacks success / median L2 (same images) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['attack']} | {r['ms_per_image']:.2f} | "
            f"{r['torchattacks_ms_per_image']:.2f} | {r['speedup']:.2g} | "
            f"{r['ms_per_image_after_idle']:.2f} / "
            f"{r['torchattacks_ms_per_image_after_idle']:.2f}, "
            f"{r['speedup_after_idle']:.2g} | "
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
    ap.add_argument("--repeats", type=int, default=3, help="runs per block (3); 2 blocks a "
                    "side")
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
