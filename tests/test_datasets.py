"""Tests for advkern.nets.datasets: the bundled MNIST subset and the IDX reader/writer."""

from __future__ import annotations

import gzip
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from advkern.nets import datasets
from advkern.nets.datasets import load_idx, load_mnist, load_mnist_idx, save_idx

IDX_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


def _rows(x: np.ndarray) -> list[bytes]:
    """(N, ...) -> list of N byte strings, one per image, for set comparisons."""
    return [row.tobytes() for row in np.ascontiguousarray(x)]


# ---------------------------------------------------------------- bundled data


@pytest.mark.parametrize("split, n", [("train", 4000), ("test", 1000), ("all", 5000)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shapes_dtypes_ranges(split, n, dtype):
    x, y = load_mnist(split, dtype=dtype)
    assert x.shape == (n, 1, 28, 28)
    assert x.dtype == dtype
    assert y.shape == (n,)
    assert y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y).tolist()) == set(range(10))
    # Every pixel is an exact k/255 (what the uint8 source allows).
    k = np.round(x * 255)
    assert np.all((k >= 0) & (k <= 255))
    np.testing.assert_array_equal(x, (k / dtype(255)).astype(dtype))


def test_default_split_is_test_float32():
    x, y = load_mnist()
    assert x.shape == (1000, 1, 28, 28) and x.dtype == np.float32
    xt, yt = load_mnist("test", np.float32)
    np.testing.assert_array_equal(x, xt)
    np.testing.assert_array_equal(y, yt)


def test_dtype_accepts_strings():
    x, _ = load_mnist("test", dtype="float64")
    assert x.dtype == np.float64


@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_label_is_index_mod_10(split):
    _, y = load_mnist(split)
    if split == "all":
        # train then test, each interleaved on its own.
        np.testing.assert_array_equal(y[:4000], np.arange(4000) % 10)
        np.testing.assert_array_equal(y[4000:], np.arange(1000) % 10)
    else:
        np.testing.assert_array_equal(y, np.arange(len(y)) % 10)


def test_test_prefixes_are_class_balanced():
    _, y = load_mnist("test")
    for m in (1, 3, 10, 100):
        np.testing.assert_array_equal(np.bincount(y[: 10 * m], minlength=10), np.full(10, m))


def test_float32_and_float64_agree():
    x32, y32 = load_mnist("all", np.float32)
    x64, y64 = load_mnist("all", np.float64)
    np.testing.assert_array_equal(y32, y64)
    np.testing.assert_array_equal(x32, x64.astype(np.float32))


def test_all_is_train_then_test():
    xa, ya = load_mnist("all")
    xtr, ytr = load_mnist("train")
    xte, yte = load_mnist("test")
    np.testing.assert_array_equal(xa, np.concatenate([xtr, xte]))
    np.testing.assert_array_equal(ya, np.concatenate([ytr, yte]))


def test_train_test_disjoint_and_cover_file():
    xtr, _ = load_mnist("train")
    xte, _ = load_mnist("test")
    train_rows, test_rows = set(_rows(xtr)), set(_rows(xte))
    assert len(train_rows) == 4000 and len(test_rows) == 1000  # no duplicates inside a split
    assert train_rows.isdisjoint(test_rows)

    images, labels, _, _ = datasets._load_bundled()
    file_rows = set(_rows((images.astype(np.float32) / np.float32(255))[:, None]))
    assert train_rows | test_rows == file_rows
    assert len(file_rows) == 5000


def test_split_rule_matches_file_order():
    """Train image k of class c is class c's row k in file order; test image k is its row 400 + k."""
    images, labels, _, _ = datasets._load_bundled()
    xtr, _ = load_mnist("train", np.float64)
    xte, _ = load_mnist("test", np.float64)
    for c in range(10):
        rows = images[labels == c].astype(np.float64)[:, None] / 255.0
        assert len(rows) == 500
        np.testing.assert_array_equal(xtr[c::10], rows[:400])
        np.testing.assert_array_equal(xte[c::10], rows[400:])


def test_returned_arrays_are_fresh():
    x1, y1 = load_mnist("test")
    x1_copy, y1_copy = x1.copy(), y1.copy()
    x1[...] = -7.0
    y1[...] = 99
    x2, y2 = load_mnist("test")
    np.testing.assert_array_equal(x2, x1_copy)
    np.testing.assert_array_equal(y2, y1_copy)
    assert not np.shares_memory(x1, x2) and not np.shares_memory(y1, y2)


def test_cache_is_read_only():
    for arr in datasets._load_bundled():
        assert not arr.flags.writeable


