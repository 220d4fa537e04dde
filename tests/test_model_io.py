"""Tests of advkern.nets: layer specs, Sequential shape inference and checks, architectures,
and the native .npz weight files (save -> load bit-exact; every defect a ModelFileError).

A test marked ``xfail(strict=True, reason="BUG: ...")`` pins down a known library bug: it
passes once the bug is fixed, and strict mode then reports XPASS so the mark gets removed.
"""

import contextlib
import json
import os
import pathlib
import re
import tempfile
import zipfile

import numpy as np
import pytest
from _helpers import small_models
from hypothesis import given, settings

from advkern.errors import AdvkernError, ModelFileError, ShapeError
from advkern.nets import (
    Conv2D,
    Dense,
    Flatten,
    MaxPool2D,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
    build,
    load,
    save,
)
from advkern.nets.layers import (LAYER_TYPES, RBF, Conv2DTranspose, Maxout, Reshape,
                                 layer_from_config)

META = "__advkern__"


def _tiny(dtype=np.float32, k=3):
    return Sequential([Conv2D(2, 3, 1, "same"), ReLU(), MaxPool2D(2), Flatten(), Dense(k)],
                      (1, 4, 4), name="tiny", seed=3, dtype=dtype)


def _assert_same_model(a, b):
    assert a.config() == b.config()
    assert a.layers == b.layers and a.input_shape == b.input_shape and a.name == b.name
    assert a.shapes == b.shapes
    assert len(a.params) == len(b.params)
    for i, (p, q) in enumerate(zip(a.params, b.params)):
        assert set(p) == set(q), i
        for k in p:
            assert p[k].dtype == q[k].dtype and p[k].shape == q[k].shape, (i, k)
            # A bool, not the bytes, in the assert: pytest would diff megabytes of bytes.
            bit_exact = p[k].tobytes() == q[k].tobytes()
            assert bit_exact, f"layer {i} {k} not bit-exact"


def _write_npz(path, meta, **arrays):
    """An .npz with a metadata entry (a dict is JSON-encoded) and raw arrays."""
    if meta is not None:
        arrays[META] = np.array(meta if isinstance(meta, str) else json.dumps(meta))
    np.savez(path, **arrays)
    return path


@contextlib.contextmanager
def file_error(tmp_path, pattern, exc=ModelFileError):
    """pytest.raises(exc) whose message must name the file and match ``pattern`` AFTER the
    directory is cut out: tmp_path holds the test's name, which must not satisfy the match."""
    with pytest.raises(exc) as info:
        yield info
    msg = str(info.value)
    assert str(tmp_path) in msg, f"message does not name the file: {msg!r}"
    rest = msg.replace(str(tmp_path), "<dir>")
    assert re.search(pattern, rest), f"{pattern!r} not in {rest!r}"


