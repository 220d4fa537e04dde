"""Import a feed-forward ONNX model as an advkern ``Sequential``.

The ``onnx`` package only parses the file (``pip install advkern[onnx]``); advkern runs the
model. Supported graphs have one float input (N, ...) whose non-batch dimensions are static
and one output, and their compute nodes form a chain, each reading the previous one's output:

- ``Gemm`` (transA=0, transB 0 or 1, alpha/beta folded into w/b, C optional and broadcast
  over the batch), ``MatMul`` with a constant (in, out) matrix, optionally followed by an
  ``Add`` of a constant bias (an ``Add`` right after a Conv is folded into its bias too);
- ``Conv`` (2-D, group=1, dilations 1, explicit pads or auto_pad NOTSET/VALID/SAME_UPPER);
- ``MaxPool`` (2-D, no padding, dilations 1, floor mode);
- ``Relu``, ``Tanh``, ``Sigmoid``;
- ``Flatten`` (axis=1) and ``Reshape`` to (N, D), the shape given as a constant or computed
  from ``Shape`` of an activation (PyTorch's ``x.view(x.size(0), -1)``);
- a trailing ``Softmax`` / ``LogSoftmax``, dropped with a warning (attacks need logits);
- no-ops: ``Identity``, ``Dropout`` (inference), ``Cast`` to float.

Weights come from graph initializers (also when listed as graph inputs), from ``Constant``
nodes, and from external-data files next to the .onnx (``onnx.load`` resolves them). Small
integer side computations (Constant, Shape, Gather, Squeeze, Unsqueeze, Concat, Slice, Cast,
Reshape, Transpose of constants) are evaluated at load time; the batch size stays symbolic.

Layouts: Gemm transB=1 weight (out, in) -> dense ``w = W.T``; transB=0 and MatMul (in, out)
as is; Conv weight (F, C, KH, KW) as is; ONNX pads [top, left, bottom, right] -> advkern
(top, bottom, left, right). Weights become float32 unless every one is float64.
"""

import errno
import os
import warnings

import numpy as np

from ..errors import AdvkernError, ModelFileError, UnsupportedOpError
from ..reference.layers import resolve_padding
from .layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sigmoid, Tanh
from .model import Sequential

# The batch size inside folded shape arithmetic: any value no real dimension can take.
_BATCH = np.int64(-(1 << 40) - 7)

# Names exporters give every graph; the file stem says more.
_GENERIC_GRAPH_NAMES = {"", "main_graph", "torch_jit", "torch-jit-export", "graph", "model"}

_ACTIVATIONS = {"Relu": ReLU, "Tanh": Tanh, "Sigmoid": Sigmoid}
_NOOPS = {"Identity", "Dropout", "Cast"}
_FOLDABLE = {"Constant", "Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Concat",
             "Gather", "Slice", "Transpose", "Shape"}
SUPPORTED_OPS = sorted({"Gemm", "MatMul", "Add", "Conv", "MaxPool", "Flatten", "Reshape",
                        "Softmax", "LogSoftmax", *_ACTIVATIONS, *_NOOPS, *_FOLDABLE})


def load_onnx(path):
    """Read an .onnx file into a ``Sequential`` (logits model; a final softmax is dropped).

    Raises ``FileNotFoundError`` for a missing file, ``ModelFileError`` naming the path for a
    file that is not a readable ONNX model (or whose external data is missing), and
    ``UnsupportedOpError`` naming the op type and node for a graph advkern cannot run.
    """
    try:
        import onnx
    except ImportError:
        raise AdvkernError("reading .onnx models needs the onnx package: "
                           "pip install advkern[onnx]") from None
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, "no such ONNX model file", path)
    try:
        proto = onnx.load(path)
    except FileNotFoundError as e:
        raise ModelFileError(f"{path}: external data file missing ({e.filename or e})") from None
    except Exception as e:  # protobuf DecodeError, onnx ValidationError, ...: the parser's own
        raise ModelFileError(f"{path}: not a readable ONNX model "
                             f"({type(e).__name__}: {e})") from None
    if not proto.HasField("graph") or not proto.graph.node or proto.ir_version <= 0:
        raise ModelFileError(f"{path}: not an ONNX model (no graph nodes or IR version)")
    return _GraphImporter(onnx, proto, path).run()


