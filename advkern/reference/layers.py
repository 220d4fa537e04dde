"""Forward and backward passes of every layer, in plain NumPy: the executable specification.

Functional shape (cs231n): ``forward(x, ...) -> (out, cache)`` and
``backward(dout, cache) -> (dx, grads)`` where ``grads`` is a dict of parameter
gradients (empty for layers without parameters). The output dtype equals the
input dtype; nothing here modifies its arguments.

Layouts (the same as PyTorch, so weights map one to one):

- activations NCHW: ``(N, C, H, W)``; dense activations ``(N, D)``;
- dense weight ``w``: ``(D_in, D_out)`` (PyTorch ``nn.Linear.weight`` is ``(out, in)``: transpose);
- conv weight ``w``: ``(F, C, KH, KW)`` (PyTorch ``nn.Conv2d.weight`` as is); bias ``(F,)``;
- flatten: C order over ``(C, H, W)`` (PyTorch ``torch.flatten(x, 1)``).
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# ----------------------------------------------------------------------------- dense


def dense_forward(x, w, b):
    """Affine layer ``out = x @ w + b``.

    x: (N, D), w: (D, M), b: (M,) -> out: (N, M). 2*N*D*M FLOPs.
    """
    out = x @ w + b
    return out, (x, w)


def dense_backward(dout, cache, need_params=True):
    """dout: (N, M) -> dx: (N, D), grads {"w": (D, M), "b": (M,)} ({} if not need_params)."""
    x, w = cache
    if not need_params:
        return dout @ w.T, {}
    return dout @ w.T, {"w": x.T @ dout, "b": dout.sum(axis=0)}


# ----------------------------------------------------------------------------- conv


def resolve_padding(padding, in_hw, kernel, stride):
    """Explicit pads ``(top, bottom, left, right)`` for a padding spec.

    padding: 'valid' (no padding), 'same' (TensorFlow's rule: output size ceil(H / stride),
    the odd pixel of padding at the bottom/right), an int p (p on every side), a pair
    (ph, pw) (ph top and bottom, pw left and right) or a 4-tuple (top, bottom, left, right).
    """
    (h, w), (kh, kw), (sh, sw) = in_hw, kernel, stride
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            pads = []
            for size, k, s in ((h, kh, sh), (w, kw, sw)):
                total = max((-(-size // s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            return tuple(pads)
        raise ValueError(f"unknown padding {padding!r}: use 'same', 'valid' or integers")
    p = (padding,) if np.isscalar(padding) else tuple(padding)
    if len(p) == 1:
        p = p * 4
    elif len(p) == 2:
        p = (p[0], p[0], p[1], p[1])
    if len(p) != 4 or any(int(v) != v or v < 0 for v in p):
        raise ValueError(f"padding must be non-negative integers, got {padding!r}")
    return tuple(int(v) for v in p)


def conv_output_hw(in_hw, kernel, stride, pads):
    """Output (H_out, W_out) = floor((H + pad_t + pad_b - KH) / stride) + 1 per axis."""
    (h, w), (kh, kw), (sh, sw) = in_hw, kernel, stride
    t, b, l, r = pads
    return (h + t + b - kh) // sh + 1, (w + l + r - kw) // sw + 1


def _pad(x, pads):
    t, b, l, r = pads
    if not any(pads):
        return x
    return np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))


def _windows(xp, kernel, stride):
    """Strided view (N, C, H_out, W_out, KH, KW) of the padded input: im2col without a copy."""
    v = sliding_window_view(xp, kernel, axis=(2, 3))
    return v[:, :, :: stride[0], :: stride[1]]


def conv2d_forward(x, w, b, stride=(1, 1), pads=(0, 0, 0, 0)):
    """2-D cross-correlation (what deep-learning frameworks call convolution).

    out[n, f, i, j] = b[f] + sum_{c, u, v} w[f, c, u, v] * xp[n, c, i*sh + u, j*sw + v]
    where xp is x zero-padded by ``pads`` = (top, bottom, left, right).

    x: (N, C, H, W), w: (F, C, KH, KW), b: (F,) -> out: (N, F, H_out, W_out).
    2*N*F*C*KH*KW*H_out*W_out FLOPs.
    """
    kernel = w.shape[2:]
    xp = _pad(x, pads)
    cols = _windows(xp, kernel, stride)
    # tensordot contracts (C, KH, KW) with one GEMM: (N*Ho*Wo, C*KH*KW) @ (C*KH*KW, F).
    out = np.tensordot(cols, w, axes=([1, 4, 5], [1, 2, 3]))
    out = out.transpose(0, 3, 1, 2) + b[:, None, None]
    return np.ascontiguousarray(out), (x.shape, xp, w, stride, pads)


def conv2d_backward(dout, cache, need_params=True):
    """dout: (N, F, H_out, W_out) -> dx: (N, C, H, W), grads {"w": (F, C, KH, KW), "b": (F,)}.

    need_params=False skips the weight gradient (an attack needs only dx) and returns {}.
    """
    x_shape, xp, w, stride, pads = cache
    f, c, kh, kw = w.shape
    sh, sw = stride
    n, _, ho, wo = dout.shape
    d2 = dout.transpose(0, 2, 3, 1).reshape(-1, f)  # (N*Ho*Wo, F)
    # One GEMM gives every output's gradient with respect to its input window:
    # (N*Ho*Wo, F) @ (F, C*KH*KW), 2*N*Ho*Wo*F*C*KH*KW FLOPs, like the forward pass.
    dcols = (d2 @ w.reshape(f, -1)).reshape(n, ho, wo, c, kh, kw)
    dxp = np.zeros_like(xp)
    # col2im as KH*KW strided scatter-adds: within one tap (u, v) no two outputs share an
    # input pixel, so each add is a plain strided slice.
    for u in range(kh):
        for v in range(kw):
            dxp[:, :, u: u + sh * (ho - 1) + 1: sh, v: v + sw * (wo - 1) + 1: sw] += \
                dcols[..., u, v].transpose(0, 3, 1, 2)
    t, b_, l, r = pads
    dx = np.ascontiguousarray(dxp[:, :, t: t + x_shape[2], l: l + x_shape[3]])
    if not need_params:
        return dx, {}
    cols = _windows(xp, (kh, kw), stride).transpose(0, 2, 3, 1, 4, 5).reshape(d2.shape[0], -1)
    dw = (d2.T @ cols).reshape(w.shape)
    return dx, {"w": dw, "b": d2.sum(axis=0)}


# ----------------------------------------------------------------------------- pooling


def maxpool2d_forward(x, kernel=(2, 2), stride=(2, 2)):
    """Max pooling without padding (floor mode).

    out[n, c, i, j] = max_{u, v} x[n, c, i*sh + u, j*sw + v]
    x: (N, C, H, W) -> out: (N, C, (H - KH) // sh + 1, (W - KW) // sw + 1).
    The gradient goes to the first maximal element of each window (row-major), as in PyTorch.
    """
    cols = _windows(x, kernel, stride)
    n, c, ho, wo = cols.shape[:4]
    flat = cols.reshape(n, c, ho, wo, kernel[0] * kernel[1])
    arg = flat.argmax(axis=-1)
    out = np.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    return out, (x.shape, arg, tuple(kernel), tuple(stride))


def maxpool2d_backward(dout, cache):
    """dout: (N, C, H_out, W_out) -> dx: (N, C, H, W), grads {}."""
    x_shape, arg, (kh, kw), (sh, sw) = cache
    ho, wo = dout.shape[2:]
    dx = np.zeros(x_shape, dtype=dout.dtype)
    for u in range(kh):
        for v in range(kw):
            hit = np.where(arg == u * kw + v, dout, 0)
            dx[:, :, u: u + sh * (ho - 1) + 1: sh, v: v + sw * (wo - 1) + 1: sw] += hit
    return dx, {}


# ----------------------------------------------------------------------------- activations


def relu_forward(x):
    """out = max(x, 0). Any shape. The derivative at exactly 0 is taken as 0."""
    mask = x > 0
    return np.where(mask, x, 0).astype(x.dtype, copy=False), mask


def relu_backward(dout, cache):
    return np.where(cache, dout, 0).astype(dout.dtype, copy=False), {}


def tanh_forward(x):
    """out = tanh(x); d out / dx = 1 - out^2. Any shape."""
    out = np.tanh(x)
    return out, out


def tanh_backward(dout, cache):
    return dout * (1 - cache * cache), {}


def sigmoid_forward(x):
    """out = 1 / (1 + exp(-x)), computed as exp(-log(1 + exp(-x))) so no exp overflows.

    d out / dx = out * (1 - out). Any shape.
    """
    out = np.exp(-np.logaddexp(0, -x)).astype(x.dtype, copy=False)
    return out, out


def sigmoid_backward(dout, cache):
    return dout * cache * (1 - cache), {}


# ----------------------------------------------------------------------------- reshape


def flatten_forward(x):
    """x: (N, ...) -> (N, prod(...)) in C order."""
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:]))), x.shape


def flatten_backward(dout, cache):
    return dout.reshape(cache), {}


# ----------------------------------------------------------------------------- transposed conv
#
# conv2d_transpose is the adjoint of conv2d: with the same weight array, stride and pads,
# <conv2d(y), x> = <y, conv2d_transpose(x)> (biases zero) for y of the transposed conv's
# output shape. Weight layout (C_in, F_out, KH, KW), as PyTorch's nn.ConvTranspose2d.weight
# (and the conv2d weight whose adjoint it is: conv2d's (F, C, ...) with F = C_in here).


def resolve_transpose_padding(padding, in_hw, kernel, stride):
    """Crop pads ``(top, bottom, left, right)`` and ``output_padding (oh, ow)`` of a
    transposed convolution.

    The uncropped output has (H - 1) * sh + KH rows; the output is its rows
    [top, top + H_out) (zeros past its end), H_out = (H - 1) * sh + KH - top - bottom + oh:
    ``output_padding`` oh extends the output at the bottom (PyTorch's output_padding).
    padding: 'valid' (no crop: H_out = (H - 1) * sh + KH, PyTorch's padding=0), 'same'
    (H_out = H * sh as in TensorFlow/Keras: crop max(KH - sh, 0), the odd row at the bottom,
    the adjoint of conv2d 'same' on an H * sh input; when KH < sh, sh - KH rows of output
    padding), an int, a pair or a 4-tuple of crops as in ``resolve_padding``.
    """
    (h, w), (kh, kw), (sh, sw) = in_hw, kernel, stride
    if isinstance(padding, str) and padding == "same":
        pads, extra = [], []
        for k, s in ((kh, sh), (kw, sw)):
            total = max(k - s, 0)
            pads += [total // 2, total - total // 2]
            extra.append(max(s - k, 0))
        return tuple(pads), tuple(extra)
    return resolve_padding(padding, in_hw, kernel, stride), (0, 0)


def conv_transpose_output_hw(in_hw, kernel, stride, pads, output_padding=(0, 0)):
    """Output (H_out, W_out) = (H - 1) * sh + KH - top - bottom + oh per axis."""
    (h, w), (kh, kw), (sh, sw) = in_hw, kernel, stride
    t, b, l, r = pads
    return (h - 1) * sh + kh - t - b + output_padding[0], \
        (w - 1) * sw + kw - l - r + output_padding[1]


def conv2d_transpose_forward(x, w, b, stride=(1, 1), pads=(0, 0, 0, 0), output_padding=(0, 0)):
    """2-D transposed convolution ("deconvolution"), NCHW: the adjoint of ``conv2d_forward``.

    full[n, f, i*sh + u, j*sw + v] += sum_c x[n, c, i, j] * w[c, f, u, v]   (every i, j, u, v)
    out[n, f] = full[n, f, top: top + H_out, left: left + W_out] + b[f] (zeros past the end
    of full), ``pads`` = (top, bottom, left, right) crops and ``output_padding`` (oh, ow)
    rows/columns added back at the bottom/right (PyTorch's padding and output_padding).

    x: (N, C, H, W), w: (C, F, KH, KW), b: (F,) -> out: (N, F, H_out, W_out) with
    H_out = (H - 1) * sh + KH - top - bottom + oh (``conv_transpose_output_hw``).
    2*N*C*F*KH*KW*H*W FLOPs (each input pixel scatters a KH x KW patch per output channel).
    """
    n, c, h, wd = x.shape
    _, f, kh, kw = w.shape
    sh, sw = stride
    t, bo, l, r = pads
    oh, ow = output_padding
    hf, wf = (h - 1) * sh + kh, (wd - 1) * sw + kw
    ho, wo = hf - t - bo + oh, wf - l - r + ow
    # One GEMM gives every input pixel's patch: (N*H*W, C) @ (C, F*KH*KW).
    cols = np.tensordot(x, w, axes=([1], [0]))  # (N, H, W, F, KH, KW)
    # The full canvas is grown by the output padding so the crop below is one slice.
    full = np.zeros((n, f, max(hf, t + ho), max(wf, l + wo)), dtype=np.result_type(x, w))
    # col2im as KH*KW strided adds: within one tap no two input pixels share an output pixel.
    for u in range(kh):
        for v in range(kw):
            full[:, :, u: u + sh * (h - 1) + 1: sh, v: v + sw * (wd - 1) + 1: sw] += \
                cols[..., u, v].transpose(0, 3, 1, 2)
    out = full[:, :, t: t + ho, l: l + wo] + b[:, None, None]
    return np.ascontiguousarray(out.astype(x.dtype, copy=False)), \
        (x, w, stride, pads, (hf, wf))


def conv2d_transpose_backward(dout, cache, need_params=True):
    """dout: (N, F, H_out, W_out) -> dx: (N, C, H, W), grads {"w": (C, F, KH, KW), "b": (F,)}.

    The input gradient is a plain conv2d of the (uncropped) output gradient with the same
    weights: dx[n, c, i, j] = sum_{f, u, v} w[c, f, u, v] * dfull[n, f, i*sh + u, j*sw + v].
    need_params=False skips the weight gradient and returns {}.
    """
    x, w, stride, pads, (hf, wf) = cache
    n, c, h, wd = x.shape
    _, f, kh, kw = w.shape
    t, _, l, _ = pads
    ho, wo = dout.shape[2:]
    # Rows and columns past the end of full were zeros + bias: only the bias sees them.
    dfull = np.zeros((n, f, max(hf, t + ho), max(wf, l + wo)), dtype=dout.dtype)
    dfull[:, :, t: t + ho, l: l + wo] = dout
    win = _windows(dfull[:, :, :hf, :wf], (kh, kw), stride)  # (N, F, H, W, KH, KW)
    # (N*H*W, F*KH*KW) @ (F*KH*KW, C): the forward GEMM's FLOPs again.
    dx = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
    dx = np.ascontiguousarray(dx.astype(dout.dtype, copy=False))
    if not need_params:
        return dx, {}
    dw = np.tensordot(x, win, axes=([0, 2, 3], [0, 2, 3]))  # (C, F, KH, KW)
    return dx, {"w": dw.astype(dout.dtype, copy=False), "b": dout.sum(axis=(0, 2, 3))}


# ----------------------------------------------------------------------------- reshape


def reshape_forward(x, shape):
    """x: (N, ...) -> (N, *shape) in C order (e.g. a decoder's (N, C*H*W) -> (N, C, H, W))."""
    return x.reshape(x.shape[0], *shape), x.shape


def reshape_backward(dout, cache):
    return dout.reshape(cache), {}


# ----------------------------------------------------------------------------- maxout


def maxout_forward(x, pieces):
    """Max over groups of ``pieces`` consecutive features (Goodfellow et al. 2013).

    out[n, j] = max_{p < k} x[n, j*k + p], k = pieces. x: (N, M*k) -> out: (N, M).
    A maxout layer of M units is a dense layer to M*k features followed by this (the
    parameters live in the dense layer). The gradient goes to the first maximal piece of
    each group, as max pooling does.
    """
    n, d = x.shape
    groups = x.reshape(n, d // pieces, pieces)
    arg = groups.argmax(axis=2)
    out = np.take_along_axis(groups, arg[..., None], axis=2)[..., 0]
    return out, (x.shape, arg, pieces)


def maxout_backward(dout, cache):
    """dout: (N, M) -> dx: (N, M*k) (dout at each group's winning piece, 0 elsewhere), {}."""
    x_shape, arg, pieces = cache
    dx = np.where(np.arange(pieces) == arg[..., None], dout[..., None], 0)
    return dx.astype(dout.dtype, copy=False).reshape(x_shape), {}


# ----------------------------------------------------------------------------- rbf


def rbf_forward(x, c, log_beta):
    """Gaussian radial-basis units: out[n, j] = exp(-beta_j * ||x_n - c_j||^2).

    x: (N, D), centres c: (M, D), log_beta: (M,) with beta = exp(log_beta) (any real
    log_beta gives a positive width, so unconstrained training cannot make a unit grow
    with distance) -> out: (N, M).
    The squared distance is ||x||^2 - 2 x.c + ||c||^2: one GEMM, 2*N*M*D FLOPs, instead of
    an (N, M, D) difference tensor. Near a centre that sum cancels, and rounding can leave it
    slightly negative (x = c gives -1e-16 rather than 0), which would put out above 1: it is
    clamped at 0, and the clamped entries get a zero gradient (the true distance's gradient
    2 (x - c) is zero there too).
    """
    beta = np.exp(log_beta)
    raw = np.sum(x * x, axis=1)[:, None] - 2 * (x @ c.T) + np.sum(c * c, axis=1)
    d2 = np.maximum(raw, 0)
    out = np.exp(-beta * d2)
    return out, (x, c, beta, raw > 0, d2, out)


def rbf_backward(dout, cache, need_params=True):
    """dout: (N, M) -> dx: (N, D), grads {"c": (M, D), "log_beta": (M,)} ({} if not need_params).

    With e = dL/d(d2) = -beta * dout * out (0 where the distance was clamped):
    dx = 2 (sum_j e_j x - e @ c), dc = 2 (sum_n e_n c - e.T @ x),
    dlog_beta = sum_n e * d2 (d out / d log_beta = -beta d2 out). Two GEMMs of 2*N*M*D FLOPs.
    """
    x, c, beta, mask, d2, out = cache
    e = np.where(mask, -beta * dout * out, 0).astype(dout.dtype, copy=False)
    dx = 2 * (e.sum(axis=1)[:, None] * x - e @ c)
    if not need_params:
        return dx, {}
    return dx, {"c": 2 * (e.sum(axis=0)[:, None] * c - e.T @ x),
                "log_beta": np.sum(e * d2, axis=0)}
