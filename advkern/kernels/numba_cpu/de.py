"""Differential-evolution primitives of the ``numba_cpu`` backend: ``de_step`` and ``de_score``.

``de_step`` is DE/rand/1 (+ optional binomial crossover, + clipping) fused into one njit pass,
bit-for-bit equal to ``reference.pixel.de_step`` (same operations in the same order and
dtype; no fastmath).

``de_score`` scores the N*P candidates of a generation INCREMENTALLY. A k-pixel candidate
changes at most k input pixels, so most of the network's early activations equal the clean
image's. Three exact paths (exact in real arithmetic; in floating point they differ from full
scoring by rounding only, see the tests):

* chain (networks starting with ``[Conv2D [act]]* Flatten Dense``, act in relu/tanh/sigmoid;
  the bundled ``mlp`` and ``cnn``). Deltas are pushed through the conv layers as SPARSE sets
  of changed positions. Conv layer l: the outputs whose window holds a changed input are
  listed, and each gets pre-activation delta sum_{u, v, c} w[:, c, u, v] d_in[c] over the
  changed inputs (p, q) = (i sh + u - pt, j sw + v - pl) of its window and their non-zero
  channels (rows of w, contiguous over the filters: SIMD); the activation is applied to
  clean + delta there, and positions whose post-activation delta is exactly zero (ReLU off
  before and after) drop out, which keeps the set small. The dense layer after Flatten is
  folded the same way: h = h_clean + sum_{changed feature f} delta_f W[f, :] (a rank-k update
  for the mlp: 256 k MACs). The remaining layers run batched on the (N*P, units) rows
  (``forward_from``: large GEMMs). A one-pixel candidate of the cnn costs ~2e4 MACs
  (conv 16 -> 32 -> 64 on ~9, ~5, ~4 changed positions, then the fold into 10 logits) instead
  of the ~1.6e6 of a full forward; its cost grows with the changed region and stays below
  that of a full forward when the region covers a whole layer (no separate fallback needed).
* mlp2 (``Flatten Dense ReLU Dense ...``, an image seen in >= 2 calls). ReLU is linear where
  it does not flip, so the second dense pre-activation is
      h2' = h2 + sum_f delta_f G[f, :] + sum_{u flipped} e_u W2[u, :],
      G = W1 diag(h1 > 0) W2 (per image, D x U2),  e_u = relu(h1'_u) - relu(h1_u) - [h1_u > 0] dh_u
  (e_u = +-h1'_u on the few units whose sign flips, 0 elsewhere: a mean of 2 to 11 of 256 for
  one to five pixels on MNIST), replacing the (N*P, 256) x (256, 256) GEMM of every
  generation (65,536 MACs per candidate) by (2k + flips) rows of 256 (~2,000 MACs). A last
  ``ReLU Dense`` (the mlp's logits) is fused in too, so only (N*P, K) logits are written.
  G costs 2 D U1 U2 FLOPs per image (~0.1 GFLOP for the mlp, about two generations of the
  GEMM it replaces), so it is built only for images scored in a second call.
* full (anything else, e.g. max-pooling between convolutions, or a first layer that is not a
  conv/flatten): write the candidates into image copies and run the whole network, in chunks.

Threads: the incremental kernels are serial ``nogil`` loops over candidate rows, run on a
thread pool (one thread per core) in blocks; ``parallel=True`` would compile each kernel a
second time as a gufunc (~10 s more of CI compile time per dtype).

Clean-image activations (and G) are cached per prepared net, keyed by the image's exact
bytes (a dictionary key compares the whole content, so a cache hit is never stale), LRU with
a byte budget (``CACHE_BYTES``). The net's weights are read-only (the contract), so they are
not part of the key.
"""

import os
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from ..._validate import FLOAT_DTYPES, check_float_array, check_labels
from ...errors import AdvkernError, ShapeError
from ...reference.losses import log_softmax, predict
from ...reference.network import layer_forward
from ...reference.pixel import apply_candidates

__all__ = ["CACHE_BYTES", "de_score", "de_step"]

# Byte budget of the per-net clean-activation cache (G of the mlp is D*U2 values per image:
# 784 * 256 * 4 B = 0.8 MB in float32).
CACHE_BYTES = 512 * 2**20
# Candidate rows per batched pass: bounds the (rows, units) intermediates of forward_from.
_ROW_BYTES = 96 * 2**20

_ACTS = {"relu": 1, "tanh": 2, "sigmoid": 3}


# -- de_step ----------------------------------------------------------------------------------

