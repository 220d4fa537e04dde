"""The ``numba_cuda`` backend's custom kernels: every op of the GPU ops interface
(``advkern.kernels._gpu``) as a ``numba.cuda.jit`` kernel written in Python.

On a GPU the arrays are CuPy arrays, passed to the kernels through
``__cuda_array_interface__`` (no copy); under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``) they are NumPy arrays and every kernel runs in Python, thread by
thread, so it can be stepped through with pdb. GEMMs are not here: the shared driver calls
cuBLAS through ``cupy.matmul``.

Kernels compile once per argument types (dtype) on first use and are cached on disk where
numba-cuda supports it (``cache=True``; not under the simulator). numba-cuda contracts
``a * b + c`` into an FMA by default (NVVM's -fma=1, seen in the PTX), so the kernels whose
results must equal the reference bit for bit multiply with libdevice's ``*mul_rn``, which is
never contracted (de_step; the other exact kernels have no multiply-add).

Launch configurations (one line of reasoning each):
- elementwise / gather kernels: 256 threads, grid-stride, at most 32 blocks per SM: memory
  bound, so enough resident warps to hide latency and no tail of tiny blocks;
- per-row kernels (losses): 128 threads, one row per thread: K ~ 10 logits, a row is a few
  registers;
- per-image reductions (l2_step, JSMA searches): one block of 256 threads per image, a
  shared-memory tree reduction; 256 threads keep 8 blocks resident per SM and the scan of
  an image's D ~ 784 features (D^2 / 2 pairs for JSMA) busy.
Under the simulator every launch uses a handful of threads (Python threads are expensive;
the grid-stride loops make any launch size correct).
"""

import math

import numpy as np
from numba import cuda

def _simulated():
    try:
        from numba.cuda import config as cfg
    except ImportError:  # numba's own numba.cuda
        from numba import config as cfg
    return bool(getattr(cfg, "ENABLE_CUDASIM", False))


SIM = _simulated()

_TPB = 4 if SIM else 256
# Per-image reductions under the simulator: 2 threads still run the shared-memory tree (one
# level) and the strided loops, at a fraction of the simulator's cost per barrier.
_TPB_RED = 2 if SIM else 256
_TPB_ROW = 4 if SIM else 128
_MAX_BLOCKS = 2 if SIM else 132 * 32
_ACT = {"none": 0, "relu": 1, "tanh": 2, "sigmoid": 3}


def _jit(fn):
    return cuda.jit(fn) if SIM else cuda.jit(cache=True)(fn)


def _jit_closure(fn):
    # Kernels made by a factory close over per-dtype constants, which numba's on-disk cache
    # cannot key on: compiled once per process instead (_FACTORY keeps them).
    return cuda.jit(fn)