class _GraphImporter:
    """One pass over the nodes in file (topological) order, building layers as it goes."""

    def __init__(self, onnx, proto, path):
        self.onnx = onnx
        self.graph = proto.graph
        self.path = path
        self.stem = os.path.splitext(os.path.basename(path))[0]
        self.consts = {}       # tensor name -> numpy array (weights and folded shapes)
        self.shapes = {}       # activation name -> shape without the batch axis
        self.current = None    # the activation the next compute node must read
        self.layers, self.params = [], []
        self.producer = None   # the layer that wrote ``current`` (for bias folding), or None
        self.softmax = None    # the dropped trailing softmax node's label
        self.static_batch = None

    # -- messages ---------------------------------------------------------------------

    def _label(self, node, index):
        return f"{node.op_type} node " + (repr(node.name) if node.name else f"#{index}")

    def _unsupported(self, msg):
        return UnsupportedOpError(f"{self.path}: {msg}")

    def _bad(self, msg):
        return ModelFileError(f"{self.path}: {msg}")

    # -- setup --------------------------------------------------------------------------

    def _read_input(self):
        init_names = {t.name for t in self.graph.initializer}
        inputs = [i for i in self.graph.input if i.name not in init_names]
        if len(inputs) != 1:
            raise self._unsupported(f"the graph has {len(inputs)} inputs "
                                    f"{[i.name for i in inputs]}; advkern runs one-input chains")
        inp = inputs[0]
        if not inp.type.HasField("tensor_type"):
            raise self._unsupported(f"graph input {inp.name!r} is not a tensor")
        tt = inp.type.tensor_type
        if tt.elem_type not in (self.onnx.TensorProto.FLOAT, self.onnx.TensorProto.DOUBLE,
                                self.onnx.TensorProto.FLOAT16):
            raise self._unsupported(f"graph input {inp.name!r} has element type "
                                    f"{self.onnx.TensorProto.DataType.Name(tt.elem_type)}; "
                                    "a float input is needed")
        if not tt.HasField("shape"):
            raise self._unsupported(f"graph input {inp.name!r} has no shape")
        dims = list(tt.shape.dim)
        if len(dims) < 2:
            raise self._unsupported(f"graph input {inp.name!r} has rank {len(dims)}; "
                                    "a batch axis and at least one feature axis are needed")
        shape = []
        for d in dims[1:]:
            if not d.HasField("dim_value") or d.dim_value < 1:
                raise self._unsupported(
                    f"graph input {inp.name!r} has a symbolic non-batch dimension "
                    f"{d.dim_param or '?'}; only the batch axis may be dynamic")
            shape.append(int(d.dim_value))
        if dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            self.static_batch = int(dims[0].dim_value)
        self.input_shape = tuple(shape)
        self.shapes[inp.name] = self.input_shape
        self.current = inp.name

    def _array(self, tensor):
        try:
            return self.onnx.numpy_helper.to_array(tensor)
        except Exception as e:
            raise self._bad(f"tensor {tensor.name!r} is unreadable ({e})") from None

    # -- constants ----------------------------------------------------------------------

    def _const(self, name, label, what):
        if name not in self.consts:
            raise self._unsupported(f"{label}: {what} {name!r} must be a constant "
                                    "(an initializer or a Constant node)")
        return self.consts[name]

    def _weight(self, name, label, what, ndim):
        a = self._const(name, label, what)
        if a.dtype.kind != "f":
            raise self._unsupported(f"{label}: {what} has dtype {a.dtype}; float weights needed")
        if a.ndim != ndim:
            raise self._unsupported(f"{label}: {what} must be {ndim}-D, got shape {a.shape}")
        return a

    def _attrs(self, node):
        get = self.onnx.helper.get_attribute_value
        return {a.name: get(a) for a in node.attribute}

    def _fold(self, node, label):
        """Evaluate a shape-arithmetic node all of whose inputs are constants."""
        op, at = node.op_type, self._attrs(node)
        x = [self.consts[n] if n else None for n in node.input]
        if op == "Constant":
            if "value" in at:
                out = self.onnx.numpy_helper.to_array(at["value"])
            elif "value_float" in at:
                out = np.array(at["value_float"], np.float32)
            elif "value_floats" in at:
                out = np.array(at["value_floats"], np.float32)
            elif "value_int" in at:
                out = np.array(at["value_int"], np.int64)
            elif "value_ints" in at:
                out = np.array(at["value_ints"], np.int64)
            else:
                raise self._unsupported(f"{label}: Constant with attribute(s) {sorted(at)}")
        elif op == "Identity":
            out = x[0]
        elif op == "Cast":
            out = x[0].astype(self.onnx.helper.tensor_dtype_to_np_dtype(at["to"]))
        elif op == "Transpose":
            out = np.transpose(x[0], at.get("perm"))
        elif op == "Concat":
            out = np.concatenate([a for a in x if a is not None], axis=at["axis"])
        elif op == "Gather":
            out = np.take(x[0], x[1], axis=at.get("axis", 0))
        elif op in ("Unsqueeze", "Squeeze"):
            axes = at.get("axes", None) if len(x) < 2 or x[1] is None else x[1]
            if op == "Unsqueeze":
                out = x[0]
                rank = x[0].ndim + len(axes)
                for ax in sorted(int(a) % rank for a in axes):
                    out = np.expand_dims(out, ax)
            else:
                out = np.squeeze(x[0], None if axes is None else tuple(int(a) for a in axes))
        elif op == "Slice":
            if len(x) > 1:
                starts, ends = x[1], x[2]
                axes = x[3] if len(x) > 3 and x[3] is not None else range(len(starts))
                steps = x[4] if len(x) > 4 and x[4] is not None else [1] * len(starts)
            else:
                starts, ends = at["starts"], at["ends"]
                axes, steps = at.get("axes", range(len(starts))), [1] * len(starts)
            idx = [slice(None)] * x[0].ndim
            for s, e, a, st in zip(starts, ends, axes, steps):
                big = np.iinfo(np.int64).max // 2  # INT64_MAX ends overflow numpy slicing
                idx[int(a)] = slice(int(np.clip(s, -big, big)), int(np.clip(e, -big, big)), int(st))
            out = x[0][tuple(idx)]
        elif op == "Reshape":
            shape = [int(v) for v in np.asarray(x[1]).reshape(-1)]
            if _BATCH in shape:
                raise self._unsupported(f"{label}: a shape that depends on the batch size")
            if not at.get("allowzero", 0):
                shape = [x[0].shape[i] if v == 0 and i < x[0].ndim else v
                         for i, v in enumerate(shape)]
            out = x[0].reshape(shape)
        else:
            raise self._unsupported(f"{label}: cannot evaluate {op} on constants")
        self.consts[node.output[0]] = np.asarray(out)

    def _shape_of(self, node):
        """``Shape`` of an activation: its static shape, the batch axis as a symbol."""
        at = self._attrs(node)
        full = np.array((_BATCH,) + self.shapes[node.input[0]], np.int64)
        start, end = at.get("start", 0), at.get("end", None)
        self.consts[node.output[0]] = full[start:end]

    # -- the chain ----------------------------------------------------------------------

    def _data_input(self, node, label, position=0):
        """The activation ``node`` reads (it must be ``current``); other inputs constants."""
        reads = [(i, n) for i, n in enumerate(node.input) if n in self.shapes]
        if not reads:
            raise self._unsupported(f"{label} reads no activation; its inputs "
                                    f"{list(node.input)} are unknown (graph not topologically "
                                    "sorted?)")
        if len(reads) > 1:
            raise self._unsupported(f"{label} combines activations {[n for _, n in reads]}; "
                                    "advkern runs chains, not branching graphs")
        i, name = reads[0]
        if name != self.current:
            raise self._unsupported(f"{label} reads {name!r}, which an earlier node already "
                                    "read; advkern runs chains, not branching graphs")
        if position is not None and i != position:
            raise self._unsupported(f"{label} takes the activation as input {i}; "
                                    f"advkern needs it as input {position}")
        for n in node.input:
            if n and n != name and n not in self.consts:
                raise self._unsupported(f"{label}: input {n!r} is not a constant")
        return name

    def _emit(self, node, layer, params, label):
        in_shape = self.shapes[self.current]
        try:
            out_shape = tuple(layer.output_shape(in_shape))
        except AdvkernError as e:
            raise self._unsupported(f"{label}: {e}") from None
        self.layers.append(layer)
        self.params.append(params)
        self._advance(node, out_shape)
        self.producer = layer if params else None

    def _advance(self, node, out_shape=None):
        out = node.output[0]
        self.shapes[out] = self.shapes[self.current] if out_shape is None else out_shape
        self.current = out

    def _check_extra_outputs(self, node, label, consumed):
        for extra in node.output[1:]:
            if extra and extra in consumed:
                raise self._unsupported(f"{label}: its output {extra!r} is used; advkern only "
                                        "runs single-output nodes")

    def run(self):
        g = self.graph
        for t in g.initializer:
            self.consts[t.name] = self._array(t)
        self._read_input()
        outputs = [o.name for o in g.output]
        consumed = {n for node in g.node for n in node.input if n} | set(outputs)
        for index, node in enumerate(g.node):
            label = self._label(node, index)
            try:
                self._node(node, label, consumed)
            except AdvkernError:
                raise
            except (ValueError, TypeError, KeyError, IndexError) as e:
                # A malformed node (missing attribute, inconsistent shapes): name it.
                raise self._bad(f"{label} is malformed ({type(e).__name__}: {e})") from None
        self._finish(outputs)
        weights = [a for p in self.params for a in p.values()]
        all64 = weights and all(a.dtype == np.float64 for a in weights)
        dtype = np.float64 if all64 else np.float32
        params = [{k: np.ascontiguousarray(a, dtype=dtype) for k, a in p.items()}
                  for p in self.params]
        name = g.name if g.name not in _GENERIC_GRAPH_NAMES else self.stem
        try:
            return Sequential(self.layers, self.input_shape, params, name=name)
        except AdvkernError as e:
            raise self._bad(str(e)) from None

    def _node(self, node, label, consumed):
        if node.domain not in ("", "ai.onnx"):
            raise self._unsupported(f"{label} is in domain {node.domain!r}; advkern supports "
                                    "standard ONNX ops only")
        self._check_extra_outputs(node, label, consumed)
        op = node.op_type
        reads_data = any(n in self.shapes for n in node.input)
        if op == "Shape" and reads_data:
            self._shape_of(node)
        elif not reads_data:
            missing = [n for n in node.input if n and n not in self.consts]
            if op not in SUPPORTED_OPS:
                raise self._unsupported(self._unknown_op(label))
            if missing:
                raise self._bad(f"{label} reads {missing}, which no earlier node produced "
                                "(graph not topologically sorted?)")
            if op not in _FOLDABLE:
                raise self._unsupported(f"{label} computes on constants only; advkern "
                                        "evaluates shape ops, not arithmetic, at load time")
            self._fold(node, label)
        elif self.softmax is not None and op not in _NOOPS:
            raise self._unsupported(f"{label} follows {self.softmax}; only a trailing "
                                    "softmax can be dropped")
        else:
            self._compute(node, label)

    def _unknown_op(self, label):
        return (f"unsupported ONNX op at {label}; advkern imports chains of "
                "Gemm/MatMul(+Add)/Conv/MaxPool/Relu/Tanh/Sigmoid/Flatten/Reshape "
                "(and a trailing Softmax)")

    def _finish(self, outputs):
        if len(outputs) != 1:
            raise self._unsupported(f"the graph has {len(outputs)} outputs {outputs}; "
                                    "advkern needs one (the logits)")
        if outputs[0] != self.current:
            raise self._unsupported(f"the graph output {outputs[0]!r} is not the end of the "
                                    f"node chain ({self.current!r})")
        if not self.layers:
            raise self._unsupported("the graph has no layers")
        if self.softmax is not None:
            warnings.warn(f"{self.path}: dropped the trailing {self.softmax}: advkern models "
                          "output logits, which attacks need", stacklevel=4)

    # -- one compute node -----------------------------------------------------------------

    def _compute(self, node, label):
        op, at = node.op_type, self._attrs(node)
        if op in ("Identity", "Dropout"):
            self._data_input(node, label)
            if op == "Dropout" and len(node.input) > 2 and node.input[2]:
                if bool(np.asarray(self.consts[node.input[2]]).item()):
                    raise self._unsupported(f"{label} has training_mode=True")
            self._advance(node)
        elif op == "Cast":
            self._data_input(node, label)
            to = at.get("to")
            if to not in (self.onnx.TensorProto.FLOAT, self.onnx.TensorProto.DOUBLE,
                          self.onnx.TensorProto.FLOAT16):
                raise self._unsupported(f"{label} casts the activation to "
                                        f"{self.onnx.TensorProto.DataType.Name(to)}; "
                                        "only casts to float are no-ops")
            self._advance(node)
        elif op in _ACTIVATIONS:
            self._data_input(node, label)
            self._emit(node, _ACTIVATIONS[op](), {}, label)
        elif op in ("Softmax", "LogSoftmax"):
            self._data_input(node, label)
            # The default axis is 1 before opset 13 and -1 after: the same axis of (N, K).
            axis = at.get("axis", -1)
            if len(self.shapes[self.current]) != 1 or axis not in (1, -1):
                raise self._unsupported(f"{label} over axis {axis} of a "
                                        f"{len(self.shapes[self.current]) + 1}-D tensor; only a "
                                        "softmax over the logits of (N, K) can be dropped")
            self.softmax = label
            self._advance(node)
            self.producer = None
        elif op == "Gemm":
            self._gemm(node, at, label)
        elif op == "MatMul":
            self._data_input(node, label)
            w = self._weight(node.input[1], label, "B", 2)
            self._dense(node, w, np.zeros(w.shape[1], w.dtype), label)
        elif op == "Add":
            self._add(node, label)
        elif op == "Conv":
            self._conv(node, at, label)
        elif op == "MaxPool":
            self._maxpool(node, at, label)
        elif op == "Flatten":
            self._data_input(node, label)
            rank = len(self.shapes[self.current]) + 1
            axis = at.get("axis", 1)
            if axis % rank != 1 % rank or not -rank <= axis < rank:
                raise self._unsupported(f"{label} has axis={axis}; only axis=1 (keep the batch "
                                        "axis) is supported")
            self._emit(node, Flatten(), {}, label)
        elif op == "Reshape":
            self._reshape(node, at, label)
        elif op in SUPPORTED_OPS:
            raise self._unsupported(f"{label} applied to an activation is not supported")
        else:
            raise self._unsupported(self._unknown_op(label))

    def _dense(self, node, w, b, label):
        d = self.shapes[self.current]
        if len(d) != 1:
            raise self._unsupported(f"{label} multiplies a {len(d) + 1}-D activation; flatten it "
                                    "to (N, D) first")
        if w.shape[0] != d[0]:
            raise self._unsupported(f"{label}: weight of shape {w.shape} does not take "
                                    f"{d[0]} inputs")
        self._emit(node, Dense(int(w.shape[1])), {"w": w, "b": b}, label)

    def _bias(self, c, units, label, what, per_channel=False):
        """A constant that broadcasts to one value per output unit, returned as (units,).

        Dense outputs are (N, units): c may be (), (1,), (units,), (1, 1) or (1, units).
        Conv outputs are (N, F, H, W): an added c aligns right, so it must be (1, F, 1, 1),
        (F, 1, 1) or all ones (a 1-D (F,) would broadcast over W, not over channels).
        """
        c = np.asarray(c)
        if c.dtype.kind != "f":
            raise self._unsupported(f"{label}: {what} has dtype {c.dtype}; floats needed")
        rank = 4 if per_channel else 2
        s = (1,) * (rank - c.ndim) + c.shape
        axis = 1 if per_channel else -1
        ok = c.ndim <= rank and s[axis] in (1, units) and all(
            d == 1 for i, d in enumerate(s) if i != axis % rank)
        if not ok:
            raise self._unsupported(f"{label}: {what} of shape {c.shape} is not a bias over the "
                                    f"{units} {'channels' if per_channel else 'outputs'}")
        return np.broadcast_to(c.reshape(-1), (units,)).copy()

    def _gemm(self, node, at, label):
        self._data_input(node, label)
        if at.get("transA", 0):
            raise self._unsupported(f"{label} has transA=1; only transA=0 is supported")
        w = self._weight(node.input[1], label, "B", 2)
        if at.get("transB", 0):
            w = w.T
        alpha, beta = at.get("alpha", 1.0), at.get("beta", 1.0)
        if alpha != 1.0:
            w = w * np.asarray(alpha, w.dtype)
        units = w.shape[1]
        if len(node.input) > 2 and node.input[2]:
            b = self._bias(self.consts[node.input[2]], units, label, "C")
            if beta != 1.0:
                b = b * np.asarray(beta, b.dtype)
        else:
            b = np.zeros(units, w.dtype)
        self._dense(node, w, b, label)

    def _add(self, node, label):
        self._data_input(node, label, position=None)
        other = next(n for n in node.input if n != self.current)
        layer = self.producer
        if layer is None:
            raise self._unsupported(f"{label} adds a constant after a layer without a bias; "
                                    "advkern folds an Add only right after Gemm/MatMul/Conv")
        p = self.params[-1]
        conv = isinstance(layer, Conv2D)
        b = self._bias(self.consts[other], p["b"].shape[0], label, "the added constant",
                       per_channel=conv)
        p["b"] = p["b"] + b.astype(np.result_type(p["b"], b))
        self._advance(node)
        self.producer = layer

    def _conv(self, node, at, label):
        self._data_input(node, label)
        w = self._weight(node.input[1], label, "W", 4)
        in_shape = self.shapes[self.current]
        if len(in_shape) != 3:
            raise self._unsupported(f"{label} is a 2-D Conv on a {len(in_shape) + 1}-D activation")
        if at.get("group", 1) != 1:
            raise self._unsupported(f"{label} has group={at['group']}; only group=1 is supported")
        if any(d != 1 for d in at.get("dilations", [1, 1])):
            raise self._unsupported(f"{label} has dilations={at['dilations']}; only 1 is supported")
        if w.shape[1] != in_shape[0]:
            raise self._unsupported(f"{label}: weight {w.shape} does not take "
                                    f"{in_shape[0]} channels")
        kernel = tuple(int(k) for k in w.shape[2:])
        if "kernel_shape" in at and tuple(at["kernel_shape"]) != kernel:
            raise self._bad(f"{label}: kernel_shape {at['kernel_shape']} disagrees with weight "
                            f"{w.shape}")
        stride = tuple(int(s) for s in at.get("strides", [1, 1]))
        padding = self._padding(at, label, in_shape, kernel, stride)
        if len(node.input) > 2 and node.input[2]:
            b = self._bias(self.consts[node.input[2]], w.shape[0], label, "B")
        else:
            b = np.zeros(w.shape[0], w.dtype)
        self._emit(node, Conv2D(int(w.shape[0]), kernel, stride, padding), {"w": w, "b": b}, label)

    def _padding(self, at, label, in_shape, kernel, stride):
        auto = at.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto == "VALID":
            return "valid"
        if auto == "SAME_UPPER":
            return "same"
        if auto != "NOTSET":
            raise self._unsupported(f"{label} has auto_pad={auto}; advkern supports NOTSET, "
                                    "VALID and SAME_UPPER")
        pads = [int(p) for p in at.get("pads", [0, 0, 0, 0])]
        if len(pads) != 4:
            raise self._bad(f"{label}: a 2-D Conv needs 4 pads, got {pads}")
        t, l, b, r = pads
        pads = (t, b, l, r)
        if not any(pads):
            return "valid"
        if pads == resolve_padding("same", in_shape[1:], kernel, stride):
            return "same"
        return list(pads)

    def _maxpool(self, node, at, label):
        self._data_input(node, label)
        in_shape = self.shapes[self.current]
        kernel = tuple(int(k) for k in at.get("kernel_shape", ()))
        if len(in_shape) != 3 or len(kernel) != 2:
            raise self._unsupported(f"{label}: only 2-D max pooling of (N, C, H, W) is supported")
        stride = tuple(int(s) for s in at.get("strides", [1, 1]))
        if any(d != 1 for d in at.get("dilations", [1, 1])):
            raise self._unsupported(f"{label} has dilations={at['dilations']}; only 1 is supported")
        auto = at.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto not in ("NOTSET", "VALID") or any(at.get("pads", [0, 0, 0, 0])):
            raise self._unsupported(f"{label} has padding (pads={at.get('pads')}, "
                                    f"auto_pad={auto}); advkern max-pools without padding")
        if at.get("ceil_mode", 0):
            # ceil mode only differs from floor mode where a window would overhang the edge.
            if any((n - k) % s for n, k, s in zip(in_shape[1:], kernel, stride)):
                raise self._unsupported(f"{label} has ceil_mode=1 with windows overhanging the "
                                        "input; advkern max-pools in floor mode")
        self._emit(node, MaxPool2D(kernel, stride), {}, label)

    def _reshape(self, node, at, label):
        self._data_input(node, label)
        if len(node.input) < 2 or node.input[1] not in self.consts:
            raise self._unsupported(f"{label}: the target shape must be a constant or computed "
                                    "from Shape")
        target = [int(v) for v in np.asarray(self.consts[node.input[1]]).reshape(-1)]
        in_shape = self.shapes[self.current]
        d = int(np.prod(in_shape))
        allowzero = at.get("allowzero", 0)
        ok = len(target) == 2
        if ok:
            n, k = target
            if k == 0 and not allowzero:
                k = in_shape[0]
            if n == 0 and not allowzero:
                n = _BATCH
            batch_ok = n == _BATCH or (n == -1 and k == d) or (
                self.static_batch is not None and n == self.static_batch)
            ok = batch_ok and (k == d or (k == -1 and n != -1))
        if not ok:
            shown = ["N" if v == _BATCH else v for v in target]
            raise self._unsupported(f"{label} reshapes {('N',) + in_shape} to {shown}; advkern "
                                    "supports only a flatten to (N, D)")
        self._emit(node, Flatten(), {}, label)