@njit(cache=True)
def _de_step_kernel(pop, r1, r2, r3, f, take, use_take, lo, hi, out):
    b_n, p_n, dim = pop.shape
    for b in range(b_n):
        for i in range(p_n):
            a, s, t = r1[b, i], r2[b, i], r3[b, i]
            for j in range(dim):
                # Same expression tree as the reference: pop[r1] + f * (pop[r2] - pop[r3]).
                v = pop[b, a, j] + f * (pop[b, s, j] - pop[b, t, j])
                if use_take and not take[b, i, j]:
                    v = pop[b, i, j]
                # np.clip = min(max(v, lo), hi) with NaN propagation; on equality (+-0) numpy
                # returns the bound, so compare the same way.
                if not np.isnan(v) and not v > lo[j]:
                    v = lo[j]
                if not np.isnan(v) and not v < hi[j]:
                    v = hi[j]
                out[b, i, j] = v


def _index_draw(draws, key, shape, p):
    if key not in draws:
        raise AdvkernError(f"draws lacks {key!r}")
    r = np.asarray(draws[key])
    if r.shape != shape or r.dtype.kind not in "iu":
        raise ShapeError(f"draws[{key!r}] must be integers of shape {shape}, got "
                         f"{r.dtype} {r.shape}")
    if r.size and (r.min() < 0 or r.max() >= p):
        raise AdvkernError(f"draws[{key!r}] must lie in [0, {p}), got [{r.min()}, {r.max()}]")
    return np.ascontiguousarray(r, dtype=np.int64)


def de_step(pop, draws, F, CR, lower, upper):
    """One DE/rand/1 generation of children; bit-exact ``reference.pixel.de_step``.

    pop: (B, P, dim) float32/float64; draws: 'r1', 'r2', 'r3' (B, P) ints in [0, P) and, when
    CR is not None, 'cross' (B, P, dim) uniforms and 'forced' (B, P) ints; F: float (cast to
    pop's dtype); CR: None or a float; lower, upper: (dim,). Returns trial (B, P, dim):

        mutant = pop[r1] + F (pop[r2] - pop[r3]);  where(cross < CR or j == forced, mutant, pop)
        clipped to [lower, upper].
    """
    pop = np.asarray(pop)
    if pop.ndim != 3:
        raise ShapeError(f"pop must be (B, P, dim), got shape {pop.shape}")
    if pop.dtype not in FLOAT_DTYPES:
        raise AdvkernError(f"pop must be float32 or float64, got dtype {pop.dtype}")
    b, p, dim = pop.shape
    r1, r2, r3 = (_index_draw(draws, key, (b, p), p) for key in ("r1", "r2", "r3"))
    lo = np.asarray(lower)
    hi = np.asarray(upper)
    if lo.shape != (dim,) or hi.shape != (dim,):
        raise ShapeError(f"lower and upper must have shape ({dim},), got {lo.shape} "
                         f"and {hi.shape}")
    lo = np.ascontiguousarray(lo.astype(pop.dtype))
    hi = np.ascontiguousarray(hi.astype(pop.dtype))
    if CR is not None:
        if "cross" not in draws or "forced" not in draws:
            raise AdvkernError("draws needs 'cross' and 'forced' when CR is given")
        cross, forced = np.asarray(draws["cross"]), np.asarray(draws["forced"])
        if cross.shape != (b, p, dim) or forced.shape != (b, p):
            raise ShapeError(f"draws['cross'] must be {(b, p, dim)} and draws['forced'] "
                             f"{(b, p)}, got {cross.shape} and {forced.shape}")
        # The reference's own expression (numpy's promotion of cross vs CR included).
        take = np.ascontiguousarray((cross < CR) | (np.arange(dim) == forced[..., None]))
    else:
        take = np.zeros((0, 0, 0), dtype=bool)
    out = np.empty(pop.shape, dtype=pop.dtype)
    _de_step_kernel(np.ascontiguousarray(pop), r1, r2, r3, pop.dtype.type(F), take,
                    CR is not None, lo, hi, out)
    return out


# -- forward of the remaining layers ----------------------------------------------------------

_FORWARD_FROM = []


def _forward_from_impl():
    """nn.forward_from when the numba_cpu nn module provides it, else the local loop."""
    if not _FORWARD_FROM:
        try:
            from .nn import forward_from
        except ImportError:
            forward_from = _reference_forward_from
        _FORWARD_FROM.append(forward_from)
    return _FORWARD_FROM[0]


def _reference_forward_from(net, start, h):
    """Layers start.. of net on h, via ``reference.network.layer_forward``."""
    for i in range(start, len(net.layers)):
        h, _ = layer_forward(net.layers[i], net.params[i], h, net.shapes[i])
    return h


def _forward_rest(net, start, h):
    if start >= len(net.layers):
        return h
    return _forward_from_impl()(net, start, h)


# -- incremental kernels ----------------------------------------------------------------------

@njit(cache=True, nogil=True, inline="always")
def _overwritten(rows, cols, m, j, k):
    """Whether a later pixel of candidate m writes the same (row, col) as pixel j: then
    pixel j has no effect (the last write wins, as in reference.pixel.apply_candidates)."""
    for j2 in range(j + 1, k):
        if rows[m, j2] == rows[m, j] and cols[m, j2] == cols[m, j]:
            return True
    return False


