"""ONNX import: PyTorch-exported fixtures, graphs built from native weights, and errors."""

import os
import sys
import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="ONNX import needs the optional onnx package")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from advkern.errors import AdvkernError, ModelFileError, UnsupportedOpError  # noqa: E402
from advkern.nets import (  # noqa: E402
    Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, Sigmoid, Tanh, build, load_model)
from advkern.nets.onnx_import import load_onnx  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data", "onnx")
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(DATA, "expected.npz"), allow_pickle=False) as z:
        return dict(z.items())


# ----------------------------------------------------------------------------- graph building


def _model(nodes, inits, in_shape, out, batch="N", dtype=TensorProto.FLOAT, name="g",
           extra_inputs=(), outputs=None):
    """A ModelProto with input 'x' of shape (batch, *in_shape) and output ``out``."""
    x = helper.make_tensor_value_info("x", dtype, [batch, *in_shape])
    outs = outputs or [helper.make_tensor_value_info(out, dtype, None)]
    graph = helper.make_graph(nodes, name, [x, *extra_inputs], outs,
                              [numpy_helper.from_array(np.asarray(a), k) for k, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save(proto, tmp_path, name="m.onnx"):
    path = str(tmp_path / name)
    onnx.save_model(proto, path)
    return path


def _load(proto, tmp_path):
    return load_onnx(_save(proto, tmp_path))


def _to_onnx(model, dense="gemm_t", conv="pads", flat="flatten"):
    """Export a native Sequential with onnx.helper in one of several exporter styles.

    dense: 'gemm_t' (Gemm transB=1, B = w.T (out, in), bias (1, out)), 'gemm' (transB=0),
    'matmul' (MatMul + Add); conv: 'pads' (explicit ONNX pads) or 'auto' (auto_pad
    SAME_UPPER/VALID when the layer says 'same'/'valid'); flat: 'flatten', 'reshape' (an
    initializer [-1, D]) or 'constant' (a Constant node [0, -1]).
    """
    nodes, inits, prev = [], {}, "x"
    for i, (layer, p) in enumerate(zip(model.layers, model.params)):
        out = f"h{i}"
        name = f"layer{i}"
        if layer.type == "dense":
            w, b = p["w"], p["b"]
            if dense == "matmul":
                inits[f"w{i}"] = w
                inits[f"b{i}"] = b
                nodes += [helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"], name=name + "mm"),
                          helper.make_node("Add", [f"mm{i}", f"b{i}"], [out], name=name)]
            else:
                t = dense == "gemm_t"
                inits[f"w{i}"] = np.ascontiguousarray(w.T) if t else w
                inits[f"b{i}"] = b[None, :]
                nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [out], name=name,
                                              transB=int(t)))
        elif layer.type == "conv2d":
            inits[f"w{i}"], inits[f"b{i}"] = p["w"], p["b"]
            attrs = {"kernel_shape": list(layer.kernel), "strides": list(layer.stride)}
            if conv == "auto" and isinstance(layer.padding, str):
                attrs["auto_pad"] = {"same": "SAME_UPPER", "valid": "VALID"}[layer.padding]
            else:
                t, b_, l, r = layer.pads(model.shapes[i])
                attrs["pads"] = [t, l, b_, r]
            nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [out], name=name,
                                          **attrs))
        elif layer.type == "maxpool2d":
            nodes.append(helper.make_node("MaxPool", [prev], [out], name=name,
                                          kernel_shape=list(layer.kernel),
                                          strides=list(layer.stride)))
        elif layer.type == "flatten":
            if flat == "flatten":
                nodes.append(helper.make_node("Flatten", [prev], [out], name=name, axis=1))
            elif flat == "reshape":
                inits[f"s{i}"] = np.array([-1, model.shapes[i + 1][0]], np.int64)
                nodes.append(helper.make_node("Reshape", [prev, f"s{i}"], [out], name=name))
            else:
                shape = numpy_helper.from_array(np.array([0, -1], np.int64))
                nodes += [helper.make_node("Constant", [], [f"s{i}"], name=name + "c", value=shape),
                          helper.make_node("Reshape", [prev, f"s{i}"], [out], name=name)]
        else:
            op = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid"}[layer.type]
            nodes.append(helper.make_node(op, [prev], [out], name=name))
        prev = out
    dtype = TensorProto.DOUBLE if model.dtype == np.float64 else TensorProto.FLOAT
    return _model(nodes, inits, model.input_shape, prev, dtype=dtype)


