"""Layer specifications: hyper-parameters, shape inference, parameter shapes and initialisation.

A spec holds no weights and runs nothing; the reference (``advkern.reference``) and the
backends run it. Shapes exclude the batch axis: an image is (C, H, W), a vector (D,).
Every spec round-trips through ``to_config()`` / ``layer_from_config()`` (plain JSON).
"""

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import ModelFileError, ShapeError
from ..reference.layers import conv_output_hw, resolve_padding


def _pair(v, name):
    try:
        t = (v, v) if np.isscalar(v) else tuple(v)
        bad = len(t) != 2 or any(isinstance(a, bool) or int(a) != a or a < 1 for a in t)
    except (TypeError, ValueError):
        bad = True
    if bad:
        raise ShapeError(f"{name} must be a positive integer or a pair of them, got {v!r}")
    return tuple(int(a) for a in t)


@dataclass(frozen=True)
class Layer:
    type = "layer"
    params = ()

    def output_shape(self, in_shape):
        raise NotImplementedError

    def param_shapes(self, in_shape):
        return {}

    def init_params(self, in_shape, rng, dtype, scheme):
        return {}

    def to_config(self):
        return {"type": self.type, **{k: v for k, v in asdict(self).items()}}


def _init(shape, fan_in, fan_out, rng, dtype, scheme):
    """He-normal (for layers followed by ReLU) or Glorot-uniform weights."""
    if scheme == "he":
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)
    limit = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


@dataclass(frozen=True)
class Dense(Layer):
    """Affine layer. (D,) -> (units,). Params w (D, units), b (units,)."""

    units: int
    type = "dense"
    params = ("w", "b")

    def __post_init__(self):
        if isinstance(self.units, bool) or not isinstance(self.units, (int, np.integer)) \
                or self.units < 1:
            raise ShapeError(f"dense units must be a positive integer, got {self.units!r}")
        object.__setattr__(self, "units", int(self.units))

    def output_shape(self, in_shape):
        if len(in_shape) != 1:
            raise ShapeError(f"dense expects a flat (D,) input, got {in_shape}: add a flatten layer")
        return (self.units,)

    def param_shapes(self, in_shape):
        return {"w": (in_shape[0], self.units), "b": (self.units,)}

    def init_params(self, in_shape, rng, dtype, scheme):
        d = in_shape[0]
        return {"w": _init((d, self.units), d, self.units, rng, dtype, scheme),
                "b": np.zeros(self.units, dtype)}


@dataclass(frozen=True)
class Conv2D(Layer):
    """2-D convolution, NCHW. (C, H, W) -> (filters, H_out, W_out).

    Params w (filters, C, KH, KW), b (filters,). padding: 'same', 'valid', int,
    (ph, pw) or (top, bottom, left, right); see ``reference.layers.resolve_padding``.
    """

    filters: int
    kernel: tuple = (3, 3)
    stride: tuple = (1, 1)
    padding: object = "valid"
    type = "conv2d"
    params = ("w", "b")

    def __post_init__(self):
        if isinstance(self.filters, bool) or not isinstance(self.filters, (int, np.integer)) \
                or self.filters < 1:
            raise ShapeError(f"conv2d filters must be a positive integer, got {self.filters!r}")
        object.__setattr__(self, "filters", int(self.filters))
        object.__setattr__(self, "kernel", _pair(self.kernel, "conv2d kernel"))
        object.__setattr__(self, "stride", _pair(self.stride, "conv2d stride"))
        pad = self.padding
        if not isinstance(pad, str):
            try:
                pad = [int(v) for v in pad] if not np.isscalar(pad) else int(pad)
            except (TypeError, ValueError):
                raise ShapeError(f"conv2d padding must be 'same', 'valid' or integers, "
                                 f"got {self.padding!r}") from None
        try:
            resolve_padding(pad, (1, 1), (1, 1), (1, 1))
        except ValueError as e:
            raise ShapeError(f"conv2d: {e}") from None
        object.__setattr__(self, "padding", pad)

    def pads(self, in_shape):
        return resolve_padding(self.padding, in_shape[1:], self.kernel, self.stride)

    def output_shape(self, in_shape):
        if len(in_shape) != 3:
            raise ShapeError(f"conv2d expects a (C, H, W) input, got {in_shape}")
        ho, wo = conv_output_hw(in_shape[1:], self.kernel, self.stride, self.pads(in_shape))
        if ho < 1 or wo < 1:
            raise ShapeError(f"conv2d kernel {self.kernel} does not fit input {in_shape} "
                             f"with padding {self.padding!r}")
        return (self.filters, ho, wo)

    def param_shapes(self, in_shape):
        return {"w": (self.filters, in_shape[0], *self.kernel), "b": (self.filters,)}

    def init_params(self, in_shape, rng, dtype, scheme):
        shape = self.param_shapes(in_shape)["w"]
        k = int(np.prod(self.kernel))
        return {"w": _init(shape, in_shape[0] * k, self.filters * k, rng, dtype, scheme),
                "b": np.zeros(self.filters, dtype)}

    def to_config(self):
        return {"type": self.type, "filters": int(self.filters), "kernel": list(self.kernel),
                "stride": list(self.stride), "padding": self.padding}


