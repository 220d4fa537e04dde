"""Transposed convolution on the numba_cpu backend: BLAS GEMMs plus njit scatter / gather.

Same signatures, layouts and results (to float tolerance) as
``advkern.reference.layers.conv2d_transpose_forward`` / ``conv2d_transpose_backward``:
x (N, C, H, W), w (C, F, KH, KW), b (F,), out (N, F, H_out, W_out), crops ``pads`` =
(top, bottom, left, right), ``output_padding`` (oh, ow).

Arrangement: the input as pixel rows X (N*H*W, C), so one GEMM X @ w.reshape(C, F*KH*KW)
gives every pixel's F x KH x KW patch (2*N*H*W*C*F*KH*KW FLOPs), and one njit pass adds the
patches into the output with the crop as a bounds check (no padded canvas, no strided
temporaries). The backward gathers each pixel's patch of the output gradient (the transpose
of that scatter, zero outside the output) into D (N*H*W, F*KH*KW); then dX = D @ w_mat.T and
dw = X.T @ D are two GEMMs of the forward's size.
"""

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _scatter(cols, out, b, h, w, kh, kw, sh, sw, pt, pl):
    """out[n, f, i*sh + u - pt, j*sw + v - pl] += cols[(n*H + i)*W + j, (f*KH + u)*KW + v]
    for the positions inside out; out starts as the bias."""
    n, f, ho, wo = out.shape
    for a in range(n):
        for q in range(f):
            out[a, q, :, :] = b[q]
        for i in range(h):
            for j in range(w):
                row = (a * h + i) * w + j
                for q in range(f):
                    for u in range(kh):
                        oi = i * sh + u - pt
                        if oi < 0 or oi >= ho:
                            continue
                        base = (q * kh + u) * kw
                        for v in range(kw):
                            oj = j * sw + v - pl
                            if 0 <= oj < wo:
                                out[a, q, oi, oj] += cols[row, base + v]


@njit(cache=True, nogil=True)
def _gather(dout, d, h, w, kh, kw, sh, sw, pt, pl):
    """d[(n*H + i)*W + j, (f*KH + u)*KW + v] = dout[n, f, i*sh + u - pt, j*sw + v - pl]
    (0 outside dout): the adjoint of ``_scatter``."""
    n, f, ho, wo = dout.shape
    for a in range(n):
        for i in range(h):
            for j in range(w):
                row = (a * h + i) * w + j
                for q in range(f):
                    for u in range(kh):
                        oi = i * sh + u - pt
                        base = (q * kh + u) * kw
                        for v in range(kw):
                            oj = j * sw + v - pl
                            if 0 <= oi < ho and 0 <= oj < wo:
                                d[row, base + v] = dout[a, q, oi, oj]
                            else:
                                d[row, base + v] = 0


def conv2d_transpose_forward(x, w, b, stride=(1, 1), pads=(0, 0, 0, 0), output_padding=(0, 0)):
    """As ``reference.layers.conv2d_transpose_forward``; returns (out, cache)."""
    n, c, h, wd = x.shape
    _, f, kh, kw = w.shape
    sh, sw = stride
    t, bo, l, r = pads
    ho = (h - 1) * sh + kh - t - bo + output_padding[0]
    wo = (wd - 1) * sw + kw - l - r + output_padding[1]
    dtype = x.dtype
    xr = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(n * h * wd, c)
    wm = np.ascontiguousarray(w, dtype=dtype).reshape(c, f * kh * kw)
    cols = xr @ wm
    out = np.empty((n, f, ho, wo), dtype)
    _scatter(cols, out, np.ascontiguousarray(b, dtype=dtype), h, wd, kh, kw, sh, sw, t, l)
    return out, (xr, wm, x.shape, w.shape, stride, pads)


def conv2d_transpose_backward(dout, cache, need_params=True):
    """As ``reference.layers.conv2d_transpose_backward``: (dx, {"w", "b"} or {})."""
    xr, wm, (n, c, h, wd), (_, f, kh, kw), (sh, sw), (t, _, l, _) = cache
    dout = np.ascontiguousarray(dout, dtype=xr.dtype)
    d = np.empty((n * h * wd, f * kh * kw), xr.dtype)
    _gather(dout, d, h, wd, kh, kw, sh, sw, t, l)
    dx = np.ascontiguousarray((d @ wm.T).reshape(n, h, wd, c).transpose(0, 3, 1, 2))
    if not need_params:
        return dx, {}
    return dx, {"w": (xr.T @ d).reshape(c, f, kh, kw), "b": dout.sum(axis=(0, 2, 3))}