def _x(model, n=3, seed=1):
    return np.random.default_rng(seed).random((n, *model.input_shape)).astype(model.dtype)


def _small_mlp(dtype=np.float32, input_shape=(1, 5, 5)):
    return Sequential([Flatten(), Dense(7), Tanh(), Dense(6), Sigmoid(), Dense(4)], input_shape,
                      seed=3, dtype=dtype)


def _small_cnn(first_padding=(0, 1, 1, 2)):
    m = Sequential([Conv2D(3, 3, 1, first_padding), ReLU(), Conv2D(4, 3, 2, "same"), Tanh(),
                    MaxPool2D(2), Flatten(), Dense(5)], (2, 9, 9), seed=4)
    # Nonzero biases, so a dropped or misplaced bias shows.
    rng = np.random.default_rng(5)
    for p in m.params:
        if "b" in p:
            p["b"] = rng.standard_normal(p["b"].shape).astype(np.float32)
    return m


def _assert_same(loaded, native, x=None):
    x = _x(native) if x is None else x
    assert [l.type for l in loaded.layers] == [l.type for l in native.layers]
    assert loaded.shapes == native.shapes
    assert loaded.dtype == native.dtype
    tol = dict(rtol=1e-12, atol=1e-12) if native.dtype == np.float64 else dict(rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(loaded.logits(x), native.logits(x), **tol)


# ----------------------------------------------------------------------------- PyTorch fixtures


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_pytorch_fixture_matches_torch_logits(arch, exporter, expected):
    path = os.path.join(DATA, f"{arch}_{exporter}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no softmax to drop, nothing to warn about
        model = load_onnx(path)
    native = build(arch)
    assert model.name == f"{arch}_{exporter}"
    assert model.input_shape == (1, 28, 28)
    assert model.dtype == np.float32
    assert [l.type for l in model.layers] == [l.type for l in native.layers]
    assert model.shapes == native.shapes
    assert model.config()["layers"] == native.config()["layers"]
    assert [{k: a.shape for k, a in p.items()} for p in model.params] == \
           [{k: a.shape for k, a in p.items()} for p in native.params]
    np.testing.assert_allclose(model.logits(expected["x"]), expected[arch], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["small_legacy", "small_dynamo", "small_dynamo_noopt"])
def test_pytorch_fixture_with_softmax_matmul_and_view(name, expected):
    """Shape-computed Reshape, MatMul + Add, MaxPool, Tanh, Sigmoid, Identity, Softmax."""
    with pytest.warns(UserWarning, match="Softmax"):
        model = load_onnx(os.path.join(DATA, name + ".onnx"))
    assert [l.type for l in model.layers] == ["conv2d", "tanh", "maxpool2d", "flatten",
                                              "sigmoid", "dense"]
    z = model.logits(expected["x"])
    np.testing.assert_allclose(z, expected["small_logits"], rtol=RTOL, atol=ATOL)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(p / p.sum(axis=1, keepdims=True), expected["small_probs"],
                               rtol=RTOL, atol=ATOL)


def test_load_model_dispatches_on_onnx_suffix(expected):
    from pathlib import Path
    for path in (os.path.join(DATA, "cnn_legacy.onnx"), Path(DATA) / "cnn_legacy.onnx"):
        model = load_model(path)
        assert isinstance(model, Sequential)
        np.testing.assert_allclose(model.logits(expected["x"]), expected["cnn"], rtol=RTOL,
                                   atol=ATOL)


# ----------------------------------------------------------------------------- native weights


@pytest.mark.parametrize("dense", ["gemm_t", "gemm", "matmul"])
@pytest.mark.parametrize("flat", ["flatten", "reshape", "constant"])
def test_dense_styles_equal_native(dense, flat, tmp_path):
    native = _small_mlp()
    loaded = _load(_to_onnx(native, dense=dense, flat=flat), tmp_path)
    _assert_same(loaded, native)
    for got, want in zip(loaded.params, native.params):
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])  # layouts map exactly, no rounding