@dataclass(frozen=True)
class MaxPool2D(Layer):
    """Max pooling without padding. (C, H, W) -> (C, (H - KH) // sh + 1, (W - KW) // sw + 1)."""

    kernel: tuple = (2, 2)
    stride: tuple = None
    type = "maxpool2d"

    def __post_init__(self):
        object.__setattr__(self, "kernel", _pair(self.kernel, "maxpool2d kernel"))
        stride = self.kernel if self.stride is None else self.stride
        object.__setattr__(self, "stride", _pair(stride, "maxpool2d stride"))

    def output_shape(self, in_shape):
        if len(in_shape) != 3:
            raise ShapeError(f"maxpool2d expects a (C, H, W) input, got {in_shape}")
        (kh, kw), (sh, sw) = self.kernel, self.stride
        if in_shape[1] < kh or in_shape[2] < kw:
            raise ShapeError(f"maxpool2d kernel {self.kernel} larger than input {in_shape}")
        return (in_shape[0], (in_shape[1] - kh) // sh + 1, (in_shape[2] - kw) // sw + 1)

    def to_config(self):
        return {"type": self.type, "kernel": list(self.kernel), "stride": list(self.stride)}


@dataclass(frozen=True)
class _Elementwise(Layer):
    def output_shape(self, in_shape):
        return tuple(in_shape)


@dataclass(frozen=True)
class ReLU(_Elementwise):
    type = "relu"


@dataclass(frozen=True)
class Tanh(_Elementwise):
    type = "tanh"


@dataclass(frozen=True)
class Sigmoid(_Elementwise):
    type = "sigmoid"


@dataclass(frozen=True)
class Flatten(Layer):
    """(C, H, W) or any shape -> (prod,) in C order."""

    type = "flatten"

    def output_shape(self, in_shape):
        return (int(np.prod(in_shape)),)


LAYER_TYPES = {cls.type: cls for cls in (Dense, Conv2D, MaxPool2D, ReLU, Tanh, Sigmoid, Flatten)}


def layer_from_config(cfg):
    """Build a layer spec from its JSON dict; unknown types and fields are ModelFileErrors."""
    if not isinstance(cfg, dict) or "type" not in cfg:
        raise ModelFileError(f"layer config must be a dict with a 'type', got {cfg!r}")
    kind = cfg["type"]
    cls = LAYER_TYPES.get(kind)
    if cls is None:
        raise ModelFileError(f"unknown layer type {kind!r}: known types are {sorted(LAYER_TYPES)}")
    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ShapeError):
            raise
        raise ModelFileError(f"bad fields for layer {kind!r}: {e}") from None


__all__ = ["Layer", "Dense", "Conv2D", "MaxPool2D", "ReLU", "Tanh", "Sigmoid", "Flatten",
           "LAYER_TYPES", "layer_from_config"]