@njit(cache=True, nogil=True, inline="always")
def _reach(a, k, s, n_out):
    """The outputs [i0, i1) of a window k, stride s over an input padded in front, whose
    window holds padded input coordinate a >= 0: 0 <= a - i s < k, 0 <= i < n_out."""
    i1 = min(a // s + 1, n_out)
    i0 = 0 if a < k else (a - k) // s + 1
    return i0, max(i0, i1)


@njit(cache=True, nogil=True, fastmath={"contract", "reassoc"})
def _chain_range(m0, m1, rows, cols, vals, x, p_n, meta, wconv, poff, clean, hd, wd_rows,
                 wd_dots, relu_out, zero, one, out):
    """Rows m0..m1 of out: the first dense layer's pre-activation (or its ReLU), incrementally.

    rows, cols (M, k) int64 (floored, clamped); vals (M, k, C); x (N, C, H, W) clean images;
    meta (L, 15) per conv layer: C_in, H_in, W_in, F, H_out, W_out, KH, KW, sh, sw, pad_top,
    pad_left, act (0 none, 1 relu, 2 tanh, 3 sigmoid), first row in wconv, first row in clean;
    wconv (rows, width): conv l's weight w[f, c, u, v] at row wrow_l + (u KW + v) C_in + c,
    column f; poff (L+2,): first position of stage s (stage 0 = the input, stage l+1 = conv
    l's output) in the position-indexed scratch; clean (N, R, width): conv l's clean
    pre-activation at (i, j) in row crow_l + i W_out + j; hd (N, U): the clean dense
    pre-activation; the dense weight as wd_rows (H W C, U), rows in (h, w, c) order, without
    convs, else as wd_dots (H W, U, C) of the last conv stage (the other one unused).

    A stage keeps the list of its changed positions (a position whose post-activation delta
    is zero in every channel drops out) with each one's delta row over all channels; each
    changed output is gathered from the non-zero channel deltas of the changed inputs of its
    window (ReLU zeros are common) as a sum of rows of w (contiguous over the filters: SIMD,
    no branches inside).
    """
    k = rows.shape[1]
    n_ch = x.shape[1]
    w_img = x.shape[3]
    n_conv = meta.shape[0]
    u_n = out.shape[1]
    width = wconv.shape[1]
    total = poff[n_conv + 1]
    mark = np.zeros(total, dtype=np.int64)  # 0: unchanged, -1: listed, s > 0: slot s - 1
    plist = np.empty(total, dtype=np.int64)  # changed positions of each stage
    delta = np.empty((total, width), dtype=wconv.dtype)  # per slot: its channel deltas
    crow = np.empty(wconv.shape[0], dtype=np.int64)  # contributions to one output
    cval = np.empty(wconv.shape[0], dtype=wconv.dtype)
    acc = np.empty(max(u_n, width), dtype=wconv.dtype)
    for m in range(m0, m1):
        n = m // p_n
        # Stage 0: the candidate's pixels; on a collision only the LAST write counts, and its
        # delta is against the ORIGINAL pixel.
        cnt = 0
        for j in range(k):
            r, c = rows[m, j], cols[m, j]
            if _overwritten(rows, cols, m, j, k):
                continue
            pos = r * w_img + c
            nz = 0
            for ch in range(n_ch):
                d = vals[m, j, ch] - x[n, ch, r, c]
                delta[cnt, ch] = d
                nz += d != zero
            if nz > 0:
                plist[cnt] = pos
                mark[pos] = cnt + 1
                cnt += 1
        for s in range(n_conv):
            c_in, h_in, w_in, f_n, h_out, w_out = meta[s, 0], meta[s, 1], meta[s, 2], \
                meta[s, 3], meta[s, 4], meta[s, 5]
            kh, kw, sh, sw, pt, pl = meta[s, 6], meta[s, 7], meta[s, 8], meta[s, 9], \
                meta[s, 10], meta[s, 11]
            act, wrow, crw0 = meta[s, 12], meta[s, 13], meta[s, 14]
            ip0, op0 = poff[s], poff[s + 1]
            # The outputs reached by a changed input (p, q): i sh + u - pt = p, j sw + v - pl = q
            # for some tap (u, v), i.e. a rectangle of outputs (four integer divisions per
            # input instead of two per tap: a division costs as much as the rest of the tap).
            nxt = 0
            for e in range(cnt):
                pos = plist[ip0 + e]
                pr = pos // w_in
                i0, i1 = _reach(pr + pt, kh, sh, h_out)
                j0, j1 = _reach(pos - pr * w_in + pl, kw, sw, w_out)
                for oi in range(i0, i1):
                    for oj in range(j0, j1):
                        opos = oi * w_out + oj
                        if mark[op0 + opos] == 0:
                            mark[op0 + opos] = -1
                            plist[op0 + nxt] = opos
                            nxt += 1
            # Each changed output: gather its window's non-zero input deltas, sum the weight
            # rows, apply the activation to clean + delta; keep it when the delta is non-zero.
            kept = 0
            for e in range(nxt):
                opos = plist[op0 + e]
                oi = opos // w_out
                oj = opos - oi * w_out
                nc = 0
                for u in range(kh):
                    p = oi * sh + u - pt
                    if p < 0 or p >= h_in:
                        continue
                    for v in range(kw):
                        q = oj * sw + v - pl
                        if q < 0 or q >= w_in:
                            continue
                        slot = mark[ip0 + p * w_in + q]
                        if slot <= 0:
                            continue
                        wb = wrow + (u * kw + v) * c_in
                        # Only the non-zero channel deltas (ReLU zeros are common), in
                        # channel order, appended branch-free.
                        for t in range(c_in):
                            dv = delta[ip0 + slot - 1, t]
                            crow[nc] = wb + t
                            cval[nc] = dv
                            nc += dv != zero
                for f in range(f_n):
                    acc[f] = zero
                # Eight (then four) weight rows per pass over acc: an eighth of the acc
                # loads/stores, whose store-to-load latency bounds this loop (measured: 4 -> 8
                # rows, cnn 2.79 -> 2.68 us per candidate on one thread).
                t = 0
                while t + 7 < nc:
                    d0, d1, d2, d3 = cval[t], cval[t + 1], cval[t + 2], cval[t + 3]
                    r0, r1, r2, r3 = crow[t], crow[t + 1], crow[t + 2], crow[t + 3]
                    d4, d5, d6, d7 = cval[t + 4], cval[t + 5], cval[t + 6], cval[t + 7]
                    r4, r5, r6, r7 = crow[t + 4], crow[t + 5], crow[t + 6], crow[t + 7]
                    for f in range(f_n):
                        acc[f] += ((d0 * wconv[r0, f] + d1 * wconv[r1, f]) +
                                   (d2 * wconv[r2, f] + d3 * wconv[r3, f])) + \
                            ((d4 * wconv[r4, f] + d5 * wconv[r5, f]) +
                             (d6 * wconv[r6, f] + d7 * wconv[r7, f]))
                    t += 8
                while t + 3 < nc:
                    d0, d1, d2, d3 = cval[t], cval[t + 1], cval[t + 2], cval[t + 3]
                    r0, r1, r2, r3 = crow[t], crow[t + 1], crow[t + 2], crow[t + 3]
                    for f in range(f_n):
                        acc[f] += (d0 * wconv[r0, f] + d1 * wconv[r1, f]) + \
                            (d2 * wconv[r2, f] + d3 * wconv[r3, f])
                    t += 4
                while t < nc:
                    d0, r0 = cval[t], crow[t]
                    for f in range(f_n):
                        acc[f] += d0 * wconv[r0, f]
                    t += 1
                crw = crw0 + opos
                row = op0 + kept
                nz = 0
                if act == 1:
                    for f in range(f_n):
                        a = clean[n, crw, f]
                        b = a + acc[f]
                        acc[f] = (b if b > zero else zero) - (a if a > zero else zero)
                elif act == 2:
                    for f in range(f_n):
                        a = clean[n, crw, f]
                        acc[f] = np.tanh(a + acc[f]) - np.tanh(a)
                elif act == 3:
                    for f in range(f_n):
                        a = clean[n, crw, f]
                        b = a + acc[f]
                        acc[f] = one / (one + np.exp(-b)) - one / (one + np.exp(-a))
                # The whole row is stored (a count, not a compaction: it vectorises); the
                # next stage's gather skips the zeros.
                for f in range(f_n):
                    dd = acc[f]
                    delta[row, f] = dd
                    nz += dd != zero
                if nz > 0:
                    plist[row] = opos
                    mark[op0 + opos] = kept + 1
                    kept += 1
                else:
                    mark[op0 + opos] = 0
            for e in range(cnt):
                mark[ip0 + plist[ip0 + e]] = 0
            cnt = kept
        # Dense fold: h = h_clean + sum over the changed features f of delta_f W[f, :].
        ip0 = poff[n_conv]
        for u in range(u_n):
            acc[u] = hd[n, u]
        if n_conv == 0:
            for e in range(cnt):
                base = plist[e] * n_ch
                for t in range(n_ch):
                    d = delta[e, t]
                    if d == zero:
                        continue
                    wr = base + t
                    for u in range(u_n):
                        acc[u] += d * wd_rows[wr, u]
        else:
            c_l = meta[n_conv - 1, 3]
            for e in range(cnt):
                pos = plist[ip0 + e]
                for u in range(u_n):
                    sdot = zero
                    for ch in range(c_l):
                        sdot += delta[ip0 + e, ch] * wd_dots[pos, u, ch]
                    acc[u] += sdot
        for e in range(cnt):
            mark[ip0 + plist[ip0 + e]] = 0
        if relu_out:
            for u in range(u_n):
                out[m, u] = acc[u] if acc[u] > zero else zero
        else:
            for u in range(u_n):
                out[m, u] = acc[u]


@njit(cache=True, nogil=True, fastmath={"contract", "reassoc"})
def _mlp2_range(m0, m1, rows, cols, vals, x, p_n, w1, h1, h2, g, gidx, w2, relu_out, w3t, b3,
                zero, out):
    """Flatten-Dense-ReLU-Dense candidates: the second dense pre-activation, incrementally.

    Rows m0..m1 of out. w1 (D, U1) first dense rows in (h, w, c) feature order; h1 (N, U1),
    h2 (N, U2) clean pre-activations; g[gidx[n]] (D, U2) = w1 diag(h1[n] > 0) w2; w2 (U1, U2).
    relu_out: apply the next ReLU. With w3t (K, U2), b3 (K,) non-empty (a last Dense after
    that ReLU) out (M, K) gets the logits, else out (M, U2) the activations: writing K
    instead of U2 values a candidate saves a memory pass of M U2 values there and back.
    """
    k = rows.shape[1]
    n_ch = x.shape[1]
    w_img = x.shape[3]
    u1, u2 = w2.shape
    feat = np.empty(k * n_ch, dtype=np.int64)
    dval = np.empty(k * n_ch, dtype=w2.dtype)
    dh = np.empty(u1, dtype=w2.dtype)
    acc = np.empty(u2, dtype=w2.dtype)
    n_out = w3t.shape[0]
    for m in range(m0, m1):
        n = m // p_n
        gn = gidx[n]
        nf = 0
        for j in range(k):
            r, c = rows[m, j], cols[m, j]
            if _overwritten(rows, cols, m, j, k):
                continue
            for ch in range(n_ch):
                d = vals[m, j, ch] - x[n, ch, r, c]
                if d != 0:
                    feat[nf] = (r * w_img + c) * n_ch + ch
                    dval[nf] = d
                    nf += 1
        for u in range(u1):
            dh[u] = zero
        for u in range(u2):
            acc[u] = h2[n, u]
        for e in range(nf):
            d, f = dval[e], feat[e]
            for u in range(u1):
                dh[u] += d * w1[f, u]
            for u in range(u2):
                acc[u] += d * g[gn, f, u]
        # Units whose ReLU state flips: e_u = +h1' (off -> on) or -h1' (on -> off).
        for u in range(u1):
            a = h1[n, u]
            b = a + dh[u]
            if (a > zero) != (b > zero):
                e = b if b > zero else -b
                for v in range(u2):
                    acc[v] += e * w2[u, v]
        if relu_out:
            for u in range(u2):
                acc[u] = acc[u] if acc[u] > zero else zero
        if n_out > 0:
            for j in range(n_out):
                s = zero
                for u in range(u2):
                    s += acc[u] * w3t[j, u]
                out[m, j] = s + b3[j]
        else:
            for u in range(u2):
                out[m, u] = acc[u]


# -- per-net plan and clean-activation cache --------------------------------------------------

class _Plan:
    """How de_score runs on one prepared net: mode, packed weights, the image cache."""

    def __init__(self, net):
        self.lock = threading.Lock()
        self.cache = OrderedDict()  # image bytes -> entry dict
        self.cache_bytes = 0
        self.last = None  # (keys, stacked arrays) of the last batch
        self.gpool, self.gfree = None, []  # mlp2: G of the cached images, one row each
        self.mode = "full"
        layers = net.layers
        shape = tuple(net.input_shape)
        if len(shape) != 3:
            return
        dt = np.dtype(net.dtype)
        convs, i = [], 0
        while i < len(layers) and layers[i].type == "conv2d":
            act = 0
            if i + 1 < len(layers) and layers[i + 1].type in _ACTS:
                act = _ACTS[layers[i + 1].type]
            convs.append((i, act))
            i += 2 if act else 1
        if not (i + 1 < len(layers) and layers[i].type == "flatten"
                and layers[i + 1].type == "dense"):
            return
        self.mode = "chain"
        self.dense_idx = i + 1
        self.fuse_relu = self.dense_idx + 1 < len(layers) and \
            layers[self.dense_idx + 1].type == "relu"
        self.rest = self.dense_idx + (2 if self.fuse_relu else 1)

        meta, wparts, npos = [], [], [shape[1] * shape[2]]
        wrow = crow = 0
        width = max([shape[0]] + [layers[ci].filters for ci, _ in convs])
        for ci, act in convs:
            c_in, h_in, w_in = net.shapes[ci]
            f_n, h_out, w_out = net.shapes[ci + 1]
            layer = layers[ci]
            t, _, l, _ = net.pads[ci]
            w = net.params[ci]["w"]  # (F, C, KH, KW) -> rows (u, v, c), columns f
            part = np.zeros((w[0].size, width), dt)
            part[:, :f_n] = w.transpose(2, 3, 1, 0).reshape(-1, f_n)
            wparts.append(part)
            meta.append([c_in, h_in, w_in, f_n, h_out, w_out, *layer.kernel, *layer.stride, t, l,
                         act, wrow, crow])
            wrow += len(part)
            crow += h_out * w_out
            npos.append(h_out * w_out)
        self.meta = np.array(meta, dtype=np.int64).reshape(len(convs), 15)
        self.wconv = np.concatenate(wparts) if wparts else np.zeros((1, width), dt)
        self.poff = np.concatenate([[0], np.cumsum(npos)]).astype(np.int64)
        self.clean_rows, self.width = crow, width
        wdense = net.params[self.dense_idx]["w"]
        self.units = wdense.shape[1]
        cl, hl, wl = net.shapes[self.dense_idx - 1]
        # Flatten is C order over (C, H, W). Without convs the kernel adds rows of W (units
        # contiguous: a rank-k update); after convs it takes dot products over the channels
        # of each changed position (channels contiguous), as (H W, U, C).
        wdense = wdense.reshape(cl, hl * wl, -1)
        if convs:
            self.wd_rows = np.zeros((1, 1), dt)
            self.wd_dots = np.ascontiguousarray(wdense.transpose(1, 2, 0))
        else:
            self.wd_rows = np.ascontiguousarray(
                wdense.transpose(1, 0, 2).reshape(hl * wl * cl, -1))
            self.wd_dots = np.zeros((1, 1, 1), dt)
        self.wd = self.wd_rows
        # mlp2: Flatten Dense ReLU Dense (no convolutions).
        self.mlp2 = (not convs and self.fuse_relu and self.dense_idx + 2 < len(layers)
                     and layers[self.dense_idx + 2].type == "dense")
        if self.mlp2:
            d2 = self.dense_idx + 2
            self.w2 = net.params[d2]["w"]
            self.fuse_relu2 = d2 + 1 < len(layers) and layers[d2 + 1].type == "relu"
            self.rest2 = d2 + (2 if self.fuse_relu2 else 1)
            # A last Dense after that ReLU (the mlp's logits) is fused into the kernel too.
            if self.fuse_relu2 and self.rest2 == len(layers) - 1 and \
                    layers[self.rest2].type == "dense":
                self.w3t = np.ascontiguousarray(net.params[self.rest2]["w"].T)
                self.b3 = net.params[self.rest2]["b"]
                self.rest2 = len(layers)
            else:
                self.w3t, self.b3 = np.zeros((0, 1), dt), np.zeros(0, dt)
            self.g_bytes = self.wd.shape[0] * self.w2.shape[1] * dt.itemsize

    # -- clean activations ----------------------------------------------------------------

    def _clean(self, net, xs):
        """Clean activations of images xs (n, C, H, W), by the reference layers.

        Returns conv (n, R, width): conv l's pre-activation at (i, j) in row crow_l + i W + j
        (channels in the first F columns), and hd (n, U): the first dense pre-activation.
        """
        conv = np.zeros((len(xs), self.clean_rows, self.width), dtype=xs.dtype)
        hd = []
        # One image at a time: a BLAS GEMM can round a row differently depending on how many
        # rows share the product (OpenBLAS sgemm with M < 5 rows, measured), and an image's
        # fitness must not depend on which images are missing from the cache with it.
        for j in range(len(xs)):
            h, r = xs[j:j + 1], 0
            for i in range(self.dense_idx + 1):
                h, _ = layer_forward(net.layers[i], net.params[i], h, net.shapes[i])
                if net.layers[i].type == "conv2d":
                    f_n, ho, wo = h.shape[1:]
                    conv[j, r:r + ho * wo, :f_n] = h[0].transpose(1, 2, 0).reshape(-1, f_n)
                    r += ho * wo
            hd.append(h[0])
        return conv, np.ascontiguousarray(np.stack(hd)) if hd else \
            np.zeros((0,) + tuple(net.shapes[self.dense_idx + 1]), xs.dtype)

    def _second(self, net, h1, slots):
        """mlp2: the clean second pre-activations h2 (n, U2); G of image j into gpool[slots[j]].

        G = W1 diag(h1 > 0) W2 costs 2 D U1 U2 FLOPs per image.
        """
        d1 = self.dense_idx
        h2 = []
        for j, slot in enumerate(slots):   # per image, as _clean (batch-independent rounding)
            a1, _ = layer_forward(net.layers[d1 + 1], net.params[d1 + 1], h1[j:j + 1],
                                  net.shapes[d1 + 1])
            h2_j, _ = layer_forward(net.layers[d1 + 2], net.params[d1 + 2], a1,
                                    net.shapes[d1 + 2])
            h2.append(h2_j[0])
            np.matmul(self.wd, self.w2 * (h1[j] > 0)[:, None], out=self.gpool[slot])
        return np.ascontiguousarray(np.stack(h2))

    def _evict(self):
        while self.cache_bytes > CACHE_BYTES and self.cache:
            _, e = self.cache.popitem(last=False)
            self.cache_bytes -= e["bytes"]
            if "slot" in e:
                self.gfree.append(e["slot"])
                self.last = None

    def _slots(self, count, shape, dtype):
        """count free rows of the G pool (grown by doubling; rows are reused after eviction)."""
        if self.gpool is None:
            self.gpool = np.empty((count, *shape), dtype=dtype)
            self.gfree = list(range(count))
        elif len(self.gfree) < count:
            cap = len(self.gpool)
            new = max(2 * cap, cap - len(self.gfree) + count)
            pool = np.empty((new, *shape), dtype=dtype)
            pool[:cap] = self.gpool
            self.gpool = pool
            self.gfree += list(range(cap, new))
        return [self.gfree.pop() for _ in range(count)]

    def batch(self, net, x):
        """Clean activations of the batch x (N, C, H, W); the caller holds self.lock.

        Returns (conv (N, R, width), hd (N, U), h2, gidx); h2 (N, U2) and gidx (N,) int64
        (each image's row of self.gpool, its G) only when every image of the batch was
        scored in an earlier call and the batch's G fits the cache budget, else None, None.
        """
        keys = tuple(x[j].tobytes() for j in range(len(x)))
        entries, missing = [], []
        for j, key in enumerate(keys):
            e = self.cache.get(key)
            if e is None:
                missing.append(j)
            else:
                self.cache.move_to_end(key)
            entries.append(e)
        if missing:
            conv, hd = _one_blas_thread(self._clean, net, x[missing])
            for r, j in enumerate(missing):
                e = {"conv": conv[r], "hd": hd[r], "bytes": conv[r].nbytes + hd[r].nbytes}
                self.cache[keys[j]] = e
                self.cache_bytes += e["bytes"]
                entries[j] = e
        want_g = (self.mlp2 and not missing and
                  len(x) * (self.g_bytes + 4 * entries[0]["bytes"]) <= CACHE_BYTES // 2)
        if want_g:
            need = [j for j, e in enumerate(entries) if "slot" not in e]
            if need:
                self.last = None
                slots = self._slots(len(need), self.wd.shape[:1] + self.w2.shape[1:],
                                    self.wd.dtype)
                h2 = _one_blas_thread(self._second, net,
                                      np.stack([entries[j]["hd"] for j in need]), slots)
                for r, j in enumerate(need):
                    e = entries[j]
                    e["h2"], e["slot"] = h2[r], slots[r]
                    e["bytes"] += h2[r].nbytes + self.g_bytes
                    self.cache_bytes += h2[r].nbytes + self.g_bytes
        last = self.last
        if last is None or last[0] != keys or (want_g and last[3] is None):
            conv = np.stack([e["conv"] for e in entries])
            hd = np.stack([e["hd"] for e in entries])
            h2 = np.stack([e["h2"] for e in entries]) if want_g else None
            gidx = np.array([e["slot"] for e in entries], np.int64) if want_g else None
            self.last = last = (keys, conv, hd, h2, gidx)
        self._evict()
        _, conv, hd, h2, gidx = last
        if not want_g:
            h2 = gidx = None
        return conv, hd, h2, gidx


def _one_blas_thread(fn, *args):
    """fn(*args) with a single-threaded BLAS (as numba_cpu's kernels run their GEMMs): a
    multi-threaded OpenBLAS rounds these products differently (measured: DE's best_fitness
    differed in the last bit between a 1-core and a 2-core process), and a result must not
    depend on the cores it ran on (advkern.distributed compares workers with one process)."""
    from . import nn

    ctl = nn._blas_controller()
    if not ctl:
        return fn(*args)
    nn._single_blas(ctl, +1)
    try:
        return fn(*args)
    finally:
        nn._single_blas(ctl, -1)


_PLANS = weakref.WeakKeyDictionary()
_PLANS_LOCK = threading.Lock()


def _plan(net):
    with _PLANS_LOCK:
        plan = _PLANS.get(net)
        if plan is None:
            plan = _PLANS[net] = _Plan(net)
    return plan


# -- de_score ---------------------------------------------------------------------------------

_POOL = []


def _threads():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _run_rows(kernel, m, args):
    """kernel(m0, m1, *args) over rows [0, m), split across threads (the kernels drop the
    GIL); small batches run inline (a thread hand-off costs ~50 us)."""
    nt = _threads()
    if nt == 1 or m < 64 * nt:
        kernel(0, m, *args)
        return
    with _PLANS_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(max_workers=nt, thread_name_prefix="advkern-de"))
    step = -(-m // (4 * nt))  # a few blocks per thread balance uneven candidates
    futures = [_POOL[0].submit(kernel, s, min(m, s + step), *args) for s in range(0, m, step)]
    for f in futures:
        f.result()


def _fitness(logits, labels, targeted):
    logp = log_softmax(logits)[np.arange(len(labels)), labels]
    return (-logp if targeted else logp), predict(logits)


def _score_full(net, x, lab, pop, targeted):
    """Fallback: apply the candidates to image copies and run the whole network, in chunks."""
    n, p = pop.shape[:2]
    widest = max(int(np.prod(s)) for s in net.shapes)
    step = max(1, _ROW_BYTES // (p * widest * x.dtype.itemsize))
    logits = []
    for s in range(0, n, step):
        images = apply_candidates(x[s:s + step], pop[s:s + step])
        logits.append(_forward_rest(net, 0, images))
    return _fitness(np.concatenate(logits), lab, targeted)


def de_score(net, x, labels, pop, targeted):
    """Fitness and prediction of every DE candidate; equals full scoring to float tolerance.

    net: a prepared ``Net``; x: (N, C, H, W) clean images in net.dtype; labels: (N,) true
    classes (untargeted) or targets (targeted); pop: (N, P, k (2 + C)) candidates (row, col,
    C values per pixel). Candidate pop[n, p] is written into a copy of x[n] (floor of row/col
    clamped to [0, H-1] x [0, W-1], values cast to x's dtype, later pixels win).
    Returns fitness (N, P) in x's dtype (log softmax_y untargeted, -log softmax_t targeted,
    by ``reference.losses.log_softmax``) and pred (N, P) int64 (argmax).
    Nothing is modified.
    """
    x = np.asarray(x)
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(net.input_shape):
        raise ShapeError(f"x must be (N, *{tuple(net.input_shape)}), got shape {x.shape}")
    if x.dtype != net.dtype:
        raise AdvkernError(f"x has dtype {x.dtype} but the net was prepared for {net.dtype}")
    pop = check_float_array(pop, "pop", ndim=3)
    n, c, h, w = x.shape
    if pop.shape[0] != n or pop.shape[2] % (2 + c) or pop.shape[2] == 0:
        raise ShapeError(f"pop must be ({n}, P, k*{2 + c}) for images {x.shape}, "
                         f"got {pop.shape}")
    lab = check_labels(labels, n, net.num_classes, "labels")
    p = pop.shape[1]
    k = pop.shape[2] // (2 + c)
    m = n * p
    labr = np.repeat(lab, p)
    if m == 0:
        return np.zeros((n, p), x.dtype), np.zeros((n, p), np.int64)
    plan = _plan(net)
    if plan.mode == "full":
        fit, pred = _score_full(net, x, labr, pop, targeted)
        return fit.reshape(n, p), pred.reshape(n, p)

    x = np.ascontiguousarray(x)
    cand = pop.reshape(m, k, 2 + c)
    # As reference.pixel.apply_candidates.
    rows = np.ascontiguousarray(np.clip(np.floor(cand[:, :, 0]), 0, h - 1).astype(np.int64))
    cols = np.ascontiguousarray(np.clip(np.floor(cand[:, :, 1]), 0, w - 1).astype(np.int64))
    vals = np.ascontiguousarray(cand[:, :, 2:].astype(x.dtype))
    dt = x.dtype.type
    zero, one = dt(0), dt(1)
    with plan.lock:  # the cache, and the G pool the kernel reads
        conv, hd, h2, gidx = plan.batch(net, x)
        if gidx is not None:
            kernel_out = len(plan.b3) or plan.w2.shape[1]
            rest = plan.rest2
        else:
            kernel_out, rest = plan.units, plan.rest
        widest = max([kernel_out] + [int(np.prod(s)) for s in net.shapes[rest:]])
        step = max(1, _ROW_BYTES // (p * widest * x.dtype.itemsize))
        logits = []
        for s in range(0, n, step):
            sl = slice(s * p, min(n, s + step) * p)
            mm = sl.stop - sl.start
            out = np.empty((mm, kernel_out), dtype=x.dtype)
            # The chunk's candidate rows belong to images s.., so the images from s on.
            if gidx is not None:
                _run_rows(_mlp2_range, mm, (rows[sl], cols[sl], vals[sl], x[s:], p, plan.wd,
                                            hd[s:], h2[s:], plan.gpool, gidx[s:], plan.w2,
                                            plan.fuse_relu2, plan.w3t, plan.b3, zero, out))
            else:
                _run_rows(_chain_range, mm, (rows[sl], cols[sl], vals[sl], x[s:], p, plan.meta,
                                             plan.wconv, plan.poff, conv[s:], hd[s:],
                                             plan.wd_rows, plan.wd_dots, plan.fuse_relu, zero,
                                             one, out))
            logits.append(_forward_rest(net, rest, out))
    fit, pred = _fitness(np.concatenate(logits) if len(logits) > 1 else logits[0], labr,
                         targeted)
    return fit.reshape(n, p), pred.reshape(n, p)