@pytest.mark.parametrize("conv", ["pads", "auto"])
def test_conv_maxpool_equal_native(conv, tmp_path):
    native = _small_cnn()
    loaded = _load(_to_onnx(native, conv=conv, flat="reshape"), tmp_path)
    _assert_same(loaded, native)
    # Asymmetric ONNX pads [top, left, bottom, right] = [0, 1, 1, 2] -> (top, bottom, left, right).
    assert loaded.layers[0].padding == [0, 1, 1, 2]
    assert loaded.layers[2].padding == "same"
    assert loaded.layers[2].pads(loaded.shapes[2]) == native.layers[2].pads(native.shapes[2])


def test_float64_weights_stay_float64(tmp_path):
    native = _small_mlp(np.float64)
    _assert_same(_load(_to_onnx(native, dense="matmul"), tmp_path), native)


def test_flat_input_keeps_vector_shape(tmp_path):
    native = Sequential([Dense(6), ReLU(), Dense(3)], (20,), seed=2)
    loaded = _load(_to_onnx(native), tmp_path)
    assert loaded.input_shape == (20,)
    _assert_same(loaded, native)


def test_static_batch_reshape_and_initializers_as_inputs(tmp_path):
    """Legacy export with a fixed batch: Reshape to [2, -1] and weights listed as inputs."""
    native = _small_mlp()
    proto = _to_onnx(native, flat="reshape")
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    init = {t.name: t for t in proto.graph.initializer}
    init["s0"].CopyFrom(numpy_helper.from_array(np.array([2, -1], np.int64), "s0"))
    for t in proto.graph.initializer:
        proto.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    _assert_same(_load(proto, tmp_path), native)


def test_gemm_alpha_beta_broadcast_bias_and_noops(tmp_path):
    native = Sequential([Flatten(), Dense(4)], (2, 3), seed=1)
    w, b = native.params[1]["w"], native.params[1]["b"] + np.float32(0.5)
    native.params[1]["b"] = b
    nodes = [helper.make_node("Identity", ["x"], ["i"]),
             helper.make_node("Cast", ["i"], ["c"], to=TensorProto.FLOAT),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("Dropout", ["f"], ["d"]),
             helper.make_node("Gemm", ["d", "w", "b"], ["g"], alpha=2.0, beta=0.5),
             helper.make_node("Add", ["half", "g"], ["y"])]
    proto = _model(nodes, {"w": w / 2, "b": (b - 0.25)[None, :] * 2,
                           "half": np.float32(0.25)}, (2, 3), "y")
    loaded = _load(proto, tmp_path)
    assert [l.type for l in loaded.layers] == ["flatten", "dense"]
    np.testing.assert_allclose(loaded.logits(_x(native)), native.logits(_x(native)), rtol=RTOL,
                               atol=ATOL)


