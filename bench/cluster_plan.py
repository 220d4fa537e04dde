"""``python -m bench.cluster_plan``: what a GPU cluster would do on ImageNet-size PGD, as
arithmetic from measured rates (README, "Scale out": "On a real cluster").

PGD with S steps costs ``(2 S + 1) F`` GEMM FLOPs per image (``flops.py``: a forward and an
input-gradient backward per step, one forward to score the end), F the network's forward
FLOPs (ResNet-50 at 224 x 224: F = 8.2 GFLOP, i.e. 4.1 G multiply-adds). One GPU sustaining R
FLOP/s attacks ``R / ((2 S + 1) F)`` images/s; G GPUs with a distributed overhead o do
``G R / ((2 S + 1) F) / (1 + o)``.

R comes from a GPU run of the benchmark (``--gpu-results``: a ``python -m bench --gpu`` JSON
report), as two figures: the rate advkern's own PGD reached on the bundled cnn (the best
validated GPU backend; a lower figure for a large network, whose GEMMs are larger) and the
square cuBLAS sgemm rate of the same run (an upper one). Without a GPU report (advkern has not
run on a GPU yet) R is ``--rate`` TFLOP/s, an assumption, and the output says so. The
overhead o is the 1-worker cluster's paired overhead in the newest ``*-distributed.json`` in
``bench/results`` (``--overhead`` overrides).
"""

import argparse
import glob
import json
import os
import sys

from .distributed import RESULTS

RESNET50_GFLOP = 8.2
IMAGENET = {"ImageNet validation (50,000)": 50_000, "ImageNet train (1.28 M)": 1_281_167}


def gpu_rates(path):
    """[(label, TFLOP/s)] from a ``bench --gpu`` report: advkern's best PGD on the cnn, and
    the square sgemm rate."""
    with open(path) as f:
        rep = json.load(f)
    out = []
    pgd = [r for r in rep.get("results", []) if r.get("item") == "pgd" and r.get("model") ==
           "cnn" and r.get("status", "ok") != "FAILED" and r.get("gflops")
           and r.get("backend") in rep.get("backends", {})
           and rep["backends"][r["backend"]].get("status") == "ok"]
    if pgd:
        best = max(pgd, key=lambda r: r["gflops"])
        out.append((f"advkern {best['backend']} PGD on the cnn, measured",
                    best["gflops"] / 1e3))
    square = rep.get("gemm", {}).get("square", {}).get("gflops")
    if square:
        out.append(("cuBLAS square sgemm, measured", square / 1e3))
    if not out:
        raise SystemExit(f"{path}: no PGD row on the cnn and no sgemm rate")
    return out


def measured_overhead(results=RESULTS):
    """(overhead, file) of the 1-worker LocalCluster in the newest distributed report."""
    for path in sorted(glob.glob(os.path.join(results, "*-distributed.json")), reverse=True):
        with open(path) as f:
            rows = json.load(f).get("rows", [])
        one = [r for r in rows if r.get("workers") == 1]
        if one:
            return one[0]["overhead"], os.path.basename(path)
    return None, None


def plan(rates, overhead, nodes=10, gpus=8, steps=100, gflop=RESNET50_GFLOP):
    """Rows: per rate, one GPU's and the cluster's images/s and the time for each set."""
    per_image = (2 * steps + 1) * gflop * 1e9
    rows = []
    for label, tflops in rates:
        one = tflops * 1e12 / per_image
        cluster = nodes * gpus * one / (1 + overhead)
        rows.append({"rate": label, "tflops": tflops, "gpu_images_s": one,
                     "cluster_images_s": cluster,
                     "seconds": {k: n / cluster for k, n in IMAGENET.items()}})
    return rows


def _dur(s):
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def markdown(rows, args, overhead, src):
    head = (f"PGD-{args.steps} on a ResNet-50-size network ({args.gflop} GFLOP forward, "
            f"{(2 * args.steps + 1) * args.gflop / 1e3:.2f} TFLOP per image), {args.nodes} "
            f"nodes x {args.gpus} GPUs, distributed overhead {100 * overhead:+.1f}% ({src}).")
    lines = [head, "", "| R: sustained rate per GPU | TFLOP/s | images/s per GPU | images/s, "
             "cluster | " + " | ".join(IMAGENET) + " |",
             "|---|---|---|---|" + "---|" * len(IMAGENET)]
    for r in rows:
        lines.append(f"| {r['rate']} | {r['tflops']:.1f} | {r['gpu_images_s']:.1f} | "
                     f"{r['cluster_images_s']:,.0f} | "
                     + " | ".join(_dur(s) for s in r["seconds"].values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.cluster_plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-results", help="a python -m bench --gpu JSON report")
    ap.add_argument("--rate", type=float, default=30.0,
                    help="assumed TFLOP/s per GPU when no GPU report is given (30: about 45%% "
                         "of an H200's 67 TFLOP/s FP32 peak, TF32 off)")
    ap.add_argument("--overhead", type=float, help="distributed overhead (0.1 = 10%%); "
                    "default: the newest bench.distributed report's 1-worker figure")
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--gflop", type=float, default=RESNET50_GFLOP,
                    help="forward GFLOP per image (ResNet-50 at 224 x 224: 8.2)")
    args = ap.parse_args(argv)
    if args.gpu_results:
        rates = gpu_rates(args.gpu_results)
    else:
        rates = [("assumed (--rate; no GPU report: not a measurement)", args.rate)]
    if args.overhead is not None:
        overhead, src = args.overhead, "--overhead"
    else:
        overhead, src = measured_overhead()
        if overhead is None:
            overhead, src = 0.10, "the 10% target: no bench.distributed report found"
        else:
            src = f"bench/results/{src}, 1 worker"
        overhead = max(overhead, 0.0)
    print(markdown(plan(rates, overhead, args.nodes, args.gpus, args.steps, args.gflop), args,
                   overhead, src))
    return 0


if __name__ == "__main__":
    sys.exit(main())