def _blocks(n, tpb=_TPB):
    return max(1, min(_MAX_BLOCKS, -(-int(n) // tpb)))


# ============================================================================ checks


@_jit
def _nonfinite_k(a, b, c, use_c, total):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, a.size, stride):
        bad = not math.isfinite(a[i]) or not math.isfinite(b[i])
        if use_c and not math.isfinite(c[i]):
            bad = True
        if bad:  # one atomic per NaN/Inf element: none on a sound attack's inputs
            cuda.atomic.add(total, 0, 1)


def count_nonfinite(a, b, c=None):
    """A device int64 (1,): positions where a, b or c (same size) hold a NaN/Inf."""
    xp = _array_module(a)
    total = xp.zeros(1, np.int64)
    fa, fb = a.reshape(-1), b.reshape(-1)
    fc = fa if c is None else c.reshape(-1)
    if fa.size:
        _nonfinite_k[_blocks(fa.size), _TPB](fa, fb, fc, c is not None, total)
    return total


def _array_module(a):
    if isinstance(a, np.ndarray):
        return np
    import cupy
    return cupy


# ============================================================================ activations


@_jit
def _bias_act_k(y, b, inner, f, code, has_bias):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, y.size, stride):
        v = y[i]
        if has_bias:
            v = v + b[(i // inner) % f]
        if code == 1:
            if not v > 0:
                v = abs(v) * 0  # +0 in v's type, as the reference's where(x > 0, x, 0)
        elif code == 2:
            v = math.tanh(v)
        elif code == 3:
            v = 1 / (1 + math.exp(-v))
        y[i] = v


def bias_act(y, b, inner, act):
    flat = y.reshape(-1)
    if flat.size == 0:
        return
    code = _ACT[act]
    if b is None:
        if code == 0:
            return
        # an empty placeholder for b: the simulator copies every argument back after a
        # launch, so an aliasing view of y would overwrite y's first element
        _bias_act_k[_blocks(flat.size), _TPB](flat, flat[:0] if SIM else flat[:1], 1, 1, code,
                                              False)
    else:
        _bias_act_k[_blocks(flat.size), _TPB](flat, b, int(inner), int(b.size), code, True)


@_jit
def _act_grad_k(d, out, code):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, d.size, stride):
        o = out[i]
        if code == 1:
            if not o > 0:
                d[i] = abs(d[i]) * 0
        elif code == 2:
            d[i] = d[i] * (1 - o * o)
        elif code == 3:
            d[i] = d[i] * o * (1 - o)


def act_grad(d, out, act):
    flat = d.reshape(-1)
    if flat.size == 0 or act == "none":
        return
    _act_grad_k[_blocks(flat.size), _TPB](flat, out.reshape(-1), _ACT[act])


# ============================================================================ conv / pool


@_jit
def _im2col_k(x, out, c, h, w, kh, kw, sh, sw, pt, pl, ho, wo):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    rows = c * kh * kw
    howo = ho * wo
    total = out.size
    for idx in range(start, total, stride):
        col = idx % howo
        t = idx // howo
        row = t % rows
        n = t // rows
        v = row % kw
        u = (row // kw) % kh
        ch = row // (kw * kh)
        i = col // wo
        j = col % wo
        yy = i * sh + u - pt
        xx = j * sw + v - pl
        if 0 <= yy < h and 0 <= xx < w:
            out[n, row, col] = x[n, ch, yy, xx]
        else:
            out[n, row, col] = 0


def im2col(x, kh, kw, sh, sw, pt, pl, ho, wo, out):
    if out.size == 0:
        return
    _, c, h, w = x.shape
    _im2col_k[_blocks(out.size), _TPB](x, out, c, h, w, kh, kw, sh, sw, pt, pl, ho, wo)


@_jit
def _col2im_k(dcols, out, c, h, w, kh, kw, sh, sw, pt, pl, ho, wo):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for idx in range(start, out.size, stride):
        xx = idx % w
        yy = (idx // w) % h
        ch = (idx // (w * h)) % c
        n = idx // (w * h * c)
        acc = dcols[0, 0, 0] * 0
        for u in range(kh):
            ti = yy + pt - u
            if ti < 0 or ti % sh != 0:
                continue
            i = ti // sh
            if i >= ho:
                continue
            for v in range(kw):
                tj = xx + pl - v
                if tj < 0 or tj % sw != 0:
                    continue
                j = tj // sw
                if j >= wo:
                    continue
                acc += dcols[n, (ch * kh + u) * kw + v, i * wo + j]
        out[n, ch, yy, xx] = acc


def col2im(dcols, h, w, kh, kw, sh, sw, pt, pl, ho, wo, out):
    if out.size == 0:
        return
    if dcols.size == 0:
        out[...] = 0
        return
    c = out.shape[1]
    _col2im_k[_blocks(out.size), _TPB](dcols, out, c, h, w, kh, kw, sh, sw, pt, pl, ho, wo)


@_jit
def _pool_fwd_k(x, out, arg, kh, kw, sh, sw):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    c, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    for idx in range(start, out.size, stride):
        j = idx % wo
        i = (idx // wo) % ho
        ch = (idx // (wo * ho)) % c
        n = idx // (wo * ho * c)
        best = x[n, ch, i * sh, j * sw]
        tap = 0
        for u in range(kh):
            for v in range(kw):
                val = x[n, ch, i * sh + u, j * sw + v]
                if val > best:
                    best = val
                    tap = u * kw + v
        out[n, ch, i, j] = best
        arg[n, ch, i, j] = tap


def maxpool_fwd(x, kh, kw, sh, sw, out, arg):
    if out.size == 0:
        return
    _pool_fwd_k[_blocks(out.size), _TPB](x, out, arg, kh, kw, sh, sw)


@_jit
def _pool_bwd_k(dout, arg, dx, kh, kw, sh, sw):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    c, h, w = dx.shape[1], dx.shape[2], dx.shape[3]
    ho, wo = dout.shape[2], dout.shape[3]
    for idx in range(start, dx.size, stride):
        xx = idx % w
        yy = (idx // w) % h
        ch = (idx // (w * h)) % c
        n = idx // (w * h * c)
        acc = dout[0, 0, 0, 0] * 0
        for u in range(kh):
            ti = yy - u
            if ti < 0 or ti % sh != 0:
                continue
            i = ti // sh
            if i >= ho:
                continue
            for v in range(kw):
                tj = xx - v
                if tj < 0 or tj % sw != 0:
                    continue
                j = tj // sw
                if j >= wo:
                    continue
                if arg[n, ch, i, j] == u * kw + v:
                    acc += dout[n, ch, i, j]
        dx[n, ch, yy, xx] = acc


def maxpool_bwd(dout, arg, kh, kw, sh, sw, dx):
    if dx.size == 0:
        return
    if dout.size == 0:
        dx[...] = 0
        return
    _pool_bwd_k[_blocks(dx.size), _TPB](dout, arg, dx, kh, kw, sh, sw)


# ============================================================================ losses


@cuda.jit(device=True)
def _zval(z, r, k, kk):
    # column kk of the two-class-extended row: (0, z) when K == 1
    if k == 1:
        return z[r, 0] * 0 if kk == 0 else z[r, 0]
    return z[r, kk]


@_jit
def _xent_k(z, labels, values, dz, want_grad):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    n, k = z.shape[0], z.shape[1]
    kx = 2 if k == 1 else k
    for r in range(start, n, stride):
        top = 0
        zt = _zval(z, r, k, 0)
        for kk in range(1, kx):
            v = _zval(z, r, k, kk)
            if v > zt:
                zt = v
                top = kk
        acc = zt * 0
        for kk in range(kx):
            if kk != top:
                acc += math.exp(_zval(z, r, k, kk) - zt)
        lse = math.log1p(acc)
        y = labels[r]
        values[r] = lse - (_zval(z, r, k, y) - zt)
        if want_grad:
            for kk in range(kx):
                if k == 1 and kk == 0:
                    continue
                g = math.exp((_zval(z, r, k, kk) - zt) - lse)
                if kk == y:
                    g -= 1
                dz[r, kk - 1 if k == 1 else kk] = g


def softmax_xent(z, labels, values, dz):
    n = z.shape[0]
    if n == 0:
        return
    want = dz is not None
    _xent_k[_blocks(n, _TPB_ROW), _TPB_ROW](z, labels, values, dz if want else z, want)


@_jit
def _cw_k(z, labels, values, dz):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    n, k = z.shape[0], z.shape[1]
    kx = 2 if k == 1 else k
    for r in range(start, n, stride):
        y = labels[r]
        j = -1
        zj = z[r, 0] * 0
        for kk in range(kx):
            if kk == y:
                continue
            v = _zval(z, r, k, kk)
            if j < 0 or v > zj:
                zj = v
                j = kk
        values[r] = zj - _zval(z, r, k, y)
        for kk in range(k):
            col = kk + 1 if k == 1 else kk
            g = z[r, 0] * 0
            if col == j:
                g += 1
            if col == y:
                g -= 1
            dz[r, kk] = g


def cw_margin(z, labels, values, dz):
    n = z.shape[0]
    if n == 0:
        return
    if dz is None:
        dz = z.copy()
    _cw_k[_blocks(n, _TPB_ROW), _TPB_ROW](z, labels, values, dz)


# ============================================================================ steps


@_jit
def _linf_k(xa, g, x0, eps, alpha, lo, hi, active, out):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    d = xa.shape[1]
    for idx in range(start, xa.size, stride):
        n = idx // d
        i = idx % d
        xv = xa[n, i]
        if not active[n]:
            out[n, i] = xv
            continue
        gv = g[n, i]
        a = alpha[n]
        if gv > 0:
            t = a
        elif gv < 0:
            t = -a
        else:
            t = a * 0
        v = xv + t
        c = x0[n, i]
        e = eps[n]
        lower = c - e
        upper = c + e
        # numpy's clip: on a +-0 tie an array bound wins, a scalar bound keeps the value
        v = v if v > lower else lower
        v = v if v < upper else upper
        v = lo if v < lo else v
        v = hi if v > hi else v
        out[n, i] = v


def linf_step(xa, g, x0, eps, alpha, lo, hi, active, out):
    dt = xa.dtype.type
    _linf_k[_blocks(xa.size), _TPB](xa, g, x0, eps, alpha, dt(lo), dt(hi), active, out)


_FACTORY = {}


def _factory(name, dt, make):
    key = (name, np.dtype(dt))
    if key not in _FACTORY:
        _FACTORY[key] = make(np.dtype(dt))
    return _FACTORY[key]


def _caster(dt):
    import numba
    return numba.float32 if dt == np.float32 else numba.float64


@cuda.jit(device=True)
def _block_reduce(sh, t, tpb, v, take_max):
    """The block's max (take_max) or sum of the threads' v, through the shared array sh
    (tpb float64, tpb a power of two); every thread gets the result."""
    sh[t] = v
    cuda.syncthreads()
    s = tpb // 2
    while s > 0:
        if t < s:
            if take_max:
                sh[t] = max(sh[t], sh[t + s])
            else:
                sh[t] += sh[t + s]
        cuda.syncthreads()
        s //= 2
    r = sh[0]
    cuda.syncthreads()          # sh is reused by the next reduction
    return r


def _make_l2(dt):
    cast = _caster(dt)
    tpb = _TPB_RED

    @_jit_closure
    def k(xa, g, x0, eps, alpha, lo, hi, active, out):
        n = cuda.blockIdx.x
        t = cuda.threadIdx.x
        d = xa.shape[1]
        sh = cuda.shared.array(tpb, np.float64)
        if not active[n]:
            for i in range(t, d, tpb):
                out[n, i] = xa[n, i]
            return
        # ||g||: max |g|, then the sum of squares of g / max (reference l2_norms)
        m = 0.0
        for i in range(t, d, tpb):
            m = max(m, abs(np.float64(g[n, i])))
        mg = _block_reduce(sh, t, tpb, m, True)
        acc = 0.0
        if mg > 0:
            for i in range(t, d, tpb):
                q = np.float64(g[n, i]) / mg
                acc += q * q
        norm_g = mg * math.sqrt(_block_reduce(sh, t, tpb, acc, False))
        scale = np.float64(alpha[n]) / norm_g if norm_g > 0 else 0.0
        # delta = (xa + step) - x0 in dt; its norm the same way
        m = 0.0
        for i in range(t, d, tpb):
            new = xa[n, i] + cast(np.float64(g[n, i]) * scale)
            m = max(m, abs(np.float64(new - x0[n, i])))
        md = _block_reduce(sh, t, tpb, m, True)
        acc = 0.0
        if md > 0:
            for i in range(t, d, tpb):
                new = xa[n, i] + cast(np.float64(g[n, i]) * scale)
                q = np.float64(new - x0[n, i]) / md
                acc += q * q
        norm_d = md * math.sqrt(_block_reduce(sh, t, tpb, acc, False))
        e = np.float64(eps[n])
        factor = e / norm_d if norm_d > e else 1.0
        for i in range(t, d, tpb):
            c = x0[n, i]
            new = xa[n, i] + cast(np.float64(g[n, i]) * scale)
            delta = new - c
            v = c + cast(np.float64(delta) * factor)
            v = lo if v < lo else v
            v = hi if v > hi else v
            out[n, i] = v
    return k


def l2_step(xa, g, x0, eps, alpha, lo, hi, active, out):
    dt = xa.dtype.type
    k = _factory("l2", xa.dtype, _make_l2)
    k[xa.shape[0], _TPB_RED](xa, g, x0, eps, alpha, dt(lo), dt(hi), active, out)


# ============================================================================ JSMA


@cuda.jit(device=True)
def _better(v, p, q, bv, bp, bq):
    """(v, p, q) before (bv, bp, bq) in the search order: smaller product, then p, then q."""
    if bp < 0:
        return p >= 0
    if p < 0:
        return False
    if v < bv:
        return True
    if v > bv:
        return False
    return p < bp or (p == bp and q < bq)


def _make_pair():
    tpb = _TPB_RED

    @_jit_closure
    def k(a, b, domain, positive, p_out, q_out, found):
        n = cuda.blockIdx.x
        t = cuda.threadIdx.x
        d = a.shape[1]
        sv = cuda.shared.array(tpb, np.float64)
        sp = cuda.shared.array(tpb, np.int64)
        sq = cuda.shared.array(tpb, np.int64)
        bv = 0.0
        bp = -1
        bq = -1
        for p in range(t, d - 1, tpb):
            if not domain[n, p]:
                continue
            ap = a[n, p]
            bpv = b[n, p]
            for q in range(p + 1, d):
                if not domain[n, q]:
                    continue
                al = ap + a[n, q]
                be = bpv + b[n, q]
                if positive:
                    ok = al > 0 and be < 0
                else:
                    ok = al < 0 and be > 0
                if ok:
                    v = np.float64(al * be)   # the product in dt; float64 holds it exactly
                    if _better(v, p, q, bv, bp, bq):
                        bv = v
                        bp = p
                        bq = q
        sv[t] = bv
        sp[t] = bp
        sq[t] = bq
        cuda.syncthreads()
        s = tpb // 2
        while s > 0:
            if t < s:
                if _better(sv[t + s], sp[t + s], sq[t + s], sv[t], sp[t], sq[t]):
                    sv[t] = sv[t + s]
                    sp[t] = sp[t + s]
                    sq[t] = sq[t + s]
            cuda.syncthreads()
            s //= 2
        if t == 0:
            p_out[n] = sp[0]
            q_out[n] = sq[0]
            found[n] = sp[0] >= 0
    return k


def jsma_pair(a, b, domain, positive, p, q, found):
    k = _factory("pair", np.float64, lambda dt: _make_pair())
    k[a.shape[0], _TPB_RED](a, b, domain, bool(positive), p, q, found)


def _make_feature():
    tpb = _TPB_RED

    @_jit_closure
    def k(a, b, domain, positive, i_out, found):
        n = cuda.blockIdx.x
        t = cuda.threadIdx.x
        d = a.shape[1]
        sv = cuda.shared.array(tpb, np.float64)
        sp = cuda.shared.array(tpb, np.int64)
        bv = 0.0
        bp = -1
        for i in range(t, d, tpb):
            if not domain[n, i]:
                continue
            av = a[n, i]
            bb = b[n, i]
            if positive:
                ok = av > 0 and bb < 0
            else:
                ok = av < 0 and bb > 0
            if ok:
                v = np.float64(av * bb)
                if _better(v, i, 0, bv, bp, 0):
                    bv = v
                    bp = i
        sv[t] = bv
        sp[t] = bp
        cuda.syncthreads()
        s = tpb // 2
        while s > 0:
            if t < s:
                if _better(sv[t + s], sp[t + s], 0, sv[t], sp[t], 0):
                    sv[t] = sv[t + s]
                    sp[t] = sp[t + s]
            cuda.syncthreads()
            s //= 2
        if t == 0:
            i_out[n] = sp[0]
            found[n] = sp[0] >= 0
    return k


def jsma_feature(a, b, domain, positive, i, found):
    k = _factory("feature", np.float64, lambda dt: _make_feature())
    k[a.shape[0], _TPB_RED](a, b, domain, bool(positive), i, found)


# ============================================================================ DE


def _make_de_step(dt):
    if SIM:
        def mul(x, y):
            return x * y
        mul = cuda.jit(device=True)(mul)
    else:
        from numba.cuda import libdevice
        mul = libdevice.fmul_rn if dt == np.float32 else libdevice.dmul_rn

    @_jit_closure
    def k(pop, r1, r2, r3, cross, forced, f, cr, use_cr, lower, upper, out):
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        pp, dim = pop.shape[1], pop.shape[2]
        for idx in range(start, out.size, stride):
            j = idx % dim
            m = (idx // dim) % pp
            n = idx // (dim * pp)
            v = pop[n, r1[n, m], j] + mul(f, pop[n, r2[n, m], j] - pop[n, r3[n, m], j])
            if use_cr:
                if not (cross[n, m, j] < cr or j == forced[n, m]):
                    v = pop[n, m, j]
            lw = lower[j]
            up = upper[j]
            v = v if v > lw else lw
            v = v if v < up else up
            out[n, m, j] = v
    return k


def de_step(pop, r1, r2, r3, cross, forced, F, CR, lower, upper, out):
    dt = pop.dtype
    k = _factory("de_step", dt, _make_de_step)
    use = CR is not None
    if not use:
        cross = np.zeros((1, 1, 1)) if SIM else pop[:1, :1, :1].astype(np.float64)
        forced = r1
    k[_blocks(out.size), _TPB](pop, r1, r2, r3, cross, forced, dt.type(F),
                               float(CR) if use else 0.0, use, lower, upper, out)


@cuda.jit(device=True)
def _pixel(pop, n, m, j, c, h, w):
    """(row, col) of candidate (n, m)'s pixel j, floored and clamped."""
    base = j * (2 + c)
    r = int(math.floor(pop[n, m, base]))
    s = int(math.floor(pop[n, m, base + 1]))
    r = min(max(r, 0), h - 1)
    s = min(max(s, 0), w - 1)
    return r, s


@cuda.jit(device=True)
def _overwritten(pop, n, m, j, k, c, h, w, r, s):
    """Whether a later pixel of the same candidate writes (r, s) again (later pixels win)."""
    for j2 in range(j + 1, k):
        r2, s2 = _pixel(pop, n, m, j2, c, h, w)
        if r2 == r and s2 == s:
            return True
    return False


@_jit
def _patch_dense_k(base, w, x, pop, out):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    pp = pop.shape[1]
    c, h, ww = x.shape[1], x.shape[2], x.shape[3]
    k = pop.shape[2] // (2 + c)
    mm = out.shape[1]
    for idx in range(start, out.size, stride):
        col = idx % mm
        cand = idx // mm
        n = cand // pp
        m = cand % pp
        acc = base[n, col]
        for j in range(k):
            r, s = _pixel(pop, n, m, j, c, h, ww)
            if _overwritten(pop, n, m, j, k, c, h, ww, r, s):
                continue
            for ch in range(c):
                delta = pop[n, m, j * (2 + c) + 2 + ch] - x[n, ch, r, s]
                acc += delta * w[(ch * h + r) * ww + s, col]
        out[cand, col] = acc


def de_patch_dense(base, w, x, pop, out):
    if out.size == 0:
        return
    _patch_dense_k[_blocks(out.size), _TPB](base, w, x, pop, out)


@_jit
def _patch_conv_k(base, w, x, pop, sh, sw, pt, pl, out):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    pp = pop.shape[1]
    c, h, ww = x.shape[1], x.shape[2], x.shape[3]
    k = pop.shape[2] // (2 + c)
    f, ho, wo = out.shape[1], out.shape[2], out.shape[3]
    kh, kw = w.shape[2], w.shape[3]
    for idx in range(start, out.size, stride):
        j0 = idx % wo
        i0 = (idx // wo) % ho
        ff = (idx // (wo * ho)) % f
        cand = idx // (wo * ho * f)
        n = cand // pp
        m = cand % pp
        acc = base[n, ff, i0, j0]
        for j in range(k):
            r, s = _pixel(pop, n, m, j, c, h, ww)
            u = r + pt - i0 * sh
            v = s + pl - j0 * sw
            if u < 0 or u >= kh or v < 0 or v >= kw:
                continue
            if _overwritten(pop, n, m, j, k, c, h, ww, r, s):
                continue
            for ch in range(c):
                delta = pop[n, m, j * (2 + c) + 2 + ch] - x[n, ch, r, s]
                acc += delta * w[ff, ch, u, v]
        out[cand, ff, i0, j0] = acc


def de_patch_conv(base, w, x, pop, sh, sw, pt, pl, out):
    if out.size == 0:
        return
    _patch_conv_k[_blocks(out.size), _TPB](base, w, x, pop, sh, sw, pt, pl, out)
