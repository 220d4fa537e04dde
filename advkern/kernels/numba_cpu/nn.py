"""Network primitives of the numba_cpu backend: BLAS GEMMs plus fused njit passes.

Every primitive equals the ``numpy`` backend (``advkern.reference.network``) to float
tolerance; the arithmetic is reorganised for speed:

- Internal layout. Image activations live as NHWC rows ``(N, H*W*C)``, so im2col copies
  ``KW*C`` contiguous numbers per kernel row and the conv GEMM ``cols @ wmat`` writes NHWC
  directly (no transposes between layers). A Flatten of an NHWC tensor yields the features in
  (H, W, C) order; the Dense layer that reads it gets its weight rows permuted once, in
  ``prepare``, so the flatten costs nothing. Caller arrays are NCHW: a transpose happens only
  at the boundary, and only when C > 1 (for C = 1 the two layouts coincide). A one-channel
  conv (an MNIST first layer) uses a transposed im2col (``_im2col_t``): whole shifted rows
  instead of one number per tap.
- Fusion. A Dense/Conv2D followed by ReLU/Tanh/Sigmoid is one stage: GEMM, then one pass
  adding the bias and applying the activation in place. The backward pass needs only that
  output (relu' = [y > 0], tanh' = 1 - y^2, sigmoid' = y (1 - y)), no mask array. The
  softmax cross-entropy (or CW margin) value and gradient are one pass over the logits; the
  col2im scatter of a conv's input gradient also applies the derivative of the activation
  before it. The input-gradient passes skip every weight gradient.
- Chunking and threads. A batch runs through the whole network (forward and backward) a
  chunk of images at a time, sized so the chunk's activations, im2col matrices and
  gradients stay in cache (``_CHUNK_BYTES``); the two halves of a batch run in two threads
  with a single-threaded BLAS each (``_drive``). Scratch buffers are cached per thread on
  the prepared net, so a PGD loop allocates only the arrays it returns.
- Maxout and RBF layers are stages of their own: an njit group max (its backward is the
  max-pool scatter), and one GEMM h @ c.T between two njit passes (squared distance and exp;
  e = dL/d(d2) and the x terms of the input gradient). After a flatten of NHWC rows they
  read the caller's feature order through a permutation fixed in the plan.
- Jacobian. One forward per image; the backward runs on N*K rows (the K one-hot seeds per
  image) reading each image's cached activations, pooling choices and im2col rows in
  place (row r of the backward batch belongs to image r // K). The seed GEMM of a final
  Dense layer is a copy of w.T.

Costs per image (forward; the input-gradient backward is the same again): dense 2*D*M
FLOPs, conv 2*F*C*KH*KW*Ho*Wo FLOPs, all in BLAS; every other pass is O(activations).
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit, uint64

from ...errors import AdvkernError, ShapeError
from .net import Net
from .steps import linf_rows, raise_nonfinite, step_args

# Working-set target of one chunk (activations + im2col + gradients, forward and backward),
# per thread. Measured on the cnn (one thread, us per image per step): 112 at 8-16 images
# (~6 MiB), 143 at 24 images: its 97 KB/image im2col matrix must stay near the 1 MiB L2.
# The mlp gets ~600-image chunks, tall enough for BLAS.
_CHUNK_BYTES = 6 << 20
_MIN_CHUNK = 8

_ACT = {"relu": 1, "tanh": 2, "sigmoid": 3}


# ----------------------------------------------------------------------------- kernels
#
# Hot loops index with uint64 offsets: numba wraps negative int64 indices (a compare and add
# per access), which blocks LLVM's vectoriser on computed offsets (measured 10x on im2col).
# Signed coordinates are bounds-checked first, then converted. Note uint64 op int64 is
# float64 in numba, so every operand of an offset is uint64.


@njit(cache=True, nogil=True, inline="always")
def _sigmoid(v):
    # 1 / (1 + e^-v) without overflow: for v < 0 use e^v / (1 + e^v).
    if v >= 0:
        return 1 / (1 + np.exp(-v))
    e = np.exp(v)
    return e / (1 + e)


@njit(cache=True, nogil=True)
def _act_inplace(a, act):
    """a (1-D) <- act(a) in place; act 0 none, 1 relu, 2 tanh, 3 sigmoid."""
    zero = a.dtype.type(0)
    if act == 1:
        for k in range(a.shape[0]):
            v = a[k]
            a[k] = v if v > zero else zero
    elif act == 2:
        for k in range(a.shape[0]):
            a[k] = np.tanh(a[k])
    elif act == 3:
        for k in range(a.shape[0]):
            a[k] = _sigmoid(a[k])


@njit(cache=True, nogil=True)
def _dact(dm, ym, act):
    """dm *= act'(ym) in place, from the activation's output ym (1-D); act 0: no-op.

    relu' = [y > 0] (0 at the kink, as the reference), tanh' = 1 - y^2, sigmoid' = y (1 - y).
    """
    zero = dm.dtype.type(0)
    one = dm.dtype.type(1)
    if act == 1:
        for k in range(dm.shape[0]):
            dm[k] = dm[k] if ym[k] > zero else zero
    elif act == 2:
        for k in range(dm.shape[0]):
            dm[k] = dm[k] * (one - ym[k] * ym[k])
    elif act == 3:
        for k in range(dm.shape[0]):
            dm[k] = dm[k] * ym[k] * (one - ym[k])


@njit(cache=True, nogil=True)
def _bias_act(out, btile, act):
    """out (flat, rows of F) <- act(out + b) in place; btile: b repeated R times (R*F >= 64).

    Whole blocks of R rows make the inner loop long enough to vectorise for small F.
    """
    zero = out.dtype.type(0)
    total = out.shape[0]
    blk = btile.shape[0]
    nb = total // blk
    for s in range(nb + 1):
        base = uint64(s * blk)
        lim = blk if s < nb else total - nb * blk
        if act == 1:
            for t in range(lim):
                v = out[base + uint64(t)] + btile[t]
                out[base + uint64(t)] = v if v > zero else zero
        elif act == 0:
            for t in range(lim):
                out[base + uint64(t)] += btile[t]
        elif act == 2:
            for t in range(lim):
                out[base + uint64(t)] = np.tanh(out[base + uint64(t)] + btile[t])
        else:
            for t in range(lim):
                out[base + uint64(t)] = _sigmoid(out[base + uint64(t)] + btile[t])


@njit(cache=True, nogil=True)
def _act_bwd(g, y, rep, act):
    """g (N*rep, D) *= act'(y[r // rep]) in place, from the activation's output y (N, D)."""
    for r in range(g.shape[0]):
        _dact(g[r], y[r // rep], act)


@njit(cache=True, nogil=True)
def _im2col(x, cols, h, w, c, kh, kw, sh, sw, pt, pl, ho, wo):
    """cols[(n*Ho + i)*Wo + j, (u*KW + v)*C + ch] = xpad[n, i*sh + u, j*sw + v, ch].

    x (N, H*W*C) NHWC rows, cols (N*Ho*Wo, KH*KW*C); a window row is KW*C contiguous numbers.
    """
    n = x.shape[0]
    zero = x.dtype.type(0)
    run = uint64(kw * c)
    cu = uint64(c)
    xf = x.ravel()
    cf = cols.ravel()
    kd = uint64(kh * kw * c)
    img = h * w * c
    for m in range(n):
        for i in range(ho):
            for j in range(wo):
                r0 = uint64((m * ho + i) * wo + j) * kd
                x0 = j * sw - pl
                inside = x0 >= 0 and x0 + kw <= w
                for u in range(kh):
                    yy = i * sh + u - pt
                    dst = r0 + uint64(u) * run
                    if yy < 0 or yy >= h:
                        for t in range(run):
                            cf[dst + t] = zero
                    elif inside:
                        src = uint64(m * img + (yy * w + x0) * c)
                        for t in range(run):
                            cf[dst + t] = xf[src + t]
                    else:
                        for v in range(kw):
                            xx = x0 + v
                            d = dst + uint64(v) * cu
                            if xx < 0 or xx >= w:
                                for t in range(cu):
                                    cf[d + t] = zero
                            else:
                                src = uint64(m * img + (yy * w + xx) * c)
                                for t in range(cu):
                                    cf[d + t] = xf[src + t]


@njit(cache=True, nogil=True)
def _col2im(dcols, dx, y, rep, act, h, w, c, kh, kw, sh, sw, pt, pl, ho, wo):
    """dx[r] = the adjoint of _im2col applied to r's rows of dcols, then *= act'(y[r // rep]).

    dcols (NR*Ho*Wo, KH*KW*C), dx (NR, H*W*C) NHWC; act 0 skips the derivative (y unused).
    """
    nr = dx.shape[0]
    zero = dx.dtype.type(0)
    run = uint64(kw * c)
    cu = uint64(c)
    kd = uint64(kh * kw * c)
    cf = dcols.ravel()
    for m in range(nr):
        dm = dx[m]
        dm[:] = zero
        for i in range(ho):
            for j in range(wo):
                r0 = uint64((m * ho + i) * wo + j) * kd
                x0 = j * sw - pl
                inside = x0 >= 0 and x0 + kw <= w
                for u in range(kh):
                    yy = i * sh + u - pt
                    if yy < 0 or yy >= h:
                        continue
                    src = r0 + uint64(u) * run
                    if inside:
                        dst = uint64((yy * w + x0) * c)
                        for t in range(run):
                            dm[dst + t] += cf[src + t]
                    else:
                        for v in range(kw):
                            xx = x0 + v
                            if xx >= 0 and xx < w:
                                dst = uint64((yy * w + xx) * c)
                                s = src + uint64(v) * cu
                                for t in range(cu):
                                    dm[dst + t] += cf[s + t]
        if act != 0:
            _dact(dm, y[m // rep], act)


@njit(cache=True, nogil=True, inline="always")
def _tap_cols(wo, sw, v, pl, w):
    """The output columns [j0, j1) whose input column j*sw + v - pl lies in [0, w)."""
    j0 = 0
    while j0 < wo and j0 * sw + v - pl < 0:
        j0 += 1
    j1 = wo
    while j1 > j0 and (j1 - 1) * sw + v - pl >= w:
        j1 -= 1
    return j0, j1


@njit(cache=True, nogil=True)
def _im2col_t(x, cols_t, h, w, kh, kw, sh, sw, pt, pl, ho, wo):
    """One-channel im2col, transposed: cols_t[u*KW + v, (n*Ho + i)*Wo + j] = xpad[n, i*sh + u,
    j*sw + v].

    x (N, H*W). Row (u, v) is the input shifted by the tap: runs of Wo numbers per output
    row (contiguous for stride 1) instead of C = 1 scattered scalars per tap, and the GEMM
    reads cols_t.T in place (BLAS takes the transpose), still writing NHWC rows.
    """
    n = x.shape[0]
    zero = x.dtype.type(0)
    npix = uint64(n * ho * wo)
    cf = cols_t.ravel()
    xf = x.ravel()
    su = uint64(sw)
    for u in range(kh):
        for v in range(kw):
            row = uint64(u * kw + v) * npix
            j0, j1 = _tap_cols(wo, sw, v, pl, w)
            for m in range(n):
                for i in range(ho):
                    yy = i * sh + u - pt
                    dst = row + uint64((m * ho + i) * wo)
                    if yy < 0 or yy >= h or j1 <= j0:
                        for j in range(uint64(wo)):
                            cf[dst + j] = zero
                        continue
                    for j in range(uint64(j0)):
                        cf[dst + j] = zero
                    src = uint64(m * h * w + yy * w + j0 * sw + v - pl)
                    d0 = dst + uint64(j0)
                    if sw == 1:
                        for j in range(uint64(j1 - j0)):
                            cf[d0 + j] = xf[src + j]
                    else:
                        for j in range(uint64(j1 - j0)):
                            cf[d0 + j] = xf[src + j * su]
                    for j in range(uint64(j1), uint64(wo)):
                        cf[dst + j] = zero


@njit(cache=True, nogil=True)
def _col2im_t(dcols_t, dx, y, rep, act, h, w, kh, kw, sh, sw, pt, pl, ho, wo):
    """The adjoint of _im2col_t: dx (NR, H*W) from dcols_t (KH*KW, NR*Ho*Wo), then
    *= act'(y[r // rep]) (act 0: none)."""
    nr = dx.shape[0]
    zero = dx.dtype.type(0)
    npix = uint64(nr * ho * wo)
    cf = dcols_t.ravel()
    df = dx.ravel()
    df[:] = zero
    su = uint64(sw)
    for u in range(kh):
        for v in range(kw):
            row = uint64(u * kw + v) * npix
            j0, j1 = _tap_cols(wo, sw, v, pl, w)
            if j1 <= j0:
                continue
            for m in range(nr):
                for i in range(ho):
                    yy = i * sh + u - pt
                    if yy < 0 or yy >= h:
                        continue
                    src = row + uint64((m * ho + i) * wo + j0)
                    dst = uint64(m * h * w + yy * w + j0 * sw + v - pl)
                    if sw == 1:
                        for j in range(uint64(j1 - j0)):
                            df[dst + j] += cf[src + j]
                    else:
                        for j in range(uint64(j1 - j0)):
                            df[dst + j * su] += cf[src + j]
    if act != 0:
        for m in range(nr):
            _dact(dx[m], y[m // rep], act)


@njit(cache=True, nogil=True)
def _pool_fwd(x, out, arg, h, w, c, kh, kw, sh, sw, ho, wo):
    """NHWC max pooling; arg = flat input offset of the FIRST max of each window (row-major)."""
    n = x.shape[0]
    cu = uint64(c)
    for m in range(n):
        xm = x[m]
        om = out[m]
        am = arg[m]
        for i in range(ho):
            for j in range(wo):
                o = uint64((i * wo + j) * c)
                first = uint64((i * sh * w + j * sw) * c)
                for t in range(cu):
                    om[o + t] = xm[first + t]
                    am[o + t] = first + t
                for u in range(kh):
                    for v in range(kw):
                        if u == 0 and v == 0:
                            continue
                        src = uint64(((i * sh + u) * w + j * sw + v) * c)
                        for t in range(cu):
                            val = xm[src + t]
                            if val > om[o + t]:  # strict: ties keep the first max
                                om[o + t] = val
                                am[o + t] = src + t


@njit(cache=True, nogil=True)
def _pool_bwd(g, arg, dx, rep):
    """dx[r] = scatter-add of g[r] to the window maxima arg[r // rep]."""
    nr, p = g.shape
    zero = dx.dtype.type(0)
    for m in range(nr):
        dm = dx[m]
        dm[:] = zero
        am = arg[m // rep]
        gm = g[m]
        for k in range(p):
            dm[uint64(am[k])] += gm[k]


@njit(cache=True, nogil=True)
def _loss(z, y, values, dz, cw):
    """Per-row loss value and gradient from logits z (N, K) and labels y (N,).

    cw False: softmax cross-entropy as reference.losses.cross_entropy (shift by the max, then
    log1p of the others' exp-sum), dz = softmax - onehot. cw True: the CW margin
    max_{j != y} z_j - z_y as reference.losses.margin (kappa None), dz +1 at the first best
    other class and -1 at y. K = 1 reads z as the two-class logits (0, z); dz is then the
    derivative with respect to z.
    """
    n, k = z.shape
    zero = z.dtype.type(0)
    one = z.dtype.type(1)
    for r in range(n):
        t = y[r]
        if k == 1:
            v = z[r, 0]
            if cw:
                values[r] = v if t == 0 else zero - v
                dz[r, 0] = one if t == 0 else -one
                continue
            # (0, v): the max is v only when v > 0 (argmax takes the first on a tie)
            s0 = zero if v <= zero else -v
            s1 = v if v <= zero else zero
            lse = np.log1p(np.exp(s1) if v <= zero else np.exp(s0))
            values[r] = -((s1 if t == 1 else s0) - lse)
            p1 = np.exp(s1 - lse)
            dz[r, 0] = p1 - one if t == 1 else p1
            continue
        if cw:
            best = -1
            bv = zero
            for j in range(k):
                if j != t and (best < 0 or z[r, j] > bv):
                    best = j
                    bv = z[r, j]
            values[r] = bv - z[r, t]
            for j in range(k):
                dz[r, j] = zero
            dz[r, best] = one
            dz[r, t] = -one
            continue
        top = 0
        m = z[r, 0]
        for j in range(1, k):
            if z[r, j] > m:
                m = z[r, j]
                top = j
        acc = zero
        for j in range(k):
            if j != top:
                acc += np.exp(z[r, j] - m)
        lse = np.log1p(acc)
        for j in range(k):
            dz[r, j] = np.exp((z[r, j] - m) - lse)
        values[r] = -((z[r, t] - m) - lse)
        dz[r, t] -= one


@njit(cache=True, nogil=True)
def _maxout_fwd(h, out, arg, src, k):
    """out[r, j] = max_p h[r, src[j*k + p]] (the first max wins, as the reference); arg: the
    winning offset into h's row (what _pool_bwd scatters to). src maps the caller's feature
    order to h's internal order."""
    n, m = out.shape
    for r in range(n):
        hr = h[r]
        for j in range(m):
            o = src[j * k]
            best = hr[o]
            for t in range(1, k):
                q = src[j * k + t]
                if hr[q] > best:  # strict: ties keep the first piece
                    best = hr[q]
                    o = q
            out[r, j] = best
            arg[r, j] = o


@njit(cache=True, nogil=True)
def _rbf_fwd(h, o, raw, cnorm, beta):
    """o holds h @ c.T on entry; raw <- ||h||^2 - 2 h.c + ||c||^2 and
    o <- exp(-beta * max(raw, 0)) (the clamp as reference.layers.rbf_forward)."""
    n, m = o.shape
    zero = o.dtype.type(0)
    two = o.dtype.type(2)
    for r in range(n):
        s = zero
        for t in range(h.shape[1]):
            s += h[r, t] * h[r, t]
        for j in range(m):
            v = s - two * o[r, j] + cnorm[j]
            raw[r, j] = v
            o[r, j] = np.exp(-beta[j] * (v if v > zero else zero))


@njit(cache=True, nogil=True)
def _rbf_e(g, out, raw, beta, rep, esum):
    """g (NR, M) <- e = dL/d(d2) = -beta * g * out[r // rep] (0 where the distance was
    clamped); esum[r] = sum_j e[r, j]."""
    nr, m = g.shape
    zero = g.dtype.type(0)
    for r in range(nr):
        i = r // rep
        s = zero
        for j in range(m):
            v = -beta[j] * g[r, j] * out[i, j] if raw[i, j] > zero else zero
            g[r, j] = v
            s += v
        esum[r] = s


@njit(cache=True, nogil=True)
def _rbf_dx(gx, x, esum, rep):
    """gx (NR, D) holds e @ c on entry; gx <- 2 (esum[r] x[r // rep] - gx)."""
    nr, d = gx.shape
    two = gx.dtype.type(2)
    for r in range(nr):
        xr = x[r // rep]
        er = esum[r]
        for t in range(d):
            gx[r, t] = two * (er * xr[t] - gx[r, t])


# ----------------------------------------------------------------------------- plan


class _Stage:
    """One fused step: dense/conv (+ activation), maxpool, or a standalone activation.

    first..last: the model layers it covers (last = first + 1 when an activation is fused);
    in_dim/out_dim: per-image sizes; act: activation code (0 none).
    """

    def __init__(self, kind, first, in_dim, out_dim):
        self.kind, self.first, self.last = kind, first, first
        self.in_dim, self.out_dim, self.act = in_dim, out_dim, 0


class _Plan:
    """The stages of a prepared net for one dtype, plus per-thread buffers."""

    def __init__(self, net):
        self.dtype = net.dtype
        layers, shapes = net.layers, net.shapes
        self.num_logits = int(net.num_logits)
        # rep[i]: (C, H, W) when layer i's input is held internally in (H, W, C) order while
        # the caller's order is (C, H, W); None when both orders coincide.
        rep = [None] * (len(layers) + 1)
        cur = None
        s0 = shapes[0]
        if len(s0) == 3 and s0[0] > 1:
            for layer in layers:
                if layer.type in ("conv2d", "maxpool2d"):
                    cur = tuple(s0)
                    break
                if layer.type in ("flatten", "dense"):
                    break
        stages = []
        for i, layer in enumerate(layers):
            rep[i] = cur
            kind = layer.type
            p = net.params[i]
            din, dout = int(np.prod(shapes[i])), int(np.prod(shapes[i + 1]))
            if kind in _ACT:
                prev = stages[-1] if stages else None
                if prev is not None and prev.kind in ("dense", "conv") and prev.act == 0 \
                        and prev.last == i - 1:
                    prev.act, prev.last = _ACT[kind], i
                else:
                    st = _Stage("act", i, din, dout)
                    st.act = _ACT[kind]
                    stages.append(st)
            elif kind == "dense":
                st = _Stage("dense", i, din, dout)
                w = p["w"]
                if cur is not None:  # rows arrive in (H, W, C) order
                    c, h, ww = cur
                    w = w.reshape(c, h, ww, -1).transpose(1, 2, 0, 3).reshape(din, dout)
                st.perm = cur
                st.w = np.ascontiguousarray(w)
                st.wt = st.w.T  # BLAS reads the transpose in place
                st.b = p["b"]
                st.btile = _tile_bias(st.b)
                stages.append(st)
                cur = None
            elif kind == "conv2d":
                st = _Stage("conv", i, din, dout)
                c, h, ww = shapes[i]
                f, _, kh, kw = p["w"].shape
                ho, wo = shapes[i + 1][1:]
                t, _b, l, _r = net.pads[i]
                st.geom = (h, ww, c, kh, kw, layer.stride[0], layer.stride[1], t, l, ho, wo)
                st.f, st.kd, st.pix = f, kh * kw * c, ho * wo
                # One input channel: im2col row by row would copy single numbers; the
                # transposed im2col copies whole shifted rows instead (see _im2col_t).
                st.tpath = c == 1
                st.geom_t = (h, ww, kh, kw, layer.stride[0], layer.stride[1], t, l, ho, wo)
                st.wmat = np.ascontiguousarray(p["w"].transpose(2, 3, 1, 0).reshape(-1, f))
                st.wt = np.ascontiguousarray(p["w"].transpose(0, 2, 3, 1).reshape(f, -1))
                st.b = p["b"]
                st.btile = _tile_bias(st.b)
                st.wshape = (f, kh, kw, c)
                stages.append(st)
                cur = (f, ho, wo) if f > 1 else None
            elif kind == "maxpool2d":
                st = _Stage("pool", i, din, dout)
                c, h, ww = shapes[i]
                ho, wo = shapes[i + 1][1:]
                (kh, kw), (sh, sw) = layer.kernel, layer.stride
                st.geom = (h, ww, c, kh, kw, sh, sw, ho, wo)
                stages.append(st)
                cur = (c, ho, wo) if c > 1 else None
            elif kind == "flatten":
                if cur is not None and cur[1] * cur[2] == 1:
                    cur = None
            elif kind in ("maxout", "rbf"):
                # perm[q]: the caller's index of internal feature q (rows may arrive in
                # (H, W, C) order after a flatten of a multi-channel image)
                perm = None if cur is None else \
                    np.arange(din).reshape(cur).transpose(1, 2, 0).ravel()
                st = _Stage(kind, i, din, dout)
                st.perm = perm
                if kind == "maxout":
                    st.k = layer.pieces
                    st.src = np.arange(din) if perm is None else np.argsort(perm)
                else:
                    st.c = np.ascontiguousarray(p["c"] if perm is None else p["c"][:, perm])
                    st.ct = st.c.T  # BLAS reads the transpose in place
                    st.cnorm = np.sum(st.c * st.c, axis=1)
                    st.beta = np.exp(p["log_beta"])
                stages.append(st)
                cur = None
            else:
                raise AdvkernError(f"numba_cpu: unsupported layer type {kind!r}")
        rep[len(layers)] = cur
        self.rep, self.stages = rep, stages
        # entry[i] = (stage index, mid): running from layer i starts at stage index, or,
        # when layer i is an activation fused into the stage before, with that activation.
        entry = {}
        for si, st in enumerate(stages):
            entry[st.first] = (si, False)
            if st.last != st.first:
                entry[st.last] = (si + 1, True)
        self.entry = entry
        # Per-image numbers held by one forward (+ backward with `rep` seeds) pass.
        fwd = int(np.prod(shapes[0]))
        bwd = fwd
        for st in stages:
            fwd += st.out_dim + (st.pix * st.kd if st.kind == "conv" else 0)
            fwd += st.out_dim if st.kind in ("pool", "maxout", "rbf") else 0
            bwd += st.in_dim + (st.pix * st.kd if st.kind == "conv" else 0)
        self.fwd_floats, self.bwd_floats = fwd, bwd
        # forward FLOPs per image from each stage on (GEMM work, plus 1 per output elsewhere)
        for st in stages:
            st.flops = (2 * st.in_dim * st.out_dim if st.kind in ("dense", "rbf") else
                        2 * st.out_dim * st.kd if st.kind == "conv" else st.out_dim)
        self.flops = self.flops_from(0)
        self._tls = threading.local()

    def flops_from(self, s0):
        return sum(st.flops for st in self.stages[s0:])

    def chunk(self, n, rep=1, backward=True):
        """Images per chunk for a batch of n (rep backward rows per image)."""
        per = (self.fwd_floats + (self.bwd_floats * rep if backward else 0)) * self.dtype.itemsize
        return max(1, min(n, max(_MIN_CHUNK // rep, _CHUNK_BYTES // max(per, 1))))

    def buf(self, key, rows, cols, dtype=None):
        """A cached C-contiguous (rows, cols) scratch array (per thread; grown on demand)."""
        bufs = getattr(self._tls, "bufs", None)
        if bufs is None:
            bufs = self._tls.bufs = {}
        dtype = self.dtype if dtype is None else dtype
        size = rows * cols
        a = bufs.get(key)
        if a is None or a.size < size:
            a = bufs[key] = np.empty(max(size, 1), dtype)
        return a[:size].reshape(rows, cols)


def _tile_bias(b):
    """b repeated so a block of whole rows has >= 64 numbers (see _bias_act)."""
    return np.ascontiguousarray(np.tile(b, -(-64 // b.shape[0])))


def _plan(net, dtype=None):
    """The kernel plan of a prepared net for dtype, built once and kept on the net.

    A Net is a read-only snapshot of the model (prepare again after changing weights). A
    bare Sequential is prepared on the fly, and nothing is cached on it.
    """
    dtype = net.dtype if dtype is None else np.dtype(dtype)
    if not isinstance(net, Net):
        return _Plan(Net(net, dtype))
    plans = net.__dict__.setdefault("_numba_plans", {})
    p = plans.get(dtype)
    if p is None:
        src = net if dtype == net.dtype else Net(net.model, dtype)
        p = plans[dtype] = _Plan(src)
    return p


def _width(a):
    """Numbers per image of a batch (N, ...) (reshape(n, -1) fails for N = 0)."""
    return int(np.prod(a.shape[1:]))


def _to_internal(rep, a):
    """(n, C*H*W) caller order -> (n, H*W*C) internal order (a copy), or a 2-D view."""
    n = a.shape[0]
    if rep is None:
        return a.reshape(n, _width(a))
    c, h, w = rep
    return np.ascontiguousarray(a.reshape(n, c, h, w).transpose(0, 2, 3, 1)).reshape(n, c * h * w)


def _to_natural(rep, a, out):
    """Write internal (n, H*W*C) rows into out (n, ...) in caller (C, H, W) order."""
    n = a.shape[0]
    if rep is None:
        out.reshape(n, _width(out))[...] = a
    else:
        c, h, w = rep
        out.reshape(n, c, h, w)[...] = a.reshape(n, h, w, c).transpose(0, 3, 1, 2)


# ----------------------------------------------------------------------------- passes


def _forward(plan, h, s0=0, mid=False, out=None):
    """Run stages s0.. on internal rows h (n, in_dim). Returns (outs, aux).

    outs[si]: stage si's output (post-activation); aux[si]: a conv's im2col matrix or a
    pool's argmax offsets. mid: apply stage s0 - 1's fused activation to h first. out: where
    the last stage's output may be written (n, K) instead of a scratch buffer.
    """
    stages = plan.stages
    n = h.shape[0]
    outs, aux = [None] * len(stages), [None] * len(stages)
    if mid:
        st = stages[s0 - 1]
        o = plan.buf(("a", s0 - 1), n, st.out_dim)
        o[...] = h
        _act_inplace(o.reshape(-1), st.act)
        h = o
    last = len(stages) - 1
    for si in range(s0, len(stages)):
        st = stages[si]
        if st.kind == "dense":
            o = out if (si == last and out is not None) else plan.buf(("o", si), n, st.out_dim)
            np.dot(h, st.w, out=o)
            _bias_act(o.reshape(-1), st.btile, st.act)
        elif st.kind == "conv" and st.tpath:
            cols_t = plan.buf(("c", si), st.kd, n * st.pix)
            _im2col_t(h, cols_t, *st.geom_t)
            o = plan.buf(("o", si), n, st.out_dim)
            np.dot(cols_t.T, st.wmat, out=o.reshape(n * st.pix, st.f))
            _bias_act(o.reshape(-1), st.btile, st.act)
            aux[si] = cols_t
        elif st.kind == "conv":
            cols = plan.buf(("c", si), n * st.pix, st.kd)
            _im2col(h, cols, *st.geom)
            o = plan.buf(("o", si), n, st.out_dim)
            o2 = o.reshape(n * st.pix, st.f)
            np.dot(cols, st.wmat, out=o2)
            _bias_act(o.reshape(-1), st.btile, st.act)
            aux[si] = cols
        elif st.kind == "pool":
            o = plan.buf(("o", si), n, st.out_dim)
            arg = plan.buf(("p", si), n, st.out_dim, np.int32)
            _pool_fwd(h, o, arg, *st.geom)
            aux[si] = arg
        elif st.kind == "maxout":
            o = plan.buf(("o", si), n, st.out_dim)
            arg = plan.buf(("p", si), n, st.out_dim, np.int32)
            _maxout_fwd(h, o, arg, st.src, st.k)
            aux[si] = arg
        elif st.kind == "rbf":
            o = out if (si == last and out is not None) else plan.buf(("o", si), n, st.out_dim)
            np.dot(h, st.ct, out=o)
            raw = plan.buf(("p", si), n, st.out_dim)
            _rbf_fwd(h, o, raw, st.cnorm, st.beta)
            aux[si] = raw
        else:
            o = plan.buf(("o", si), n, st.out_dim)
            o[...] = h
            _act_inplace(o.reshape(-1), st.act)
        outs[si] = o
        h = o
    return outs, aux


def _backward(plan, g, x, outs, aux, rep=1, need_dx=True, grads=None, seeded=False,
              dx_out=None):
    """Backward from g (n*rep, K) (gradient w.r.t. the logits, internal order; clobbered).

    x: the chunk's internal input rows (n, D); outs/aux: from _forward. Row r of the
    backward batch reads image r // rep's activations. grads: a list of per-stage
    accumulators (dw, db) added to (rep must be 1). seeded: g is the one-hot seed block
    (rep = K), so a final dense stage's input gradient is a tiled copy of w.T.
    dx_out: (n*rep, D) destination of the input gradient (internal order), or None.
    Returns the input gradient rows (n*rep, D) or None when need_dx is False.
    """
    stages = plan.stages
    nr = g.shape[0]
    applied = False
    for si in range(len(stages) - 1, -1, -1):
        st = stages[si]
        if st.act and not applied and not (seeded and si == len(stages) - 1):
            _act_bwd(g, outs[si], rep, st.act)
        applied = False
        xin = outs[si - 1] if si else x
        if st.kind == "rbf":
            esum = plan.buf(("e", si), nr, 1).reshape(nr)
            _rbf_e(g, outs[si], aux[si], st.beta, rep, esum)  # g becomes dL/d(d2)
        if grads is not None and st.kind in ("dense", "conv", "rbf"):
            _param_grad(plan, si, g, xin, aux[si], grads[si])
        if si == 0 and not need_dx:
            break
        dst = dx_out if si == 0 and dx_out is not None else None
        prev = stages[si - 1] if si else None
        if st.kind == "dense":
            gx = dst if dst is not None else plan.buf(("g", si), nr, st.in_dim)
            if seeded and si == len(stages) - 1:
                # one-hot seeds times w.T: row k of image n is row k of w.T (no GEMM)
                k = st.out_dim
                gx.reshape(nr // k, k, st.in_dim)[...] = st.wt
            else:
                np.dot(g, st.wt, out=gx)
        elif st.kind == "conv":
            gx = dst if dst is not None else plan.buf(("g", si), nr, st.in_dim)
            # the activation before this conv is differentiated inside the scatter
            act = prev.act if prev is not None else 0
            y = outs[si - 1] if act else gx
            if st.tpath:
                dcols_t = plan.buf(("d", si), st.kd, nr * st.pix)
                np.dot(st.wmat, g.reshape(nr * st.pix, st.f).T, out=dcols_t)
                _col2im_t(dcols_t, gx, y, rep, act, *st.geom_t)
            else:
                dcols = plan.buf(("d", si), nr * st.pix, st.kd)
                np.dot(g.reshape(nr * st.pix, st.f), st.wt, out=dcols)
                _col2im(dcols, gx, y, rep, act, *st.geom)
            applied = act != 0
        elif st.kind in ("pool", "maxout"):
            gx = dst if dst is not None else plan.buf(("g", si), nr, st.in_dim)
            _pool_bwd(g, aux[si], gx, rep)
        elif st.kind == "rbf":
            gx = dst if dst is not None else plan.buf(("g", si), nr, st.in_dim)
            np.dot(g, st.c, out=gx)
            _rbf_dx(gx, xin, esum, rep)
        else:
            gx = g
            if dst is not None:
                dst[...] = g
                gx = dst
        g = gx
    if need_dx and dx_out is not None and g is not dx_out:
        dx_out[...] = g  # no stage wrote it (a model without dense/conv/pool stages)
        g = dx_out
    return g if need_dx else None


def _param_grad(plan, si, g, xin, cols, acc):
    """Accumulate a dense/conv stage's (dw, db) from its pre-activation gradient g."""
    st = plan.stages[si]
    if st.kind == "dense":
        acc[0] += xin.T @ g
        acc[1] += g.sum(axis=0)
        return
    if st.kind == "rbf":  # g is e = dL/d(d2); cols is the unclamped squared distance
        acc[0] += 2 * (g.sum(axis=0)[:, None] * st.c - g.T @ xin)
        acc[1] += np.sum(g * np.maximum(cols, 0), axis=0)
        return
    if st.tpath:
        cols = cols.T
    g2 = g.reshape(-1, st.f)
    acc[0] += g2.T @ cols
    acc[1] += g2.sum(axis=0)


# ----------------------------------------------------------------------------- checks


def _batch(plan, net, x):
    x = np.asarray(x)
    want = tuple(net.input_shape)
    if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
        raise ShapeError(f"x must have shape (N, {', '.join(map(str, want))}), got {x.shape}")
    if x.dtype.kind != "f":
        raise AdvkernError(f"x must be a float32 or float64 array, got dtype {x.dtype}")
    return x


def _labels(labels, n, k):
    y = np.asarray(labels)
    if y.shape != (n,) or (y.size and y.dtype.kind not in "iu"):
        raise ShapeError(f"labels must be an integer array of shape ({n},), got "
                         f"{y.dtype} {y.shape}")
    y = np.ascontiguousarray(y, dtype=np.int64)
    classes = max(k, 2)
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise AdvkernError(f"labels must be in [0, {classes}), got values in "
                           f"[{y.min()}, {y.max()}]")
    return y


def _loss_kind(loss):
    """True for 'cw', False for 'ce' (the flag of _loss)."""
    if loss in ("ce", "cw"):
        return loss == "cw"
    raise AdvkernError(f"unknown loss {loss!r}: use one of ['ce', 'cw']")


def _setup(net, x):
    """The plan for x's dtype and x as contiguous rows (n, D) in caller order."""
    x = np.asarray(x)
    dtype = x.dtype if x.dtype in (np.float32, np.float64) else net.dtype
    plan = _plan(net, dtype)
    x = _batch(plan, net, x)
    return plan, np.ascontiguousarray(x, dtype=plan.dtype).reshape(len(x), _width(x))


# ----------------------------------------------------------------------------- threads
#
# A batch is split into contiguous parts that worker threads run chunk by chunk, each with a
# single-threaded BLAS (set through threadpoolctl for the duration of the call). Compared
# with one thread driving a multi-threaded BLAS this also parallelises the njit passes, and
# there is one fork/join per call instead of one per GEMM, which keeps it fast when the
# machine is shared (a BLAS fork/join waits for its slowest thread, every GEMM; measured
# under load, 2-thread BLAS made an mlp step 6x slower than 1-thread). Small calls run in
# the calling thread, with BLAS single-threaded too. Without threadpoolctl (or with one
# core) everything runs in the calling thread and BLAS threads itself.

_MAX_WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
    else (os.cpu_count() or 1)
# Each worker gets at least this many GEMM FLOPs (~0.1 ms; a hand-off costs ~0.03 ms).
_PAR_MIN_FLOPS = 1e7
_pool = None
_blas = None


def _blas_controller():
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController
            ctl = ThreadpoolController()
            _blas = ctl if ctl.select(user_api="blas").lib_controllers else False
        except Exception:  # noqa: BLE001 - not installed, or it cannot read this process
            _blas = False
    return _blas


def _drive(n, step, flops, fn, make_ctx=None):
    """Run fn(a, b, ctx) over consecutive chunks [a, b) of [0, n) of about step images.

    Each thread's part is cut into equal chunks, as many as its length over step rounds to
    (so a chunk has at most 1.5 step images): no short tail chunk (a 36-image tail after
    464 images made the mlp's 1000-image loss_grad 4% slower, 4.56 -> 4.38 ms).
    Returns the per-thread contexts (make_ctx() each; None without make_ctx). Outputs must
    go to disjoint slices; scratch buffers are per thread (see _Plan.buf).
    """
    global _pool
    workers = max(1, int(min(_MAX_WORKERS, n, flops // max(_PAR_MIN_FLOPS, 1))))
    ctl = _blas_controller() if _MAX_WORKERS > 1 else False

    def run(lo, hi, ctx):
        parts = max(1, round((hi - lo) / step))
        for t in range(parts if hi > lo else 0):
            fn(lo + (hi - lo) * t // parts, lo + (hi - lo) * (t + 1) // parts, ctx)
        return ctx

    if not ctl:
        return [run(0, n, make_ctx() if make_ctx else None)]
    if workers == 1:  # a small call: one thread, and a single-threaded BLAS all the same
        _single_blas(ctl, +1)
        try:
            return [run(0, n, make_ctx() if make_ctx else None)]
        finally:
            _single_blas(ctl, -1)
    if _pool is None or _pool[1] != os.getpid():  # (a forked child has no worker threads)
        _pool = (ThreadPoolExecutor(max_workers=max(1, _MAX_WORKERS - 1),
                                    thread_name_prefix="advkern-numba"), os.getpid())
    bounds = [n * t // workers for t in range(workers + 1)]
    step = min(step, bounds[1])
    ctxs = [make_ctx() if make_ctx else None for _ in range(workers)]
    _single_blas(ctl, +1)
    try:
        futs = [_pool[0].submit(run, bounds[t], bounds[t + 1], ctxs[t])
                for t in range(1, workers)]
        try:
            run(bounds[0], bounds[1], ctxs[0])
        finally:
            for f in futs:
                f.result()
    finally:
        _single_blas(ctl, -1)
    return ctxs


_limit_lock = threading.Lock()
_limit = [0, None]  # depth, the threadpoolctl limiter of the outermost call


def _single_blas(ctl, delta):
    """Enter (+1) or leave (-1) single-threaded BLAS; counted, so concurrent calls nest."""
    with _limit_lock:
        if delta > 0:
            if _limit[0] == 0:
                _limit[1] = ctl.limit(limits=1, user_api="blas")
            _limit[0] += 1
        else:
            _limit[0] -= 1
            if _limit[0] == 0:
                _limit[1].restore_original_limits()
                _limit[1] = None


# ----------------------------------------------------------------------------- primitives


def to_device(a, dtype=None):
    """A C-contiguous copy of a (cast to dtype); the caller's array is never modified."""
    return np.array(a, dtype=dtype, copy=True, order="C")


def to_host(a):
    """Host arrays are device arrays here: returned as they are."""
    return np.asarray(a)


def prepare(model, dtype):
    """The model as a :class:`Net` in dtype, with its kernel plan (layouts, fused stages)."""
    net = Net(model, dtype)
    _plan(net)
    return net


def logits(net, x):
    """x (N, *S) -> logits (N, K) in x's dtype (chunked forward passes)."""
    plan, rows = _setup(net, x)
    n, k = rows.shape[0], plan.num_logits
    z = np.empty((n, k), plan.dtype)

    def work(a, b, _):
        _run_logits(plan, _to_internal(plan.rep[0], rows[a:b]), 0, False, z[a:b])

    _drive(n, plan.chunk(n, backward=False), n * plan.flops, work)
    return z


def _run_logits(plan, h, s0, mid, zout):
    """Forward stages s0.. on internal rows h; logits written into zout (n, K) in caller order.

    Returns (outs, aux) as _forward (the last stage's output may be zout itself).
    """
    if s0 >= len(plan.stages) and not mid:
        _to_natural(plan.rep[-1], h, zout)
        return [None] * len(plan.stages), [None] * len(plan.stages)
    last = plan.stages[-1]
    direct = last.kind == "dense" and plan.rep[-1] is None
    outs, aux = _forward(plan, h, s0, mid, zout if direct else None)
    if not direct:
        _to_natural(plan.rep[-1], outs[-1], zout)
    return outs, aux


def forward_from(net, start, h):
    """Logits (N, K) of layers start.. applied to h (N, *shapes[start]), layer start's input.

    forward_from(net, 0, x) == logits(net, x); used to finish a pass whose first layers were
    computed incrementally. h is not modified; only the returned logits are allocated (the
    intermediate activations live in buffers cached on the net, per thread).
    """
    h = np.asarray(h)
    dtype = h.dtype if h.dtype in (np.float32, np.float64) else net.dtype
    plan = _plan(net, dtype)
    nl = len(net.layers)
    if isinstance(start, (bool, np.bool_)) or not isinstance(start, (int, np.integer)) \
            or not 0 <= start <= nl:
        raise AdvkernError(f"start must be a layer index in [0, {nl}], got {start!r}")
    start = int(start)
    want = tuple(net.shapes[start])
    if h.ndim != len(want) + 1 or tuple(h.shape[1:]) != want:
        raise ShapeError(f"h must have shape (N, {', '.join(map(str, want))}) (the input of "
                         f"layer {start}), got {h.shape}")
    n = h.shape[0]
    rows = np.ascontiguousarray(h, dtype=plan.dtype).reshape(n, _width(h))
    z = np.empty((n, plan.num_logits), plan.dtype)
    # Layers without a stage of their own (flatten) run as the next stage's start.
    i = start
    while i < nl and i not in plan.entry:
        i += 1
    s0, mid = plan.entry.get(i, (len(plan.stages), False))
    rep = plan.rep[start]

    def work(a, b, _):
        _run_logits(plan, _to_internal(rep, rows[a:b]), s0, mid, z[a:b])

    _drive(n, plan.chunk(n, backward=False), n * plan.flops_from(s0), work)
    return z


def loss_grad(net, x, labels, loss):
    """Per-image losses (N,), d(sum of losses)/dx (N, *S) and the logits (N, K).

    loss 'ce' (softmax cross-entropy by log-sum-exp) or 'cw' (margin). x is not modified.
    """
    cw = _loss_kind(loss)
    plan, rows = _setup(net, x)
    n, k = rows.shape[0], plan.num_logits
    y = _labels(labels, n, k)
    z = np.empty((n, k), plan.dtype)
    values = np.empty(n, plan.dtype)
    dx = np.empty(rows.shape, plan.dtype)

    def work(a, b, _):
        _loss_grad_rows(plan, rows, y, cw, z, values, a, b, dx[a:b])

    _drive(n, plan.chunk(n), 2 * n * plan.flops, work)
    return values, dx.reshape(np.shape(x)), z


def _loss_grad_rows(plan, rows, y, cw, z, values, a, b, dst):
    """Images a..b of rows (n, D): the logits into z[a:b], the losses into values[a:b] and
    d(sum of losses)/dx into dst (b - a, D), in caller (NCHW) order."""
    rep0 = plan.rep[0]
    h = _to_internal(rep0, rows[a:b])
    outs, aux = _run_logits(plan, h, 0, False, z[a:b])
    g = plan.buf("dz", b - a, plan.num_logits)
    _loss(z[a:b], y[a:b], values[a:b], g, cw)
    gi = _grad_internal(plan, g)
    if rep0 is None:
        _backward(plan, gi, h, outs, aux, dx_out=dst)
    else:
        _to_natural(rep0, _backward(plan, gi, h, outs, aux), dst)


def pgd_linf_step(net, xa, labels, loss, flip, x0, eps, alpha, lo, hi, active):
    """The contract's ``pgd_step`` for norm 'linf', fused: each chunk's input gradient goes
    to a per-thread scratch block and is stepped (``steps.linf_rows``) while it is in cache,
    so no (N, D) gradient is allocated, written out and read back (measured: 40 steps on the
    mlp, 1000 images, 219 -> 196 ms). Equals loss_grad then linf_step bit for bit.
    """
    cw = _loss_kind(loss)
    plan, rows = _setup(net, xa)
    xa2, _, x02, e, a_, lo_, hi_, act = step_args(xa, None, x0, eps, alpha, lo, hi, active)
    n, d, k = rows.shape[0], rows.shape[1], plan.num_logits
    y = _labels(labels, n, k)
    z = np.empty((n, k), plan.dtype)
    values = np.empty(n, plan.dtype)
    out = np.empty(rows.shape, plan.dtype)
    bad = np.zeros((n, 3), dtype=np.int64)

    def work(a, b, _):
        g = plan.buf("dx", b - a, d)
        _loss_grad_rows(plan, rows, y, cw, z, values, a, b, g)
        linf_rows(xa2[a:b], g, x02[a:b], e[a:b], a_[a:b], lo_, hi_, act[a:b], flip, out[a:b],
                  bad[a:b])

    _drive(n, plan.chunk(n), 2 * n * plan.flops, work)
    raise_nonfinite(bad)
    return out.reshape(np.shape(xa))


def _grad_internal(plan, g):
    """The logit gradient in the internal order of the last stage's output."""
    rep = plan.rep[-1]
    if rep is None:
        return g
    return _to_internal(rep, g)


def jacobian(net, x, seeds=None):
    """J (N, R, D) with J[n, r] = seeds[n, r] . d z(x_n) / d x_n, and the logits (N, K).

    seeds None: the K one-hot rows (R = K, the full Jacobian). One forward per image, one
    backward on N*R rows.
    """
    plan, rows = _setup(net, x)
    n, d = rows.shape
    k = plan.num_logits
    z = np.empty((n, k), plan.dtype)
    rep0 = plan.rep[0]
    last = plan.stages[-1] if plan.stages else None
    if seeds is None:
        r = k
        seeded = last is not None and last.kind == "dense" and last.act == 0 \
            and plan.rep[-1] is None
    else:
        seeds = np.asarray(seeds, dtype=plan.dtype)
        if seeds.ndim != 3 or seeds.shape[0] != n or seeds.shape[2] != k:
            raise AdvkernError(f"seeds must be (N, R, K) = ({n}, R, {k}), got {seeds.shape}")
        r, seeded = seeds.shape[1], False
    jac = np.empty((n, r, d), plan.dtype)
    eye = np.eye(k, dtype=plan.dtype)

    def work(a, b, _):
        m = b - a
        h = _to_internal(rep0, rows[a:b])
        outs, aux = _run_logits(plan, h, 0, False, z[a:b])
        g = plan.buf("seed", m * r, k)
        g.reshape(m, r, k)[...] = eye if seeds is None else seeds[a:b]
        gi = g if seeded else _grad_internal(plan, g)
        dst = jac[a:b].reshape(m * r, d)
        if rep0 is None:
            _backward(plan, gi, h, outs, aux, rep=r, seeded=seeded, dx_out=dst)
        else:
            _to_natural(rep0, _backward(plan, gi, h, outs, aux, rep=r, seeded=seeded), dst)

    _drive(n, plan.chunk(n, rep=r), (1 + r) * n * plan.flops, work)
    return jac, z


def param_grads(net, x, labels, loss):
    """Mean loss over the batch (float) and its parameter gradients (list of per-layer dicts).

    Equals reference.network.loss_and_param_grads: the gradient of the MEAN loss.
    """
    cw = _loss_kind(loss)
    plan, rows = _setup(net, x)
    n, k = rows.shape[0], plan.num_logits
    y = _labels(labels, n, k)
    z = np.empty((n, k), plan.dtype)
    values = np.empty(n, plan.dtype)
    stages = plan.stages
    rep0 = plan.rep[0]

    def accumulators():
        acc = []
        for st in stages:
            if st.kind == "dense":
                acc.append([np.zeros((st.in_dim, st.out_dim), plan.dtype),
                            np.zeros(st.out_dim, plan.dtype)])
            elif st.kind == "conv":
                acc.append([np.zeros((st.f, st.kd), plan.dtype), np.zeros(st.f, plan.dtype)])
            elif st.kind == "rbf":
                acc.append([np.zeros((st.out_dim, st.in_dim), plan.dtype),
                            np.zeros(st.out_dim, plan.dtype)])
            else:
                acc.append(None)
        return acc

    def work(a, b, acc):
        h = _to_internal(rep0, rows[a:b])
        outs, aux = _run_logits(plan, h, 0, False, z[a:b])
        g = plan.buf("dz", b - a, k)
        _loss(z[a:b], y[a:b], values[a:b], g, cw)
        g /= n  # the reference divides the gradient of the sum by N before the backward
        _backward(plan, _grad_internal(plan, g), h, outs, aux, need_dx=False, grads=acc)

    parts = _drive(n, plan.chunk(n), 3 * n * plan.flops, work, accumulators)
    acc = parts[0]
    for other in parts[1:]:
        for mine, theirs in zip(acc, other):
            if mine is not None:
                mine[0] += theirs[0]
                mine[1] += theirs[1]
    grads = [{} for _ in net.layers]
    for st, g in zip(stages, acc):
        if st.kind == "dense":
            dw = g[0]
            if st.perm is not None:
                c, hh, ww = st.perm
                dw = dw.reshape(hh, ww, c, -1).transpose(2, 0, 1, 3).reshape(st.in_dim, -1)
            grads[st.first] = {"w": np.ascontiguousarray(dw), "b": g[1]}
        elif st.kind == "conv":
            dw = g[0].reshape(st.wshape).transpose(0, 3, 1, 2)
            grads[st.first] = {"w": np.ascontiguousarray(dw), "b": g[1]}
        elif st.kind == "rbf":
            dc = g[0]
            if st.perm is not None:
                dc = np.empty_like(g[0])
                dc[:, st.perm] = g[0]
            grads[st.first] = {"c": dc, "log_beta": g[1]}
    mean = float(values.mean()) if n else float("nan")
    return mean, grads
