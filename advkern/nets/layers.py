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


def _positive_int(v, what):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ShapeError(f"{what} must be a positive integer, got {v!r}")
    return int(v)


@dataclass(frozen=True)
class Maxout(Layer):
    """Max over groups of ``pieces`` consecutive features: (units * pieces,) -> (units,).

    Parameter-free: a maxout layer of ``units`` units with k pieces (Goodfellow et al. 2013)
    is ``Dense(units * k)`` followed by ``Maxout(k)``, so the affine part reuses the dense
    layer everywhere (init, GEMMs, weight files) and this layer is only the group max
    (``reference.layers.maxout_forward``; group j is features j*k .. j*k + k - 1).
    """

    pieces: int = 2
    type = "maxout"

    def __post_init__(self):
        object.__setattr__(self, "pieces", _positive_int(self.pieces, "maxout pieces"))

    def output_shape(self, in_shape):
        if len(in_shape) != 1:
            raise ShapeError(f"maxout expects a flat (D,) input, got {in_shape}: add a flatten "
                             "layer")
        if in_shape[0] % self.pieces:
            raise ShapeError(f"maxout with {self.pieces} pieces needs a multiple of {self.pieces}"
                             f" features, got {in_shape[0]}")
        return (in_shape[0] // self.pieces,)


@dataclass(frozen=True)
class RBF(Layer):
    """Gaussian radial-basis units exp(-beta_j ||x - c_j||^2). (D,) -> (units,).

    Params c (units, D) (the centres) and log_beta (units,): beta = exp(log_beta) stays
    positive under unconstrained training. Default init: standard normal centres and
    beta = 1 / (2 D) (the inverse of E||x - c||^2 for standardised x), so units start in
    their sensitive range; an architecture with data at hand sets the centres from it
    (``architectures.build(..., data=(x, y))``).
    """

    units: int
    type = "rbf"
    params = ("c", "log_beta")

    def __post_init__(self):
        object.__setattr__(self, "units", _positive_int(self.units, "rbf units"))

    def output_shape(self, in_shape):
        if len(in_shape) != 1:
            raise ShapeError(f"rbf expects a flat (D,) input, got {in_shape}: add a flatten layer")
        return (self.units,)

    def param_shapes(self, in_shape):
        return {"c": (self.units, in_shape[0]), "log_beta": (self.units,)}

    def init_params(self, in_shape, rng, dtype, scheme):
        d = in_shape[0]
        return {"c": rng.standard_normal((self.units, d)).astype(dtype),
                "log_beta": np.full(self.units, -np.log(2.0 * d), dtype)}


LAYER_TYPES.update({cls.type: cls for cls in (Maxout, RBF)})


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
           "Maxout", "RBF", "LAYER_TYPES", "layer_from_config"]


@dataclass(frozen=True)
class Conv2DTranspose(Layer):
    """2-D transposed convolution ("deconvolution"), NCHW: the adjoint of Conv2D.

    (C, H, W) -> (filters, H_out, W_out), H_out = (H - 1) * sh + KH - crop_top - crop_bottom
    (+ output padding). Params w (C, filters, KH, KW) (PyTorch ``nn.ConvTranspose2d.weight``
    as is), b (filters,). padding: 'same' (H_out = H * sh, as Keras), 'valid' (no crop),
    int, (ph, pw) or (top, bottom, left, right) crops; see
    ``reference.layers.resolve_transpose_padding``.
    """

    filters: int
    kernel: tuple = (3, 3)
    stride: tuple = (1, 1)
    padding: object = "valid"
    type = "conv2d_transpose"
    params = ("w", "b")

    def __post_init__(self):
        if isinstance(self.filters, bool) or not isinstance(self.filters, (int, np.integer)) \
                or self.filters < 1:
            raise ShapeError(f"conv2d_transpose filters must be a positive integer, "
                             f"got {self.filters!r}")
        object.__setattr__(self, "filters", int(self.filters))
        object.__setattr__(self, "kernel", _pair(self.kernel, "conv2d_transpose kernel"))
        object.__setattr__(self, "stride", _pair(self.stride, "conv2d_transpose stride"))
        pad = self.padding
        if not isinstance(pad, str):
            try:
                pad = [int(v) for v in pad] if not np.isscalar(pad) else int(pad)
            except (TypeError, ValueError):
                raise ShapeError(f"conv2d_transpose padding must be 'same', 'valid' or "
                                 f"integers, got {self.padding!r}") from None
        try:
            resolve_padding(pad, (1, 1), (1, 1), (1, 1))
        except ValueError as e:
            raise ShapeError(f"conv2d_transpose: {e}") from None
        object.__setattr__(self, "padding", pad)

    def pads(self, in_shape):
        """((top, bottom, left, right) crops, (oh, ow) output padding) for this input."""
        from ..reference.layers import resolve_transpose_padding
        return resolve_transpose_padding(self.padding, in_shape[1:], self.kernel, self.stride)

    def output_shape(self, in_shape):
        from ..reference.layers import conv_transpose_output_hw
        if len(in_shape) != 3:
            raise ShapeError(f"conv2d_transpose expects a (C, H, W) input, got {in_shape}")
        pads, extra = self.pads(in_shape)
        ho, wo = conv_transpose_output_hw(in_shape[1:], self.kernel, self.stride, pads, extra)
        if ho < 1 or wo < 1:
            raise ShapeError(f"conv2d_transpose padding {self.padding!r} crops the whole "
                             f"output of input {in_shape}")
        return (self.filters, ho, wo)

    def param_shapes(self, in_shape):
        return {"w": (in_shape[0], self.filters, *self.kernel), "b": (self.filters,)}

    def init_params(self, in_shape, rng, dtype, scheme):
        shape = self.param_shapes(in_shape)["w"]
        k = int(np.prod(self.kernel))
        # Each output pixel sums about C * KH * KW / (sh * sw) terms: that is its fan-in.
        fan_in = max(in_shape[0] * k // (self.stride[0] * self.stride[1]), 1)
        return {"w": _init(shape, fan_in, self.filters * k, rng, dtype, scheme),
                "b": np.zeros(self.filters, dtype)}

    def to_config(self):
        return {"type": self.type, "filters": int(self.filters), "kernel": list(self.kernel),
                "stride": list(self.stride), "padding": self.padding}


@dataclass(frozen=True)
class Reshape(Layer):
    """(D,) or any shape -> ``shape`` (same number of values, C order), e.g. a decoder's
    Dense output (C*H*W,) -> (C, H, W) for a Conv2DTranspose."""

    shape: tuple = ()
    type = "reshape"

    def __post_init__(self):
        try:
            t = tuple(self.shape)
            bad = not t or any(isinstance(a, bool) or int(a) != a or a < 1 for a in t)
        except (TypeError, ValueError):
            bad = True
        if bad:
            raise ShapeError(f"reshape shape must be positive integers, got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(int(a) for a in t))

    def output_shape(self, in_shape):
        if int(np.prod(in_shape)) != int(np.prod(self.shape)):
            raise ShapeError(f"reshape to {self.shape} needs {int(np.prod(self.shape))} "
                             f"values, input {tuple(in_shape)} has {int(np.prod(in_shape))}")
        return self.shape

    def to_config(self):
        return {"type": self.type, "shape": list(self.shape)}


LAYER_TYPES.update({cls.type: cls for cls in (Conv2DTranspose, Reshape)})
__all__ += ["Conv2DTranspose", "Reshape"]