def _entries(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------- architectures


def test_cnn_shapes_and_parameter_count():
    model = build("cnn")
    assert model.shapes == [(1, 28, 28), (16, 28, 28), (16, 28, 28), (32, 13, 13), (32, 13, 13),
                            (64, 6, 6), (64, 6, 6), (2304,), (10,)]
    assert model.num_params == 46_346
    assert [layer.type for layer in model.layers] == [
        "conv2d", "relu", "conv2d", "relu", "conv2d", "relu", "flatten", "dense"]
    assert model.params[0]["w"].shape == (16, 1, 3, 3)
    assert model.params[7]["w"].shape == (2304, 10)


def test_mlp_and_logreg_shapes_and_parameter_counts():
    mlp = build("mlp")
    assert mlp.shapes == [(1, 28, 28), (784,), (256,), (256,), (256,), (256,), (10,)]
    assert mlp.num_params == 269_322
    lr = build("logreg")
    assert lr.shapes == [(1, 28, 28), (784,), (10,)] and lr.num_params == 7_850
    binary = build("logreg", num_classes=2)
    assert binary.shapes[-1] == (1,) and binary.num_logits == 1 and binary.num_classes == 2
    assert binary.num_params == 785
    for m in (mlp, lr, build("cnn")):
        assert m.num_logits == 10 and m.num_classes == 10
        assert m.dtype == np.float32 and m.input_shape == (1, 28, 28)


def test_build_rejects_unknown_names_and_class_counts():
    with pytest.raises(AdvkernError, match="resnet"):
        build("resnet")
    with pytest.raises(AdvkernError, match="num_classes"):
        build("mlp", num_classes=1)


def test_seeded_init_is_deterministic():
    for name in ("mlp", "cnn", "logreg"):
        a, b, c = build(name, seed=5), build(name, seed=5), build(name, seed=6)
        _assert_same_model(a, b)
        assert any(not np.array_equal(p["w"], q["w"])
                   for p, q in zip(a.params, c.params) if "w" in p)
        for p in a.params:
            if "b" in p:
                np.testing.assert_array_equal(p["b"], 0)
    m64 = build("cnn", seed=5, dtype="float64")
    assert m64.dtype == np.float64
    np.testing.assert_allclose(m64.params[0]["w"], build("cnn", seed=5).params[0]["w"],
                               rtol=1e-6)


# ----------------------------------------------------------------------------- shape errors


@pytest.mark.parametrize("layers, input_shape, index", [
    ([Dense(3)], (1, 4, 4), 0),                                   # dense on an image
    ([Conv2D(2, 5), Flatten(), Dense(2)], (1, 3, 3), 0),          # kernel larger than input
    ([ReLU(), Conv2D(2, (1, 4), 1, "valid"), Flatten(), Dense(2)], (1, 5, 3), 1),
    ([Flatten(), Conv2D(2, 1), Flatten(), Dense(2)], (1, 3, 3), 1),  # conv after flatten
    ([Flatten(), MaxPool2D(2), Dense(2)], (1, 4, 4), 1),          # pool after flatten
    ([Conv2D(2, 1), MaxPool2D(3), Flatten(), Dense(2)], (1, 2, 5), 1),  # pool larger than input
    ([Conv2D(2, 1), Flatten(), Dense(3), Tanh(), Conv2D(1, 1)], (1, 2, 2), 4),
])
def test_incompatible_stack_raises_at_build_naming_the_layer(layers, input_shape, index):
    with pytest.raises(ShapeError, match=rf"layer {index}\b") as info:
        Sequential(layers, input_shape)
    assert layers[index].type in str(info.value)


def test_stack_must_end_in_logits_and_hold_layer_specs():
    with pytest.raises(ShapeError, match="logits"):
        Sequential([Conv2D(2, 1)], (1, 3, 3))
    with pytest.raises(ShapeError, match="layer 1"):
        Sequential([Flatten(), "dense"], (1, 3, 3))


@pytest.mark.parametrize("make", [lambda: Dense(0), lambda: Dense(2.5), lambda: Conv2D(0),
                                  lambda: Conv2D(2, 0), lambda: Conv2D(2, (2, 2, 2)),
                                  lambda: Conv2D(2, 3, 0), lambda: Conv2D(2, 3, 1, "full"),
                                  lambda: Conv2D(2, 3, 1, -1), lambda: MaxPool2D(0)])
def test_bad_layer_hyperparameters_raise_shape_error(make):
    with pytest.raises(ShapeError):
        make()


@pytest.mark.parametrize("shape", [(1, -2, 3), (1, 0, 3), (), (1.5, 2), ("a", 2)])
def test_input_shape_must_be_positive_integers(shape):
    with pytest.raises(ShapeError, match="input_shape"):
        Sequential([Flatten(), Dense(2)], shape)


# ----------------------------------------------------------------------------- configs


def test_every_layer_round_trips_through_its_config():
    specs = [Dense(3), Conv2D(4, 3, 2, "same"), Conv2D(1, (2, 3), (1, 2), (1, 2)),
             Conv2D(2, 1, 1, (0, 1, 2, 0)), Conv2D(2, 2, 1, 1), MaxPool2D(2),
             MaxPool2D((3, 2), (1, 2)), ReLU(), Tanh(), Sigmoid(), Flatten(), Maxout(3),
             RBF(4), Conv2DTranspose(3, 3, 2, "same"), Conv2DTranspose(2, (2, 3), (1, 2), 1),
             Reshape((2, 3, 4))]
    assert {s.type for s in specs} == set(LAYER_TYPES)
    for s in specs:
        cfg = s.to_config()
        assert json.loads(json.dumps(cfg)) == cfg
        assert layer_from_config(json.loads(json.dumps(cfg))) == s


def test_unknown_layer_type_is_a_model_file_error_naming_it():
    with pytest.raises(ModelFileError, match="'softmax'"):
        layer_from_config({"type": "softmax"})
    with pytest.raises(ModelFileError, match="'batchnorm'"):
        Sequential.from_config({"input_shape": [3], "layers": [{"type": "batchnorm"}]})
    with pytest.raises(ModelFileError, match="type"):
        layer_from_config({"units": 3})
    with pytest.raises(ModelFileError, match="dense"):
        layer_from_config({"type": "dense", "units": 3, "activation": "relu"})
    with pytest.raises(ModelFileError):
        Sequential.from_config({"layers": []})


def test_from_config_rebuilds_the_architecture():
    model = _tiny()
    again = Sequential.from_config(json.loads(json.dumps(model.config())), seed=3)
    _assert_same_model(model, again)


# ----------------------------------------------------------------------------- params


def test_bad_params_are_rejected():
    layers, shape = [Flatten(), Dense(3)], (1, 2, 2)
    good = Sequential(layers, shape).params
    with pytest.raises(ShapeError, match=r"layer 1 \(dense\) parameter 'w'.*\(4, 3\)"):
        Sequential(layers, shape, [{}, {"w": np.zeros((5, 3), np.float32), "b": good[1]["b"]}])
    with pytest.raises(ShapeError, match="'b'"):
        Sequential(layers, shape, [{}, {"w": good[1]["w"], "b": np.zeros((3, 1), np.float32)}])
    with pytest.raises(ModelFileError, match="needs parameters"):
        Sequential(layers, shape, [{}, {"w": good[1]["w"]}])
    with pytest.raises(ModelFileError, match="needs parameters"):
        Sequential(layers, shape, [{"w": good[1]["w"]}, good[1]])
    with pytest.raises(ModelFileError, match="1 parameter sets for 2 layers"):
        Sequential(layers, shape, [good[1]])
    with pytest.raises(ModelFileError, match="dtype"):
        Sequential(layers, shape, [{}, {"w": np.zeros((4, 3), np.int32), "b": good[1]["b"]}])
    with pytest.raises(ModelFileError, match="NaN/Inf"):
        Sequential(layers, shape, [{}, {"w": np.full((4, 3), np.nan), "b": np.zeros(3)}])
    with pytest.raises(ModelFileError, match="mixed"):
        Sequential(layers, shape, [{}, {"w": np.zeros((4, 3)), "b": np.zeros(3, np.float32)}])


def test_copy_and_astype_are_independent():
    model = _tiny()
    c = model.copy()
    _assert_same_model(model, c)
    c.params[0]["w"][...] = 0
    assert np.any(model.params[0]["w"] != 0)
    m64 = model.astype(np.float64)
    assert m64.dtype == np.float64 and model.dtype == np.float32
    np.testing.assert_array_equal(m64.params[0]["w"], model.params[0]["w"])
    with pytest.raises(AdvkernError, match="float32 or float64"):
        model.astype(np.int32)


# ----------------------------------------------------------------------------- check_input


def test_check_input():
    model = _tiny()
    x = np.zeros((2, 1, 4, 4), np.float32)
    assert model.check_input(x) is x
    assert model.check_input(x.astype(np.float64)).dtype == np.float64
    for bad in (np.zeros((2, 1, 4, 5), np.float32), np.zeros((1, 4, 4), np.float32),
                np.zeros((2, 4, 4, 1), np.float32), np.zeros((), np.float32)):
        with pytest.raises(ShapeError, match=r"\(N, 1, 4, 4\)"):
            model.check_input(bad)
    for dt in (np.int64, np.uint8, np.float16, bool):
        with pytest.raises(AdvkernError, match="float32 or float64") as info:
            model.check_input(np.zeros((2, 1, 4, 4), dt))
        assert not isinstance(info.value, ShapeError)
    for v in (np.nan, np.inf, -np.inf):
        xb = x.copy()
        xb[1, 0, 2, 3] = v
        with pytest.raises(AdvkernError, match="NaN/Inf"):
            model.check_input(xb)
        with pytest.raises(AdvkernError, match="NaN/Inf"):
            model.logits(xb)
    with pytest.raises(ShapeError):
        model.logits(np.zeros((2, 16), np.float32))


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("make", [lambda: build("mlp", seed=2), lambda: build("cnn", seed=2),
                                  lambda: build("logreg", seed=2, num_classes=2),
                                  lambda: build("cnn", seed=4, dtype="float64"),
                                  lambda: _tiny(np.float64, k=1)])
def test_save_load_is_bit_exact(make, tmp_path):
    model = make()
    path = save(model, tmp_path / "model.npz")
    loaded = load(path)
    _assert_same_model(model, loaded)
    x = np.random.default_rng(0).uniform(0, 1, (2, *model.input_shape)).astype(model.dtype)
    np.testing.assert_array_equal(model.logits(x), loaded.logits(x))
    assert load(str(path)).config() == model.config()


def test_file_layout_is_as_documented(tmp_path):
    model = _tiny()
    path = save(model, tmp_path / "m.npz")
    entries = _entries(path)
    assert set(entries) == {META, "layer0.w", "layer0.b", "layer4.w", "layer4.b"}
    meta = json.loads(str(entries[META]))
    assert meta == {"format": 1, "model": model.config()}
    assert entries[META].ndim == 0 and entries[META].dtype.kind == "U"
    np.testing.assert_array_equal(entries["layer4.w"], model.params[4]["w"])
    with zipfile.ZipFile(path) as zf:  # compressed, as documented
        assert all(info.compress_type == zipfile.ZIP_DEFLATED for info in zf.infolist())


@settings(max_examples=15)
@given(model=small_models(dtype=np.float32))
def test_save_load_round_trips_random_stacks(model):
    for m in (model, model.astype(np.float64)):
        with tempfile.TemporaryDirectory() as d:
            _assert_same_model(m, load(save(m, pathlib.Path(d) / "m.npz")))


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.npz")


@pytest.mark.parametrize("keep", [0, 10, 100, 0.5, -100, -22, -1])
def test_truncated_file(tmp_path, keep):
    data = pathlib.Path(save(_tiny(), tmp_path / "m.npz")).read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    bad = tmp_path / "cut.npz"
    bad.write_bytes(data[:cut])
    with file_error(tmp_path, "cut.npz.*(corrupt|truncated|not )"):
        load(bad)


@pytest.mark.parametrize("n", [1, 7, 100, 5000])
def test_random_bytes(tmp_path, n):
    bad = tmp_path / "noise.npz"
    bad.write_bytes(np.random.default_rng(n).bytes(n))
    with file_error(tmp_path, "noise.npz") as info:
        load(bad)
    assert "pickle" not in str(info.value).lower()  # noise is not a pickle: say what it is


class _Trap:
    """Unpickling this object calls os.mkdir(marker): proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_object_array_is_refused_and_never_unpickled(tmp_path):
    path = tmp_path / "obj.npz"
    marker = tmp_path / "unpickled"
    obj = np.empty(2, dtype=object)
    obj[:] = [_Trap(str(marker)), [1, 2]]
    meta = json.dumps({"format": 1, "model": _tiny().config()})
    np.savez(path, allow_pickle=True, **{META: np.array(meta), "layer0.w": obj})
    with file_error(tmp_path, "obj.npz.*pickle"):
        load(path)
    assert not marker.exists(), "load() unpickled an object array"


def test_missing_metadata(tmp_path):
    entries = _entries(save(_tiny(), tmp_path / "m.npz"))
    del entries[META]
    path = _write_npz(tmp_path / "nometa.npz", None, **entries)
    with file_error(tmp_path, META):
        load(path)


def test_metadata_defects(tmp_path):
    entries = _entries(save(_tiny(), tmp_path / "m.npz"))
    cfg = json.loads(str(entries.pop(META)))["model"]
    unknown = dict(cfg, layers=[*cfg["layers"][:-1], {"type": "softmax"}])
    cases = [
        ({"format": 1, "model": unknown}, "unknown layer type 'softmax'"),
        ("{not json", "JSON"),
        ({"format": 2, "model": cfg}, "format 2"),
        ({"model": cfg}, "format"),
        ({"format": 1}, "format"),
        ([1, 2], "format"),
        ({"format": 1, "model": {"layers": cfg["layers"]}}, "input_shape"),
    ]
    for i, (meta, msg) in enumerate(cases):
        path = _write_npz(tmp_path / f"meta{i}.npz", meta, **entries)
        with file_error(tmp_path, msg):
            load(path)


def test_weight_shape_mismatch(tmp_path):
    entries = _entries(save(_tiny(), tmp_path / "m.npz"))
    meta = entries.pop(META)
    entries["layer4.w"] = entries["layer4.w"][:-1]
    path = _write_npz(tmp_path / "shape.npz", str(meta), **entries)
    with file_error(tmp_path, r"layer 4.*'w'.*\(8, 3\)", (ModelFileError, ShapeError)):
        load(path)
    # An architecture change with the old weights: a conv with 3 filters, weights for 2.
    cfg = json.loads(str(meta))
    cfg["model"]["layers"][0]["filters"] = 3
    entries = _entries(tmp_path / "m.npz")
    entries.pop(META)
    path = _write_npz(tmp_path / "arch.npz", cfg, **entries)
    with file_error(tmp_path, "layer 0", (ModelFileError, ShapeError)):
        load(path)


@pytest.mark.parametrize("extra, msg", [({"layer9.w": np.zeros(2)}, "layer9.w"),
                                        ({"weights": np.zeros(2)}, "weights"),
                                        ({"layerX.w": np.zeros(2)}, "layerX.w"),
                                        ({"layer1.w": np.zeros(2)}, "layer 1")])
def test_unexpected_arrays(tmp_path, extra, msg):
    entries = _entries(save(_tiny(), tmp_path / "m.npz"))
    meta = str(entries.pop(META))
    path = _write_npz(tmp_path / "extra.npz", meta, **entries, **extra)
    with file_error(tmp_path, re.escape(msg)):
        load(path)


def test_missing_and_bad_weight_arrays(tmp_path):
    entries = _entries(save(_tiny(), tmp_path / "m.npz"))
    meta = str(entries.pop(META))
    missing = {k: a for k, a in entries.items() if k != "layer0.b"}
    with file_error(tmp_path, "needs parameters"):
        load(_write_npz(tmp_path / "missing.npz", meta, **missing))
    ints = dict(entries, **{"layer0.b": entries["layer0.b"].astype(np.int32)})
    with file_error(tmp_path, "dtype"):
        load(_write_npz(tmp_path / "ints.npz", meta, **ints))
    nans = dict(entries, **{"layer0.w": np.full_like(entries["layer0.w"], np.nan)})
    with file_error(tmp_path, "NaN"):
        load(_write_npz(tmp_path / "nans.npz", meta, **nans))


# ----------------------------------------------------------------------------- regressions


def test_save_returns_the_path_it_wrote(tmp_path):
    # np.savez_compressed given a *name* appends '.npz'; save() must write exactly ``path``.
    model = _tiny()
    path = save(model, tmp_path / "weights.bin")
    assert pathlib.Path(path).exists()
    assert not (tmp_path / "weights.bin.npz").exists()
    _assert_same_model(model, load(path))
    _assert_same_model(model, load(save(model, str(tmp_path / "w2"))))


def test_plain_npy_file_is_a_model_file_error(tmp_path):
    path = tmp_path / "array.npy"
    np.save(path, np.zeros(3))
    with file_error(tmp_path, "array.npy"):
        load(path)


def _corrupt_deflate_stream(path):
    """Set the first byte of the first member's deflate data to 0xFF (invalid block type)."""
    data = bytearray(pathlib.Path(path).read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.infolist()[0]
    off = info.header_offset
    name_len = int.from_bytes(data[off + 26: off + 28], "little")
    extra_len = int.from_bytes(data[off + 28: off + 30], "little")
    data[off + 30 + name_len + extra_len] = 0xFF
    return bytes(data)


def test_corrupt_compressed_data_is_a_model_file_error(tmp_path):
    # Not truncated: the zip directory is intact but a deflate stream is invalid (zlib.error).
    path = save(_tiny(), tmp_path / "m.npz")
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(_corrupt_deflate_stream(path))
    with file_error(tmp_path, "corrupt"):
        load(bad)


@pytest.mark.parametrize("seed", range(6))
def test_overwritten_bytes_are_model_file_errors(tmp_path, seed):
    data = bytearray(pathlib.Path(save(_tiny(), tmp_path / "m.npz")).read_bytes())
    rng = np.random.default_rng(seed)
    start = int(rng.integers(40, len(data) - 200))
    data[start: start + 64] = rng.bytes(64)
    bad = tmp_path / "scrambled.npz"
    bad.write_bytes(bytes(data))
    try:
        loaded = load(bad)
    except ModelFileError:
        return
    # Bytes that happen to fall outside every checked field may still load; then the model
    # must at least be a valid one.
    assert isinstance(loaded, Sequential)


@pytest.mark.parametrize("model_cfg", [
    {"layers": 5, "input_shape": [3]},
    {"layers": "abc", "input_shape": [3]},
    {"layers": [], "input_shape": "abc"},
    {"layers": [{"type": "dense", "units": "x"}], "input_shape": [3]},
    {"layers": [{"type": "conv2d", "filters": 2, "padding": {"a": 1}}, {"type": "flatten"}],
     "input_shape": [1, 3, 3]},
    "not a dict",
])
def test_malformed_config_values_are_model_file_errors(tmp_path, model_cfg):
    path = _write_npz(tmp_path / "bad.npz", {"format": 1, "model": model_cfg})
    with file_error(tmp_path, "bad.npz"):
        load(path)


def test_numpy_integer_hyperparameters_can_be_saved(tmp_path):
    model = Sequential([Conv2D(np.int64(2), 1, 1, np.array([1, 0])), Flatten(),
                        Dense(np.int64(2))], (1, 2, 3))
    assert type(model.layers[2].units) is int
    _assert_same_model(model, load(save(model, tmp_path / "m.npz")))