def test_matmul_alone_has_zero_bias_and_conv_bias_from_add(tmp_path):
    w = np.random.default_rng(0).standard_normal((3, 2, 2, 2)).astype(np.float32)
    cb = np.array([0.1, -0.2, 0.3], np.float32)
    m = np.random.default_rng(1).standard_normal((12, 4)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "cb"], ["a"], name="bias"),
             helper.make_node("Flatten", ["a"], ["f"]),
             helper.make_node("MatMul", ["f", "m"], ["y"])]
    loaded = _load(_model(nodes, {"w": w, "cb": cb.reshape(1, 3, 1, 1), "m": m}, (2, 3, 3), "y"),
                   tmp_path)
    native = Sequential([Conv2D(3, 2), Flatten(), Dense(4)], (2, 3, 3),
                        [{"w": w, "b": cb}, {}, {"w": m, "b": np.zeros(4, np.float32)}])
    _assert_same(loaded, native)


def test_weights_from_constant_nodes(tmp_path):
    native = _small_mlp()
    proto = _to_onnx(native, dense="matmul")
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in proto.graph.initializer]
    del proto.graph.initializer[:]
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(consts + nodes)
    _assert_same(_load(proto, tmp_path), native)


def test_external_data(tmp_path):
    native = _small_cnn()
    path = str(tmp_path / "ext.onnx")
    onnx.save_model(_to_onnx(native), path, save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.weights", size_threshold=0)
    assert os.path.getsize(tmp_path / "ext.weights") >= 4 * native.num_params
    raw = onnx.load(path, load_external_data=False)
    assert all(t.data_location == TensorProto.EXTERNAL for t in raw.graph.initializer)
    _assert_same(load_onnx(path), native)
    os.remove(tmp_path / "ext.weights")
    with pytest.raises(ModelFileError, match="ext"):
        load_onnx(path)


def test_trailing_softmax_dropped_with_warning(tmp_path):
    native = _small_mlp()
    proto = _to_onnx(native)
    out = proto.graph.output[0].name
    proto.graph.node.append(helper.make_node("Softmax", [out], ["p"], name="sm", axis=-1))
    proto.graph.output[0].name = "p"
    with pytest.warns(UserWarning, match="Softmax node 'sm'") as record:
        loaded = _load(proto, tmp_path)
    assert record[0].filename == __file__  # the warning points at the caller
    _assert_same(loaded, native)


def test_model_name(tmp_path):
    proto = _to_onnx(_small_mlp())
    assert _load(proto, tmp_path).name == "g"
    proto.graph.name = "main_graph"  # the exporters' generic name: use the file stem
    assert load_onnx(_save(proto, tmp_path, "digits.onnx")).name == "digits"


# ----------------------------------------------------------------------------- errors


def _chain(extra, in_shape=(2, 6, 6), inits=None):
    """x -> Relu 'r' -> extra nodes; the last node's first output is the graph output."""
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="r"), *extra]
    return _model(nodes, inits or {}, in_shape, nodes[-1].output[0])


@pytest.mark.parametrize("node, inits, words", [
    (helper.make_node("LSTM", ["r", "w", "w"], ["y"], name="my_lstm"),
     {"w": np.zeros(1, np.float32)}, ["LSTM", "my_lstm"]),
    (helper.make_node("Pad", ["r", "p"], ["y"], name="pad7"), {"p": np.zeros(8, np.int64)},
     ["Pad", "pad7"]),
    (helper.make_node("Add", ["r", "x"], ["y"], name="residual"), {}, ["Add", "residual"]),
    (helper.make_node("Conv", ["r", "w"], ["y"], name="gconv", group=2),
     {"w": np.zeros((2, 1, 3, 3), np.float32)}, ["group", "gconv"]),
    (helper.make_node("Conv", ["r", "w"], ["y"], name="dconv", dilations=[2, 2]),
     {"w": np.zeros((2, 2, 3, 3), np.float32)}, ["dilations", "dconv"]),
    (helper.make_node("Conv", ["r", "w"], ["y"], name="lconv", auto_pad="SAME_LOWER"),
     {"w": np.zeros((2, 2, 3, 3), np.float32)}, ["SAME_LOWER", "lconv"]),
    (helper.make_node("MaxPool", ["r"], ["y"], name="ppool", kernel_shape=[2, 2],
                      pads=[1, 1, 1, 1]), {}, ["MaxPool", "ppool", "pads"]),
    (helper.make_node("MaxPool", ["r"], ["y"], name="cpool", kernel_shape=[4, 4], strides=[4, 4],
                      ceil_mode=1), {}, ["ceil_mode", "cpool"]),
    (helper.make_node("Flatten", ["r"], ["y"], name="flat2", axis=2), {}, ["axis", "flat2"]),
    (helper.make_node("Reshape", ["r", "s"], ["y"], name="rs"), {"s": np.array([-1, 2, 36])},
     ["Reshape", "rs", "(N, D)"]),
    (helper.make_node("Mul", ["r", "s"], ["y"], name="scale"), {"s": np.float32(2)},
     ["Mul", "scale"]),
    (helper.make_node("Relu", ["x"], ["y"], name="again"), {}, ["again", "chain"]),
    (helper.make_node("Softmax", ["r"], ["y"], name="sm4", axis=1), {}, ["Softmax", "sm4"]),
])
def test_unsupported_graphs(node, inits, words, tmp_path):
    path = _save(_chain([node], inits=inits), tmp_path)
    with pytest.raises(UnsupportedOpError) as e:
        load_onnx(path)
    for w in words + [path]:
        assert w in str(e.value)


