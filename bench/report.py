"""Machine information and the three outputs: the printed table, JSON and Markdown."""

import datetime
import json
import os
import platform
import re
import socket
import sys
from pathlib import Path

import numpy as np


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def blas_info():
    """numpy's BLAS (name, version, configuration) from np.show_config, if it says."""
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        simd = cfg.get("SIMD Extensions", {})
        return {"name": blas.get("name"), "version": blas.get("version"),
                "config": blas.get("openblas configuration"), "simd_found": simd.get("found")}
    except Exception as e:  # older numpy: no mode="dicts"
        return {"error": str(e)}


def machine_info():
    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "blas": blas_info(),
        "threads_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                   "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
                        if k in os.environ},
    }
    try:
        info["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                      / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def versions(torch=None):
    import advkern
    out = {"advkern": advkern.__version__, "numpy": np.__version__}
    if "numba" in sys.modules:  # only when a backend imported it; never imported for this
        numba = sys.modules["numba"]
        out["numba"] = numba.__version__
        out["numba_threads"] = numba.config.NUMBA_NUM_THREADS
        try:
            out["numba_threading_layer"] = numba.threading_layer()
        except Exception:  # no parallel kernel has run yet
            pass
    if torch is not None:
        out["torch"] = torch.__version__
        out["torch_threads"] = torch.get_num_threads()
    return out


def load_avg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# -- formatting ------------------------------------------------------------------------------


def _fmt(v, digits=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        mag = abs(v)
        if mag >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{max(0, digits - 1 - int(np.floor(np.log10(mag))))}f}" if mag >= 0.001 \
            else f"{v:.1e}"
    return str(v)


COLUMNS = [("item", "item"), ("model", "model"), ("backend", "backend"), ("images", "images"),
           ("batch", "batch"), ("ms/img", "ms_per_image"), ("img/s", "images_per_s"),
           ("GFLOP/s", "gflops"), ("x numpy", "x_numpy"), ("x bound", "x_bound"),
           ("x bound sq", "x_bound_square"), ("n", "repeats"), ("first s", "first_s"),
           ("notes", "notes")]


GPU_COLUMNS = [("item", "item"), ("model", "model"), ("backend", "backend"),
               ("images", "images"), ("batch", "batch"), ("ms/img", "ms_per_image"),
               ("img/s", "images_per_s"), ("Mcand/s", "mcand_per_s"), ("GFLOP/s", "gflops"),
               ("x torch", "x_torch"), ("x torchattacks", "x_ta"), ("x bound", "x_bound"),
               ("x bound sq", "x_bound_square"), ("n", "repeats"), ("first s", "first_s"),
               ("notes", "notes")]


def is_gpu(rep):
    return str(rep.get("mode", "")).startswith("gpu")


def columns(rep):
    return GPU_COLUMNS if is_gpu(rep) else COLUMNS


def result_rows(results, cols=COLUMNS):
    """The table's cells; a row that did not run shows its status (FAILED, skipped) in
    place of ms/img."""
    rows = []
    for r in results:
        status = r.get("status", "ok")
        if r["images"] is None:
            images = f"-/{r['images_total']}"
        elif r["images"] == r["images_total"]:
            images = r["images"]
        else:
            images = f"{r['images']}/{r['images_total']}"
        row = []
        for _, key in cols:
            if key == "images":
                v = images
            elif key == "ms_per_image" and status != "ok":
                v = status
            else:
                v = r.get(key)
            row.append(v if isinstance(v, str) else _fmt(v))
        rows.append(row)
    return rows


def text_table(headers, rows):
    """Left-aligned text columns (the first three and the last), right-aligned numbers."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    left = {0, 1, 2, len(headers) - 1}

    def line(cells):
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def backend_rows(backends):
    rows = []
    for name, b in backends.items():
        checks = b.get("checks", [])
        failed = [c for c in checks if not c["ok"]]
        parts = [b["note"]] if b.get("note") else []
        if failed:
            parts.append("; ".join(f"{c['check']}: {c['detail']}" for c in failed[:3])
                         + (f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""))
        elif checks:
            parts.append(f"{len(checks)} checks passed")
        rows.append([name, b["status"], _fmt(b.get("validate_s")), "; ".join(parts)])
    return rows


def _gemm_title(rep):
    return rep.get("gemm_lib") or "np.dot"


def device_line(rep):
    d = rep.get("device", {})
    parts = [str(d.get("name", "unknown GPU"))]
    if d.get("memory_gib") or d.get("memory"):
        parts.append(f"{d.get('memory_gib') or d.get('memory')}"
                     + (" GiB" if d.get("memory_gib") else ""))
    if d.get("sms"):
        parts.append(f"{d['sms']} SMs")
    if d.get("compute_capability"):
        parts.append(f"compute {d['compute_capability']}")
    parts.append(f"driver {d.get('driver', '?')}")
    parts.append(f"CUDA driver {d.get('cuda_driver', '?')} / runtime "
                 f"{d.get('cuda_runtime', '?')}")
    if d.get("cublas"):
        parts.append(f"cuBLAS {d['cublas']}")
    if d.get("cudnn"):
        parts.append(f"cuDNN {d['cudnn']}")
    return ", ".join(parts)


def failures(rep):
    """(row, traceback) of the rows that raised."""
    return [(r, r["error"]) for r in rep["results"] if r.get("error")]


def print_report(rep, out=sys.stdout):
    cols = columns(rep)
    if is_gpu(rep):
        print(f"\ndevice: {device_line(rep)}", file=out)
    print(f"\nbackends ({rep['mode']} mode, validated before timing):", file=out)
    print(text_table(["backend", "status", "validate s", "note"], backend_rows(rep["backends"])),
          file=out)
    g = rep["gemm"]
    if g:
        print(f"\nsgemm ({_gemm_title(rep)}, float32): " + ", ".join(
            f"{k} {v['gflops']:.1f} GFLOP/s" for k, v in g.items()), file=out)
    if rep["results"]:
        print("\n" + text_table([h for h, _ in cols], result_rows(rep["results"], cols)),
              file=out)
    for note in rep["notes"]:
        print(f"note: {note}", file=out)


LEGEND = ("ms/img: median wall time / images. x numpy: the numpy backend's ms/img over this "
          "row's (> 1 is faster). x bound: wall time over the GEMM bound (the row's GEMM FLOPs "
          "at the model's shape-matched sgemm rate; 1 = BLAS speed); x bound sq: the same at "
          "the square-sgemm rate. n: timed repeats; first s: the warm-up call (includes JIT "
          "compilation not already done by validation). images a/b: a budget-limited subset "
          "of the b images.")

GPU_LEGEND = ("ms/img: median wall time / images (host arrays in, host arrays out: the "
              "transfers are timed, for every row). Mcand/s: DE candidate evaluations per "
              "second (early stop off). x torch: the PyTorch loop's ms/img (TF32 off, same "
              "model and images) over this row's; x torchattacks: torchattacks' ms/img over "
              "this row's, per image (DE: this row's candidates/s over torchattacks'); > 1 is "
              "faster than the baseline. x bound: wall time over the GEMM bound (the row's "
              "GEMM FLOPs at the model's shape-matched cuBLAS sgemm rate, TF32 off; 1 = "
              "cuBLAS speed); x bound sq: the same at the square-sgemm rate. n: timed "
              "repeats; first s: the first probe call (compilation not done by validation). "
              "images a/b: the first a of b images (budget). FAILED / skipped: the row "
              "raised (traceback below) / the run's time was spent.")


def markdown(rep):
    m = rep["machine"]
    st = rep["settings"]
    gpu = is_gpu(rep)
    cols = columns(rep)
    title = "advkern GPU benchmark" if gpu else "advkern benchmark"
    lines = [f"# {title}, {rep['date']} ({rep['mode']} mode)", ""]
    if rep.get("status") == "running":
        lines += ["**Partial: the run had not finished when this was written.**", ""]
    lines.append(f"- command: `{rep['command']}`")
    if gpu:
        lines.append(f"- device: {device_line(rep)}")
    lines += [(f"- machine: {m['host']}, {m['cpu_model']}, {m['cpu_count']} CPUs "
               f"({m.get('cpus_usable')} usable), {m.get('mem_total_gib', '?')} GiB, "
               f"{m['platform']}"),
              f"- load average at start / end: {rep['load_avg_start']} / "
              f"{rep.get('load_avg_end')}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items())]
    if gpu:
        lines.append(f"- float32; after a synchronisation, a probe / warm-up, then the median "
                     f"of up to {st['repeats_attack']} repeats; time budget {st['budget_s']} s "
                     f"x the item's weight, {st['total_s']} s for the whole run "
                     f"({rep.get('elapsed_s', 0):.0f} s used; see bench/README.md)")
    else:
        lines += [(f"- BLAS: {m['blas'].get('name')} {m['blas'].get('version')} "
                   f"({m['blas'].get('config')})"),
                  (f"- float32; median of up to {st['repeats_attack']} (attacks) / "
                   f"{st['repeats_primitive']} (primitives) repeats after a warm-up, time "
                   f"budget {st['budget_s']} s per item and backend (see bench/README.md)")]
    lines += ["", "## Backends", "",
              markdown_table(["backend", "status", "validate s", "note"],
                             backend_rows(rep["backends"])), ""]
    if rep["gemm"]:
        lines += [f"## sgemm rates ({_gemm_title(rep)}, float32, this run)", "",
                  markdown_table(["name", "shapes", "GFLOP/s"],
                                 [[k, v["shapes"], f"{v['gflops']:.1f}"]
                                  for k, v in rep["gemm"].items()]), ""]
    if rep["results"]:
        lines += ["## Results", "", markdown_table([h for h, _ in cols],
                                                   result_rows(rep["results"], cols)), "",
                  GPU_LEGEND if gpu else LEGEND, ""]
    fails = failures(rep)
    if fails:
        lines += ["## Failures", ""]
        for r, tb in fails:
            lines += [f"### {r['item']} {r['model']} {r['backend']}", "", "```", tb.rstrip(),
                      "```", ""]
    if rep["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in rep["notes"]] + [""]
    return "\n".join(lines)


def _write(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: a reader never sees a half-written file


def write(rep, out_dir):
    """Write <date>-<host><suffix>.json/.md and latest<suffix>.md; returns the paths.

    suffix: '' (full), '-quick', '-gpu', '-gpu-quick' (the mode)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", rep["machine"]["host"]) or "host"
    suffix = "" if rep["mode"] == "full" else f"-{rep['mode']}"
    stem = f"{rep['stamp']}-{host}{suffix}"
    md = markdown(rep)
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"latest{suffix}.md"]
    _write(paths[0], json.dumps(rep, indent=1, default=_json_default) + "\n")
    _write(paths[1], md)
    _write(paths[2], md)
    return paths


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (datetime.date, Path)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
