"""The Sequential model: a stack of layer specs, its inferred shapes, and its weights."""

import numpy as np

from .._validate import FLOAT_DTYPES, check_float_array
from ..errors import AdvkernError, ModelFileError, ShapeError
from .layers import Layer, ReLU, layer_from_config


class Sequential:
    """A feed-forward stack of layers with shape inference at build time.

    input_shape excludes the batch axis: (C, H, W) for images, (D,) for vectors.
    ``params[i]`` is the dict of layer i's arrays (empty for layers without weights);
    ``shapes[i]`` is layer i's input shape and ``shapes[-1]`` the logits shape (K,).
    An incompatible stack raises ShapeError naming the layer.
    """

    def __init__(self, layers, input_shape, params=None, name=None, seed=0, dtype=np.float32):
        self.layers = tuple(layers)
        try:
            dims = tuple(input_shape)
        except TypeError:
            raise ShapeError(f"input_shape must be a sequence of positive integers, "
                             f"got {input_shape!r}") from None
        if not dims or any(isinstance(d, bool) or not isinstance(d, (int, np.integer))
                           or d < 1 for d in dims):
            raise ShapeError(f"input_shape must be positive integers, got {input_shape!r}")
        self.input_shape = tuple(int(d) for d in dims)
        self.name = name
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, Layer):
                raise ShapeError(f"layer {i} is {layer!r}, not an advkern layer spec")
        self.shapes = [self.input_shape]
        for i, layer in enumerate(self.layers):
            try:
                self.shapes.append(tuple(layer.output_shape(self.shapes[-1])))
            except ShapeError as e:
                raise ShapeError(f"layer {i} ({layer.type}): {e}") from None
        if len(self.shapes[-1]) != 1:
            raise ShapeError(f"the last layer must output logits (K,), got {self.shapes[-1]}")
        if params is None:
            params = self._init_params(seed, np.dtype(dtype))
        self.params = self._check_params(params)

    # -- construction ---------------------------------------------------------------

    def _init_params(self, seed, dtype):
        rng = np.random.default_rng(seed)
        out = []
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
            scheme = "he" if isinstance(nxt, ReLU) else "glorot"
            out.append(layer.init_params(self.shapes[i], rng, dtype, scheme))
        return out

    def _check_params(self, params):
        params = list(params)
        if len(params) != len(self.layers):
            raise ModelFileError(f"{len(params)} parameter sets for {len(self.layers)} layers")
        checked = []
        dtypes = set()
        for i, (layer, p) in enumerate(zip(self.layers, params)):
            want = layer.param_shapes(self.shapes[i])
            if set(p) != set(want):
                raise ModelFileError(f"layer {i} ({layer.type}) needs parameters {sorted(want)}, "
                                     f"got {sorted(p)}")
            q = {}
            for k, shape in want.items():
                a = np.asarray(p[k])
                if a.shape != tuple(shape):
                    raise ShapeError(f"layer {i} ({layer.type}) parameter {k!r} must have shape "
                                     f"{tuple(shape)}, got {a.shape}")
                if a.dtype not in FLOAT_DTYPES:
                    raise ModelFileError(f"layer {i} parameter {k!r} has dtype {a.dtype}; "
                                         "float32 or float64 needed")
                if not np.all(np.isfinite(a)):
                    raise ModelFileError(f"layer {i} parameter {k!r} contains NaN/Inf")
                dtypes.add(a.dtype)
                q[k] = a
            checked.append(q)
        if len(dtypes) > 1:
            raise ModelFileError(f"mixed parameter dtypes {sorted(map(str, dtypes))}")
        return checked

    # -- properties -----------------------------------------------------------------

    @property
    def num_logits(self):
        """K: the number of logits (1 for a binary model)."""
        return self.shapes[-1][0]

    @property
    def num_classes(self):
        """Number of classes: K, or 2 for a binary model with one logit."""
        return max(self.num_logits, 2)

    @property
    def dtype(self):
        for p in self.params:
            for a in p.values():
                return a.dtype
        return np.dtype(np.float32)

    @property
    def num_params(self):
        return int(sum(a.size for p in self.params for a in p.values()))

    def copy(self):
        """Deep copy of the weights (specs are immutable and shared)."""
        return Sequential(self.layers, self.input_shape,
                          [{k: a.copy() for k, a in p.items()} for p in self.params], self.name)

    def astype(self, dtype):
        """A copy with every parameter cast to ``dtype`` (float32 or float64)."""
        dtype = np.dtype(dtype)
        if dtype not in FLOAT_DTYPES:
            raise AdvkernError(f"model dtype must be float32 or float64, got {dtype}")
        return Sequential(self.layers, self.input_shape,
                          [{k: a.astype(dtype) for k, a in p.items()} for p in self.params],
                          self.name)

    def config(self):
        """The architecture as a JSON-serialisable dict."""
        return {"name": self.name, "input_shape": list(self.input_shape),
                "layers": [layer.to_config() for layer in self.layers]}

    @classmethod
    def from_config(cls, cfg, params=None, seed=0):
        if not isinstance(cfg, dict) or not isinstance(cfg.get("layers"), list) \
                or not isinstance(cfg.get("input_shape"), list):
            raise ModelFileError("model config needs a 'layers' list and an 'input_shape' list")
        layers = [layer_from_config(c) for c in cfg["layers"]]
        try:
            return cls(layers, cfg["input_shape"], params, name=cfg.get("name"), seed=seed)
        except ShapeError:
            raise
        except (TypeError, ValueError) as e:
            raise ModelFileError(f"malformed model config: {e}") from None

    def check_input(self, x, name="x"):
        """Validate a batch (N, *input_shape) of float32/float64 finite values; return it."""
        x = check_float_array(x, name)
        if x.shape[1:] != self.input_shape:
            raise ShapeError(f"{name} must have shape (N, {', '.join(map(str, self.input_shape))})"
                             f" for this model, got {x.shape}")
        return x

    # -- running (through the NumPy reference) ----------------------------------------

    def logits(self, x):
        """Logits (N, K) of a batch x (N, *input_shape), in x's dtype."""
        from ..reference.network import forward
        return forward(self, self.check_input(x))[0]

    def predict(self, x, batch_size=1000):
        """Predicted classes (N,) int64."""
        from ..reference.losses import predict
        x = self.check_input(x)
        if not len(x):
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([predict(self.logits(x[i:i + batch_size]))
                               for i in range(0, len(x), batch_size)])

    def accuracy(self, x, y, batch_size=1000):
        return float(np.mean(self.predict(x, batch_size) == np.asarray(y))) if len(x) else float("nan")

    def summary(self):
        """Rows (index, type, output shape, parameter count) and the header line."""
        rows = []
        for i, layer in enumerate(self.layers):
            n = int(sum(int(np.prod(s)) for s in layer.param_shapes(self.shapes[i]).values()))
            desc = ", ".join(f"{k}={v}" for k, v in layer.to_config().items() if k != "type")
            rows.append((i, layer.type + (f"({desc})" if desc else ""), self.shapes[i + 1], n))
        return rows

    def __repr__(self):
        return (f"Sequential(name={self.name!r}, input_shape={self.input_shape}, "
                f"layers={[layer.type for layer in self.layers]}, params={self.num_params})")