def test_unnamed_node_is_named_by_index(tmp_path):
    proto = _chain([helper.make_node("Erf", ["r"], ["y"])])
    with pytest.raises(UnsupportedOpError, match=r"Erf node #1"):
        _load(proto, tmp_path)


def test_softmax_not_trailing(tmp_path):
    nodes = [helper.make_node("Flatten", ["x"], ["f"]),
             helper.make_node("Softmax", ["f"], ["s"], name="mid"),
             helper.make_node("Gemm", ["s", "w"], ["y"], name="fc")]
    proto = _model(nodes, {"w": np.ones((4, 2), np.float32)}, (4,), "y")
    with pytest.raises(UnsupportedOpError, match="fc.*follows Softmax node 'mid'"):
        _load(proto, tmp_path)


def test_malformed_node_is_a_model_file_error(tmp_path):
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Concat", ["s", "s"], ["c"], name="cat"),  # no axis attribute
             helper.make_node("Reshape", ["x", "c"], ["y"])]
    with pytest.raises(ModelFileError, match="Concat node 'cat' is malformed") as e:
        _load(_model(nodes, {}, (4,), "y"), tmp_path)
    assert not isinstance(e.value, UnsupportedOpError)


def test_multiple_inputs_and_outputs(tmp_path):
    two_in = _model([helper.make_node("Relu", ["x"], ["y"])], {}, (3,), "y",
                    extra_inputs=[helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["N", 3])])
    with pytest.raises(UnsupportedOpError, match="2 inputs"):
        _load(two_in, tmp_path)
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("r", "y")]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Tanh", ["r"], ["y"])]
    two_out = _model(nodes, {}, (3,), "y", outputs=outs)
    with pytest.raises(UnsupportedOpError, match="2 outputs"):
        _load(two_out, tmp_path)


def test_corrupt_files(tmp_path):
    good = open(os.path.join(DATA, "cnn_legacy.onnx"), "rb").read()
    rng = np.random.default_rng(0)
    blobs = {"truncated.onnx": good[: len(good) // 2], "empty.onnx": b"",
             "text.onnx": b"this is not a model\n",
             **{f"random{i}.onnx": rng.bytes(500) for i in range(5)}}
    for name, blob in blobs.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(ModelFileError, match=name) as e:
            load_onnx(path)
        assert type(e.value) is ModelFileError, (name, e.value)
    with pytest.raises(FileNotFoundError):
        load_onnx(tmp_path / "missing.onnx")


def test_missing_onnx_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(AdvkernError, match=r"pip install advkern\[onnx\]"):
        load_onnx(os.path.join(DATA, "mlp_legacy.onnx"))