def test_unknown_split():
    with pytest.raises(ValueError, match=r"'validation'.*'train'.*'test'.*'all'"):
        load_mnist("validation")


@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.uint8, "complex128", None, "not-a-dtype"])
def test_bad_dtype(dtype):
    with pytest.raises(ValueError, match="float32 or float64"):
        load_mnist("test", dtype=dtype)


def test_bad_dtype_message_names_dtype():
    with pytest.raises(ValueError, match="float16"):
        load_mnist("test", dtype=np.float16)


# ---------------------------------------------------------------- IDX format


@st.composite
def idx_arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(IDX_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    return draw(hnp.arrays(dtype, shape))


@settings(max_examples=60, deadline=None)
@given(arr=idx_arrays(), gz=st.booleans())
def test_idx_round_trip(arr, gz):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.idx" + (".gz" if gz else ""))
        save_idx(path, arr)
        with open(path, "rb") as fh:
            assert (fh.read(2) == b"\x1f\x8b") == gz
        out = load_idx(path)
    assert out.shape == arr.shape
    assert out.dtype == arr.dtype
    assert out.dtype.isnative
    assert out.flags.writeable
    # Compare bits so NaNs and signed zeros count as equal only when identical.
    assert out.tobytes() == arr.tobytes()


def test_idx_header_bytes(tmp_path):
    """Checked against the byte layout by hand, not only via our own reader."""
    arr = np.arange(6, dtype=np.int16).reshape(2, 3) - 2
    p = tmp_path / "x.idx"
    save_idx(p, arr)
    raw = p.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0B, 2])
    assert raw[4:12] == (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    assert raw[12:] == b"".join(int(v).to_bytes(2, "big", signed=True) for v in arr.ravel())


def test_idx_big_endian_input_and_native_output(tmp_path):
    arr = np.array([1.5, -2.25, 3.0], dtype=">f8")
    save_idx(tmp_path / "b.idx", arr)
    out = load_idx(tmp_path / "b.idx")
    assert out.dtype == np.float64 and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_gzip_detected_by_content_not_name(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    save_idx(tmp_path / "a.gz", arr)
    # Compressed file without .gz, plain file with .gz.
    os.rename(tmp_path / "a.gz", tmp_path / "compressed-ubyte")
    np.testing.assert_array_equal(load_idx(tmp_path / "compressed-ubyte"), arr)
    save_idx(tmp_path / "plain", arr)
    os.rename(tmp_path / "plain", tmp_path / "plain.gz")
    np.testing.assert_array_equal(load_idx(tmp_path / "plain.gz"), arr)


def test_gzip_output_is_reproducible(tmp_path):
    arr = np.arange(100, dtype=np.int32)
    save_idx(tmp_path / "a.gz", arr)
    save_idx(tmp_path / "b.gz", arr)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


def test_save_idx_rejects_unsupported_dtypes(tmp_path):
    for arr in (np.zeros(3, np.int64), np.zeros(3, bool), np.zeros(3, np.float16), [1, 2, 3]):
        with pytest.raises(ValueError, match="cannot be stored in IDX"):
            save_idx(tmp_path / "x.idx", arr)


def _write(path, data: bytes, gz: bool = False):
    with open(path, "wb") as fh:
        fh.write(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_idx_bad_magic(tmp_path, gz):
    p = _write(tmp_path / "bad", bytes([0, 1, 0x08, 1]) + (2).to_bytes(4, "big") + b"\x00\x00", gz)
    with pytest.raises(ValueError, match=r"bad\b.*magic") as exc:
        load_idx(p)
    assert str(p) in str(exc.value)


@pytest.mark.parametrize("code", [0x00, 0x07, 0x0A, 0x0F, 0xFF])
def test_idx_unknown_type_code(tmp_path, code):
    p = _write(tmp_path / "t", bytes([0, 0, code, 1]) + (1).to_bytes(4, "big") + b"\x00" * 8)
    with pytest.raises(ValueError, match=f"unknown IDX type code 0x{code:02X}") as exc:
        load_idx(p)
    assert str(p) in str(exc.value)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_data(tmp_path, gz):
    good = tmp_path / "good.idx"
    save_idx(good, np.arange(20, dtype=np.int32).reshape(4, 5))
    raw = good.read_bytes()
    p = _write(tmp_path / "trunc", raw[:-1], gz)
    with pytest.raises(ValueError, match="truncated IDX data") as exc:
        load_idx(p)
    assert str(p) in str(exc.value)


@pytest.mark.parametrize("raw", [b"", b"\x00\x00", bytes([0, 0, 0x08, 3]) + b"\x00\x00\x00\x02"])
def test_idx_truncated_header(tmp_path, raw):
    p = _write(tmp_path / "h", raw)
    with pytest.raises(ValueError, match="truncated IDX header") as exc:
        load_idx(p)
    assert str(p) in str(exc.value)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_trailing_bytes(tmp_path, gz):
    good = tmp_path / "good.idx"
    save_idx(good, np.arange(6, dtype=np.uint8))
    p = _write(tmp_path / "trail", good.read_bytes() + b"junk", gz)
    with pytest.raises(ValueError, match="4 trailing bytes") as exc:
        load_idx(p)
    assert str(p) in str(exc.value)


def test_idx_corrupt_gzip(tmp_path):
    data = gzip.compress(bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big") + b"abc")
    p = _write(tmp_path / "cut.gz", data[:-6])
    with pytest.raises(ValueError, match="corrupt gzip") as exc:
        load_idx(p)
    assert str(p) in str(exc.value)


def test_idx_missing_file(tmp_path):
    p = tmp_path / "nope-idx3-ubyte"
    with pytest.raises(FileNotFoundError, match="nope-idx3-ubyte"):
        load_idx(p)


def test_idx_huge_declared_size_is_truncation_not_overflow(tmp_path):
    # 4 dims of 2**32-1 overflow int64 if multiplied in NumPy.
    p = _write(tmp_path / "huge", bytes([0, 0, 0x0E, 4]) + b"\xff\xff\xff\xff" * 4)
    with pytest.raises(ValueError, match="truncated IDX data"):
        load_idx(p)


# ---------------------------------------------------------------- IDX MNIST pair


def _synthetic_pair(tmp_path, n=7, h=28, w=28, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # make both ends of the range appear
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    suffix = ".gz" if gz else ""
    ip, lp = tmp_path / f"t10k-images-idx3-ubyte{suffix}", tmp_path / f"t10k-labels-idx1-ubyte{suffix}"
    save_idx(ip, images)
    save_idx(lp, labels)
    return ip, lp, images, labels


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_load_mnist_idx(tmp_path, gz, dtype):
    ip, lp, images, labels = _synthetic_pair(tmp_path, gz=gz)
    x, y = load_mnist_idx(ip, lp, dtype=dtype)
    assert x.shape == (7, 1, 28, 28) and x.dtype == dtype
    assert y.shape == (7,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_array_equal(x[:, 0], images.astype(dtype) / dtype(255))
    np.testing.assert_array_equal(y, labels)


def test_load_mnist_idx_matches_load_mnist_layout(tmp_path):
    """A pair written from the bundled test split loads back identically."""
    x, y = load_mnist("test")
    images = np.round(x[:, 0] * 255).astype(np.uint8)
    save_idx(tmp_path / "i", images)
    save_idx(tmp_path / "l", y.astype(np.uint8))
    x2, y2 = load_mnist_idx(tmp_path / "i", tmp_path / "l")
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)


def test_load_mnist_idx_count_mismatch(tmp_path):
    ip, lp, images, labels = _synthetic_pair(tmp_path)
    save_idx(lp, labels[:-1])
    with pytest.raises(ValueError, match="count mismatch: 7 images.*6 labels"):
        load_mnist_idx(ip, lp)


@pytest.mark.parametrize(
    "bad_images",
    [np.zeros((3, 28, 28), np.int16), np.zeros((3, 784), np.uint8), np.zeros((3, 1, 28, 28), np.uint8)],
)
def test_load_mnist_idx_rejects_non_3d_uint8_images(tmp_path, bad_images):
    save_idx(tmp_path / "i", bad_images)
    save_idx(tmp_path / "l", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="3-D uint8"):
        load_mnist_idx(tmp_path / "i", tmp_path / "l")


def test_load_mnist_idx_rejects_bad_labels(tmp_path):
    save_idx(tmp_path / "i", np.zeros((3, 28, 28), np.uint8))
    save_idx(tmp_path / "l", np.zeros((3, 1), np.uint8))
    with pytest.raises(ValueError, match="1-D integers"):
        load_mnist_idx(tmp_path / "i", tmp_path / "l")
    save_idx(tmp_path / "l", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="1-D integers"):
        load_mnist_idx(tmp_path / "i", tmp_path / "l")


def test_load_mnist_idx_bad_dtype(tmp_path):
    ip, lp, _, _ = _synthetic_pair(tmp_path)
    with pytest.raises(ValueError, match="int32"):
        load_mnist_idx(ip, lp, dtype=np.int32)


def test_load_mnist_idx_missing_file(tmp_path):
    ip, _, _, _ = _synthetic_pair(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_mnist_idx(ip, tmp_path / "missing-labels")
