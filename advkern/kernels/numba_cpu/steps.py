"""Fused PGD steps and the JSMA searches of the ``numba_cpu`` backend.

``linf_step``, ``l2_step``, ``l1_step``: one parallel pass over the images (``prange``,
``_linf_kernel`` / ``_l2_kernel`` / ``_l1_kernel``), each image's step, ball projection, box clip and ``active`` mask fused.
Every operation is done in the reference's order and dtype (``reference.projections``:
steepest_step, then project), so the results are the numpy backend's bit for bit:

* linf: xa + alpha * sign(g) in the array dtype (eps, alpha cast to it), then the clips.
* l2, l1: the per-image reductions are replicated as well: float64 norms with numpy's pairwise
  summation (``_pairwise_sum``), the SLIDE threshold with np.quantile's 'linear' arithmetic
  (``_quantile_linear``, by quickselect), and Duchi et al.'s sorted sequential cumulative
  sum. They agree bit for bit with the numpy backend on everything the tests draw; the
  contract promises only float tolerance, since numpy is free to change how it sums.

``linf_rows``: the same L-inf row step, serial, for ``nn.pgd_linf_step``, which runs it on
each chunk of images right after the chunk's input gradient (the contract's ``pgd_step``).

``jsma_best_pair``: the pair search, O(m) memory per image (m = domain size), images in
parallel, an exact vectorised branch-and-bound (``_pair_search``); ``jsma_best_feature``: one
O(n) pass per image.

No fastmath: the only fast-math flags are on the min/max selects ``_fmin`` / ``_fmax`` (they
let LLVM vectorise the reductions; their operands are never NaN, see there). Numba
specialisations: one per dtype (float32, float64) for each of the three kernels.
"""

import math

import numpy as np
from numba import njit, prange
from numba.extending import intrinsic

from ..._validate import check_box, check_float_array
from ...errors import AdvkernError, ShapeError
from ...reference.jsma import _check_theta
from ...reference.projections import check_sparsity, per_sample_eps
from ..contract import check_momentum, check_step_arrays

__all__ = ["linf_step", "l2_step", "l1_step", "momentum_step", "jsma_best_pair",
           "jsma_best_feature"]

# Column block of the pair search: the unit of pruning. 64 float32 = 4 AVX-512 vectors; a
# smaller block prunes more finely, a larger one vectorises longer.
PAIR_BLOCK = 64


# -- shared helpers ---------------------------------------------------------------------------

@njit(cache=True)
def _pairwise_leaf(a, lo, n):
    """numpy's pairwise_sum base case (n <= 128): 8 accumulators, then the remainder."""
    if n < 8:
        res = -0.0
        for i in range(n):
            res += a[lo + i]
        return res
    r0 = a[lo]
    r1 = a[lo + 1]
    r2 = a[lo + 2]
    r3 = a[lo + 3]
    r4 = a[lo + 4]
    r5 = a[lo + 5]
    r6 = a[lo + 6]
    r7 = a[lo + 7]
    i = 8
    end = n - n % 8
    while i < end:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(cache=True)
def _pairwise_sum(a, n):
    """numpy's pairwise_sum of a[:n] (float64), the association ``np.sum(x, axis=-1)`` uses on
    a contiguous float64 row: leaves of <= 128 terms, larger ranges split in two at
    n2 = n // 2 rounded down to a multiple of 8, the halves' sums added. Post-order traversal
    with an explicit stack (numba compiles recursion slowly); depth <= log2(n / 64)."""
    if n <= 128:
        return _pairwise_leaf(a, 0, n)
    slo = np.empty(64, dtype=np.int64)
    sn = np.empty(64, dtype=np.int64)
    stage = np.zeros(64, dtype=np.int64)
    vals = np.empty(64)
    top = 0
    nv = 0
    slo[0] = 0
    sn[0] = n
    while top >= 0:
        lo = slo[top]
        m = sn[top]
        if m <= 128:
            vals[nv] = _pairwise_leaf(a, lo, m)
            nv += 1
            top -= 1
            continue
        n2 = m // 2
        n2 -= n2 % 8
        if stage[top] == 0:                    # left half next
            stage[top] = 1
            top += 1
            slo[top], sn[top], stage[top] = lo, n2, 0
        elif stage[top] == 1:                  # then the right half
            stage[top] = 2
            top += 1
            slo[top], sn[top], stage[top] = lo + n2, m - n2, 0
        else:                                  # both done: left + right
            vals[nv - 2] = vals[nv - 2] + vals[nv - 1]
            nv -= 1
            top -= 1
    return vals[0]


@njit(cache=True)
def _heapsort(a):
    """Sort a float64 array in place, ascending (no NaN here). A small hand-written sort:
    numba's np.sort takes several seconds to compile; only the values matter (no ties rule)."""
    n = a.size
    for start in range(n // 2 - 1, -1, -1):
        _sift_down(a, start, n)
    for end in range(n - 1, 0, -1):
        t = a[0]
        a[0] = a[end]
        a[end] = t
        _sift_down(a, 0, end)


@njit(cache=True)
def _sift_down(a, root, n):
    v = a[root]
    while True:
        child = 2 * root + 1
        if child >= n:
            break
        if child + 1 < n and a[child + 1] > a[child]:
            child += 1
        if a[child] <= v:
            break
        a[root] = a[child]
        root = child
    a[root] = v


@njit(cache=True)
def _select(a, k):
    """The k-th smallest value of a (0-based; a float64 array without NaN, reordered in
    place so that a[:k] <= a[k] <= a[k + 1:]). Quickselect with a median-of-three pivot and a
    three-way partition (many ties, e.g. zeroed coordinates, cost nothing): O(n) expected."""
    lo = 0
    hi = a.size - 1
    while lo < hi:
        x = a[lo]
        y = a[(lo + hi) // 2]
        z = a[hi]
        pivot = max(min(x, y), min(max(x, y), z))
        lt = lo
        i = lo
        gt = hi
        while i <= gt:
            v = a[i]
            if v < pivot:
                a[i] = a[lt]
                a[lt] = v
                lt += 1
                i += 1
            elif v > pivot:
                a[i] = a[gt]
                a[gt] = v
                gt -= 1
            else:
                i += 1
        if k < lt:
            hi = lt - 1
        elif k > gt:
            lo = gt + 1
        else:
            return pivot
    return a[k]


@njit(cache=True)
def _l2_norm(v, buf):
    """``projections.l2_norms`` of one row v (float64 copy in any float dtype): the largest
    magnitude times the root of the pairwise sum of (v / max)^2; buf: float64 scratch."""
    d = v.size
    m = 0.0
    for i in range(d):
        t = abs(np.float64(v[i]))
        if t > m:
            m = t
    safe = m if m > 0.0 else 1.0
    for i in range(d):
        t = np.float64(v[i]) / safe
        buf[i] = t * t
    return m * math.sqrt(_pairwise_sum(buf, d))


@njit(cache=True)
def _clip_ball(v, lo, hi):
    # np.clip with array bounds (SIMD max then min; the second operand wins on equality, which
    # only decides the sign of a zero)
    t = v if v > lo else lo
    return t if t < hi else hi


@njit(cache=True)
def _clip_box(v, lo, hi):
    # np.clip with scalar bounds (the value wins on equality)
    t = lo if v < lo else v
    return hi if v > hi else t


@njit(cache=True)
def _nonfinite(v):
    return 0 if math.isfinite(v) else 1


# -- per-image rows (1-D views of one image; called from the parallel kernel) ---------------

@njit(cache=True)
def _linf_row(xa, g, x0, e, a, lo, hi, out, flip):
    """steepest_step 'linf' + project 'linf' for one image; e, a, lo, hi in the array dtype
    (the reference casts eps and alpha to it), so every operation runs in that dtype.
    flip: step along -g (sign(-g) = -sign(g) exactly, without the array -g)."""
    z = lo - lo
    for i in range(xa.size):
        gi = g[i]
        up = gi < z if flip else gi > z
        down = gi > z if flip else gi < z
        # alpha * sign(g): np.sign(+-0) is +0, and a * (+0) is +0
        s = a if up else (-a if down else z)
        v = xa[i] + s
        c = x0[i]
        out[i] = _clip_box(_clip_ball(v, c - e, c + e), lo, hi)


@njit(cache=True)
def _l2_row(xa, g, x0, e, a, lo, hi, out):
    """steepest_step 'l2' + project 'l2' for one image; e, a float64 as in the reference."""
    d = xa.size
    buf = np.empty(d)
    delta = np.empty(d, dtype=xa.dtype)
    # step = alpha * g / ||g||_2 computed in float64, cast to the array dtype
    gn = _l2_norm(g, buf)
    scale = a / gn if gn > 0.0 else 0.0
    for i in range(d):
        v = xa[i] + xa.dtype.type(np.float64(g[i]) * scale)
        delta[i] = v - x0[i]
    # project_l2: delta * (eps / ||delta||) only outside the ball (factor 1 keeps delta)
    dn = _l2_norm(delta, buf)
    factor = e / dn if dn > e else 1.0
    for i in range(d):
        w = xa.dtype.type(np.float64(delta[i]) * factor)
        out[i] = _clip_box(x0[i] + w, lo, hi)


@njit(cache=True)
def _quantile_linear(m, q):
    """np.quantile(m, q) with the default 'linear' method (m float64, no NaN): the virtual
    index (n - 1) q, the order statistics at its floor j and j + 1, and numpy's ``_lerp``.
    m is reordered (quickselect), O(n) expected."""
    n = m.size
    vi = np.float64(n - 1) * q
    if vi >= n - 1:
        return m.max()
    j = int(math.floor(vi))
    gamma = vi - j
    lo = _select(m, j)
    hi = m[j + 1]
    for i in range(j + 2, n):             # the (j + 1)-th smallest: the least of m[j + 1:]
        hi = min(hi, m[i])
    diff = hi - lo
    if gamma >= 0.5:
        return hi - diff * (1.0 - gamma)
    return lo + diff * gamma


@njit(cache=True)
def _l1_row(xa, g, x0, e, a, lo, hi, q, out):
    """steepest_step 'l1' (SLIDE, box-aware) + project 'l1' (Duchi et al.) for one image."""
    d = xa.size
    if d == 0:
        return
    # m = |g| with box-blocked coordinates zeroed; the comparisons with the box run in the
    # array dtype, as numpy's weak-scalar promotion does them
    m = np.empty(d)
    for i in range(d):
        gi = np.float64(g[i])
        xi = xa[i]
        blocked = (xi <= lo and gi < 0.0) or (xi >= hi and gi > 0.0)
        m[i] = 0.0 if blocked else abs(gi)
    r = _quantile_linear(m.copy(), q)
    count = 0
    for i in range(d):
        if m[i] >= r and m[i] > 0.0:
            count += 1
    scale = a / count if count > 0 else 0.0
    v = np.empty(d)
    av = np.empty(d)
    for i in range(d):
        gi = g[i]
        # np.sign(g) * keep * scale in float64, in that order (the sign of a zero step follows)
        s = 1.0 if gi > 0 else (-1.0 if gi < 0 else 0.0)
        kf = 1.0 if (m[i] >= r and m[i] > 0.0) else 0.0
        x1 = xa[i] + xa.dtype.type((s * kf) * scale)
        dv = np.float64(x1 - x0[i])
        v[i] = dv
        av[i] = abs(dv)
    # project_l1: soft-threshold at theta when ||v||_1 > eps. With u = |v| sorted
    # decreasingly and c_j its sequential cumulative sum (np.cumsum's order), rho is the LAST
    # j with u_j * j > c_j - eps. Only the non-zeros are sorted: on the zero tail u_j * j is
    # 0.0 and c_j stays c, so its condition is the single test 0 > c - eps (then rho = d).
    theta = 0.0
    if _pairwise_sum(av, d) > e:              # then some av > 0, as eps >= 0
        u = np.empty(d)
        nz = 0
        for i in range(d):
            if av[i] > 0.0:
                u[nz] = av[i]
                nz += 1
        _heapsort(u[:nz])
        c = 0.0
        rho = 0
        c_rho = 0.0
        for j in range(1, nz + 1):
            uj = u[nz - j]
            c += uj
            if uj * j > c - e:
                rho = j
                c_rho = c
        if nz < d and 0.0 > c - e:
            rho = d
            c_rho = c
        theta = (c_rho - e) / rho if rho > 0 else u[nz - 1]
    for i in range(d):
        vi = v[i]
        s = 1.0 if vi > 0.0 else (-1.0 if vi < 0.0 else 0.0)
        t = av[i] - theta
        w = s * (t if t > 0.0 else 0.0)
        out[i] = _clip_box(x0[i] + xa.dtype.type(w), lo, hi)


@njit(cache=True)
def _count_bad(xa, g, x0, bad):
    """Count the non-finite entries of g, xa, x0 (one image) into bad (3,), as the reference
    rejects them, inactive images too); True when none was found."""
    bg = 0
    bx = 0
    b0 = 0
    for i in range(xa.size):
        bg += _nonfinite(g[i])
        bx += _nonfinite(xa[i])
        b0 += _nonfinite(x0[i])
    bad[0] = bg
    bad[1] = bx
    bad[2] = b0
    return bg + bx + b0 == 0


# One kernel per norm, not one kernel taking the norm as a run-time argument: numba compiles
# every branch of a function, so a shared kernel made each first use of an L-inf step also
# compile the L1 row (a quickselect and a heapsort) and the L2 row, about twice the compile
# time of the L-inf path alone, paid once per machine, in the first demo or test run.

@njit(cache=True, parallel=True)
def _linf_kernel(xa, g, x0, eps, alpha, lo, hi, active, q, out, bad):
    """``_linf_row`` per image, one image per prange iteration; a copy of xa where inactive
    or non-finite. eps, alpha: float64 (n,); q unused (one signature for the three)."""
    for k in prange(xa.shape[0]):
        if _count_bad(xa[k], g[k], x0[k], bad[k]) and active[k]:
            _linf_row(xa[k], g[k], x0[k], xa.dtype.type(eps[k]), xa.dtype.type(alpha[k]), lo,
                      hi, out[k], False)
        else:
            out[k, :] = xa[k]


@njit(cache=True, parallel=True)
def _l2_kernel(xa, g, x0, eps, alpha, lo, hi, active, q, out, bad):
    """``_l2_row`` per image (as :func:`_linf_kernel`)."""
    for k in prange(xa.shape[0]):
        if _count_bad(xa[k], g[k], x0[k], bad[k]) and active[k]:
            _l2_row(xa[k], g[k], x0[k], eps[k], alpha[k], lo, hi, out[k])
        else:
            out[k, :] = xa[k]


@njit(cache=True, parallel=True)
def _l1_kernel(xa, g, x0, eps, alpha, lo, hi, active, q, out, bad):
    """``_l1_row`` per image (as :func:`_linf_kernel`); q: the sparsity quantile."""
    for k in prange(xa.shape[0]):
        if _count_bad(xa[k], g[k], x0[k], bad[k]) and active[k]:
            _l1_row(xa[k], g[k], x0[k], eps[k], alpha[k], lo, hi, q, out[k])
        else:
            out[k, :] = xa[k]


@njit(cache=True, nogil=True)
def linf_rows(xa, g, x0, eps, alpha, lo, hi, active, flip, out, bad):
    """``linf_step`` on rows (n, D) in the calling thread: the L-inf PGD step fused into the
    input-gradient pass (nn.pgd_step), while a chunk's gradient is still in cache."""
    for k in range(xa.shape[0]):
        if _count_bad(xa[k], g[k], x0[k], bad[k]) and active[k]:
            _linf_row(xa[k], g[k], x0[k], xa.dtype.type(eps[k]), xa.dtype.type(alpha[k]), lo,
                      hi, out[k], flip)
        else:
            out[k, :] = xa[k]


@njit(cache=True, parallel=True)
def _momentum_kernel(g, mom, decay, flip, out_mom, out_dir):
    """MI-FGSM's momentum update per image, one pass: d = +-g in float64, the pairwise L1 norm
    of d (numpy's association, so the norm equals ``np.abs(d).sum(axis=1)`` bit for bit),
    out_mom = decay * mom + d * (1 / ||d||_1, or 0 for a zero or NaN norm), out_dir = out_mom
    cast to g's dtype (the direction linf_step takes the sign of). out_mom's row holds |d|
    for the norm before it holds the update (no scratch array per image)."""
    n, d = g.shape
    for k in prange(n):
        row = out_mom[k]
        for i in range(d):
            row[i] = abs(np.float64(g[k, i]))
        l1 = _pairwise_sum(row, d)
        scale = 1.0 / l1 if l1 > 0.0 else 0.0
        for i in range(d):
            v = np.float64(g[k, i])
            m = decay * mom[k, i] + (-v if flip else v) * scale
            out_mom[k, i] = m
            out_dir[k, i] = g.dtype.type(m)


# -- step wrappers ----------------------------------------------------------------------------

def step_args(xa, g, x0, eps, alpha, lo, hi, active):
    """Check a step's arguments as the reference does (shapes, dtypes, eps/alpha finite and
    >= 0, the box; NaN/Inf are counted inside the kernels). g None: not given yet (it takes
    xa's shape and dtype).

    Returns (rows of xa, g (None if not given) and x0 as C-contiguous (n, D), eps and alpha
    float64 (n,), lo and hi in the dtype, active (n,) bool).
    """
    def as_array(a, name):
        return np.asarray(a) if name == "active" else check_float_array(a, name, finite=False)

    xa, g_arr, x0, active = check_step_arrays(xa, g, x0, active, as_array)
    dt = x0.dtype
    g = g_arr if g is not None else xa
    n = x0.shape[0]
    d = int(np.prod(x0.shape[1:], dtype=np.int64))
    # float64 (n,), finite and >= 0, or raise (floats broadcast): the reference's reading
    e = per_sample_eps(eps, n)
    a = per_sample_eps(alpha, n, name="alpha")
    lo, hi = check_box((lo, hi))
    xa2, g2, x02 = (np.ascontiguousarray(v.reshape(n, d)) for v in (xa, g, x0))
    return (xa2, g2 if g_arr is not None else None, x02, e, a, dt.type(lo), dt.type(hi),
            np.ascontiguousarray(active, dtype=bool))


def raise_nonfinite(bad):
    """The reference's error for NaN/Inf in g, xa or x0, from the kernels' counts (n, 3)."""
    total = bad.sum(axis=0)
    for j, name in enumerate(("g", "xa", "x0")):
        if total[j]:
            raise AdvkernError(f"{name} contains {int(total[j])} NaN/Inf value(s)")


def _step(kernel, xa, g, x0, eps, alpha, lo, hi, active, q=0.0):
    """Check the arguments (``step_args``), run the kernel, return the new (N, *S) array."""
    xa2, g2, x02, e, a, lo, hi, act = step_args(xa, g, x0, eps, alpha, lo, hi, active)
    out = np.empty_like(xa2)
    bad = np.zeros((len(xa2), 3), dtype=np.int64)
    kernel(xa2, g2, x02, e, a, lo, hi, act, float(q), out, bad)
    raise_nonfinite(bad)
    return out.reshape(np.shape(x0))


def linf_step(xa, g, x0, eps, alpha, lo, hi, active):
    """clip(clip(xa + alpha * sign(g), x0 - eps, x0 + eps), lo, hi) where active, else xa.

    xa, g, x0: (N, *S) float32/64 (one dtype); eps, alpha: (N,) arrays or floats (>= 0; cast
    to the array dtype, as the reference does); lo < hi floats; active (N,) bool. Returns a
    new (N, *S) array, bit-for-bit ``numpy_backend.linf_step``. sign(0) = 0.
    """
    return _step(_linf_kernel, xa, g, x0, eps, alpha, lo, hi, active)


def momentum_step(xa, g, mom, decay, flip, x0, eps, alpha, lo, hi, active):
    """The contract's MI-FGSM step: mom' = decay * mom + d / ||d||_1 (d = g, or -g when flip,
    in float64), then ``linf_step`` along mom' cast to the dtype. mom: (N, D) float64; other
    arguments as :func:`linf_step`. Returns (xa' (N, *S), mom' (N, D) float64), bit for bit
    ``contract.composed_momentum_step`` on the numpy backend. Two passes over the batch
    (the update, then the step) instead of NumPy's seven temporaries."""
    xa2, g2, x02, e, a, lo, hi, act = step_args(xa, g, x0, eps, alpha, lo, hi, active)
    n, d = xa2.shape
    mom, decay = check_momentum(mom, decay, n, d,
                                lambda v, name: check_float_array(v, name, finite=False))
    mom = np.ascontiguousarray(mom)
    out_mom = np.empty_like(mom)
    direction = np.empty_like(g2)
    _momentum_kernel(g2, mom, decay, bool(flip), out_mom, direction)
    out = np.empty_like(xa2)
    bad = np.zeros((n, 3), dtype=np.int64)
    _linf_kernel(xa2, direction, x02, e, a, lo, hi, act, 0.0, out, bad)
    raise_nonfinite(bad)
    return out.reshape(np.shape(x0)), out_mom


def l2_step(xa, g, x0, eps, alpha, lo, hi, active):
    """xa + alpha g / ||g||_2 (zero gradient -> zero step), then the L2 ball of radius eps
    around x0, then the box [lo, hi]; per image, where active (else xa).

    Shapes as :func:`linf_step`; eps and alpha are used in float64, as in the reference.
    Equal to ``numpy_backend.l2_step`` (bit for bit in the tests; float tolerance by contract).
    """
    return _step(_l2_kernel, xa, g, x0, eps, alpha, lo, hi, active)


def l1_step(xa, g, x0, eps, alpha, lo, hi, active, sparsity):
    """SLIDE's sparse L1 step (box-aware; the top 1 - sparsity fraction of the masked |g|),
    then the exact L1-ball projection of radius eps around x0 (Duchi et al. 2008,
    sort-based), then the box; per image, where active (else xa).

    Shapes as :func:`linf_step`; sparsity in [0, 1]. Same quantile arithmetic as
    ``reference.projections.steepest_step``, hence the same coordinates; equal to
    ``numpy_backend.l1_step`` (bit for bit in the tests; float tolerance by contract).
    Per image: a quickselect for the quantile (O(D) expected) and a heapsort of the non-zero
    |delta| for the projection (O(D log D)).
    """
    return _step(_l1_kernel, xa, g, x0, eps, alpha, lo, hi, active, check_sparsity(sparsity))


# -- JSMA searches ----------------------------------------------------------------------------

def _select_codegen(op):
    def codegen(context, builder, signature, args):
        a, b = args
        c = builder.fcmp_ordered(op, a, b, flags=("nnan", "nsz"))
        return builder.select(c, a, b, flags=("nnan", "nsz"))
    return codegen


@intrinsic
def _fmin(typingctx, x, y):
    """min(x, y) as an fcmp/select pair carrying the nnan and nsz flags, which LLVM needs to
    vectorise a float min-reduction (numba puts no flags on select). Sound here: the operands
    are never NaN (finite inputs; +inf, or products alpha * beta with alpha in (0, inf] and
    beta in [-inf, 0)), and only the value of the minimum is used, where -0.0 == +0.0."""
    return x(x, y), _select_codegen("<")


@intrinsic
def _fmax(typingctx, x, y):
    """max(x, y), vectorisable as :func:`_fmin` (finite operands)."""
    return x(x, y), _select_codegen(">")


@njit(cache=True)
def _block_min(A, B, ap, bp, lim, inf_d, zero):
    """min over q >= lim of (ap + A[q]) (bp + B[q]) on the admissible q (sum of A > 0, sum
    of B < 0), +inf if none. A, B: contiguous slices (the loop starts at 0, so numba emits no
    wraparound check); branch-free and vectorised through ``_fmin``; the q >= lim mask lets
    a partial first block run as a whole (aligned) block, without a scalar remainder."""
    v = inf_d
    for q in range(A.size):
        al = ap + A[q]
        be = bp + B[q]
        pr = al * be
        ok = (al > zero) & (be < zero) & (q >= lim)
        v = _fmin(v, pr if ok else inf_d)
    return v


@njit(cache=True)
def _first_at(A, B, ap, bp, v, lim, zero):
    """The first q >= lim whose admissible product equals v (from ``_block_min``), or -1."""
    for q in range(lim, A.size):
        al = ap + A[q]
        be = bp + B[q]
        if al > zero and be < zero and al * be == v:
            return q
    return -1


@njit(cache=True)
def _beats(v, p, q, best, bp, bq):
    # lexicographic (value, p, q): the reference's first minimum in row-major (p, q) order
    return v < best or (v == best and (p < bp or (p == bp and q < bq)))


@njit(cache=True)
def _may_beat(lb, p, q0, best, bp, bq):
    # can a pair (p, q >= q0) with value >= lb beat the current best?
    return lb < best or (lb == best and (p < bp or (p == bp and q0 < bq)))


@njit(cache=True)
def _bounds(A, B, amax, bmin, out, inf_d, zero):
    """out[p] = fl(fl(A[p] + amax) * fl(B[p] + bmin)) where A[p] + amax > 0 > B[p] + bmin,
    else +inf: the lower bound on every product of row p against partners with A <= amax and
    B >= bmin (see ``_pair_search``). Branch-free, vectorised (slices, loop from 0)."""
    for p in range(A.size):
        sa = A[p] + amax
        sb = B[p] + bmin
        ok = (sa > zero) & (sb < zero)
        out[p] = sa * sb if ok else inf_d


@njit(cache=True)
def _extremes(A, B):
    """(max A, min B) of a non-empty block, vectorised."""
    amx = A[0]
    bmn = B[0]
    for q in range(A.size):
        amx = _fmax(amx, A[q])
        bmn = _fmin(bmn, B[q])
    return amx, bmn


@njit(cache=True)
def _pair_search(A, B, m, bs, inf_d, zero):
    """The admissible pair i < j < m of the gathered A, B (theta > 0 rule: A_i + A_j > 0,
    B_i + B_j < 0) minimising (A_i + A_j)(B_i + B_j) in the arrays' dtype; ties -> smallest
    i, then j. Returns (i, j), (-1, -1) if none. A, B: length a multiple of bs >= m, padded
    after m with -inf / +inf (never admissible: ap - inf = -inf), so every column block is
    whole. O(m) extra memory.

    Exact branch-and-bound. Rounding to nearest is monotone, so for q in a set with
    Amax >= A_q and Bmin <= B_q: fl(A_p + A_q) <= fl(A_p + Amax) =: SA and
    fl(B_p + B_q) >= fl(B_p + Bmin) =: SB. An admissible pair has 0 < alpha <= SA and
    SB <= beta < 0, so alpha * beta >= SA * SB and, by monotonicity again, its computed
    product is >= fl(SA * SB) =: LB (SA <= 0 or SB >= 0: nothing in the set is admissible).
    The columns are cut into blocks of bs with their max A / min B. A row p (all q > p) or
    one column block of it is skipped when its LB shows that no pair there can beat the
    current best in the (value, p, q) order; otherwise the block's minimum is computed
    (vectorised) and its first minimiser compared (``_beats``: the order in which pairs are
    visited does not matter). The best is seeded with all the pairs of the feature with the
    smallest bound over all partners (on the mlp's Jacobians, almost always the optimum),
    and the row bounds are computed in one vectorised pass, so only the few rows that can
    still win are visited.
    """
    if m < 2:
        return -1, -1
    nb = (m + bs - 1) // bs
    bmax = np.empty(nb, dtype=A.dtype)      # per column block: max A, min B (pads: no effect)
    bmin = np.empty(nb, dtype=A.dtype)
    for k in range(nb):
        bmax[k], bmin[k] = _extremes(A[k * bs:k * bs + bs], B[k * bs:k * bs + bs])
    smax = np.empty(nb, dtype=A.dtype)      # over blocks >= k
    smin = np.empty(nb, dtype=A.dtype)
    smax[nb - 1] = bmax[nb - 1]
    smin[nb - 1] = bmin[nb - 1]
    for k in range(nb - 2, -1, -1):
        smax[k] = max(bmax[k], smax[k + 1])
        smin[k] = min(bmin[k], smin[k + 1])

    # seed: the feature p0 with the smallest bound over all partners; its m - 1 pairs
    lbg = np.empty(m, dtype=A.dtype)
    _bounds(A[:m], B[:m], smax[0], smin[0], lbg, inf_d, zero)
    v0 = inf_d
    for p in range(m):
        v0 = _fmin(v0, lbg[p])
    if not v0 < inf_d:
        return -1, -1                       # no feature has an admissible partner
    p0 = 0
    while lbg[p0] != v0:
        p0 += 1
    a0 = A[p0]
    b0 = B[p0]
    best = inf_d
    bp = -1
    bq = -1
    if p0 > 0:                              # pairs (i, p0), i < p0
        v = _block_min(A[:p0], B[:p0], a0, b0, 0, inf_d, zero)
        if v < inf_d:
            best, bp, bq = v, _first_at(A[:p0], B[:p0], a0, b0, v, 0, zero), p0
    v = _block_min(A[p0 + 1:], B[p0 + 1:], a0, b0, 0, inf_d, zero)   # pairs (p0, j), j > p0
    if v < inf_d:
        j = p0 + 1 + _first_at(A[p0 + 1:], B[p0 + 1:], a0, b0, v, 0, zero)
        if _beats(v, p0, j, best, bp, bq):
            best, bp, bq = v, p0, j

    # row bounds (row p pairs with q > p, i.e. the column blocks >= (p + 1) // bs), then the
    # rows that can still reach the best (best only decreases, so the filter stays valid)
    lbr = lbg                               # reused: row p's bound goes to lbr[p]
    for k in range(nb):
        r0 = max(k * bs - 1, 0)
        r1 = min(k * bs + bs - 1, m - 1)
        if r1 > r0:
            _bounds(A[r0:r1], B[r0:r1], smax[k], smin[k], lbr[r0:r1], inf_d, zero)
    rows = np.empty(m, dtype=np.int64)
    nr = 0
    for p in range(m - 1):
        rows[nr] = p
        nr += 1 if lbr[p] <= best else 0

    lbk = np.empty(nb, dtype=A.dtype)       # row p's bound against each column block
    for t in range(nr):
        p = rows[t]
        if not _may_beat(lbr[p], p, p + 1, best, bp, bq):
            continue
        ap = A[p]
        bpv = B[p]
        kb = (p + 1) // bs
        _bounds(bmax[kb:], bmin[kb:], ap, bpv, lbk[kb:], inf_d, zero)
        for k in range(kb, nb):
            c0 = k * bs
            lim = p + 1 - c0 if p + 1 > c0 else 0      # columns c0 + lim.. are q > p
            if not _may_beat(lbk[k], p, c0 + lim, best, bp, bq):
                continue
            v = _block_min(A[c0:c0 + bs], B[c0:c0 + bs], ap, bpv, lim, inf_d, zero)
            if v < best or (v == best and v < inf_d):
                j = c0 + _first_at(A[c0:c0 + bs], B[c0:c0 + bs], ap, bpv, v, lim, zero)
                if _beats(v, p, j, best, bp, bq):
                    best, bp, bq = v, p, j
    return bp, bq


@njit(cache=True, parallel=True)
def _best_pair_kernel(a, b, domain, negate, bs, inf_d, p_out, q_out, bad):
    n, d = a.shape
    for k in prange(n):
        nbad = 0
        for i in range(d):
            nbad += _nonfinite(a[k, i]) + _nonfinite(b[k, i])
        bad[k] = nbad
        p_out[k] = -1
        q_out[k] = -1
        if nbad:
            continue
        # gather the domain (order kept, so the tie rule is the reference's); theta < 0 is
        # the theta > 0 search on (-a, -b): negation is exact and (-x) + (-y) = -(x + y) in
        # round-to-nearest, so the sign tests flip and every product is unchanged
        size = (d + bs - 1) // bs * bs
        idx = np.empty(d, dtype=np.int64)
        A = np.empty(size, dtype=a.dtype)
        B = np.empty(size, dtype=a.dtype)
        m = 0
        for i in range(d):
            if domain[k, i]:
                idx[m] = i
                A[m] = -a[k, i] if negate else a[k, i]
                B[m] = -b[k, i] if negate else b[k, i]
                m += 1
        end = (m + bs - 1) // bs * bs
        for i in range(m, end):
            A[i] = -inf_d
            B[i] = inf_d
        i, j = _pair_search(A[:end], B[:end], m, bs, inf_d, a.dtype.type(0))
        if i >= 0:
            p_out[k] = idx[i]
            q_out[k] = idx[j]


def _search_args(a, b, domain, theta):
    """(a, b) C-contiguous in their common dtype, domain as bool, theta's sign; as the
    reference's ``_check_search_args`` (finiteness is checked inside the kernels)."""
    a = check_float_array(a, "a", ndim=2, finite=False)
    b = check_float_array(b, "b", ndim=2, finite=False)
    if b.shape != a.shape:
        raise ShapeError(f"a and b must have the same shape (B, n), got {a.shape} and {b.shape}")
    dt = np.result_type(a, b)
    a = np.ascontiguousarray(a, dtype=dt)
    b = np.ascontiguousarray(b, dtype=dt)
    domain = np.asarray(domain)
    if domain.dtype != np.bool_:
        raise AdvkernError(f"domain must be a boolean mask, got dtype {domain.dtype}")
    if domain.shape != a.shape:
        raise ShapeError(f"domain must have the shape of a {a.shape}, got {domain.shape}")
    return a, b, np.ascontiguousarray(domain), _check_theta(theta)


def _raise_nonfinite_ab(a, b, bad):
    if bad.any():
        for arr, name in ((a, "a"), (b, "b")):
            nb = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if nb:
                raise AdvkernError(f"{name} contains {nb} NaN/Inf value(s)")


def jsma_best_pair(a, b, domain, theta):
    """The JSMA pair (Papernot et al. 2016, Algorithm 3) per image, as
    ``reference.jsma.best_pair``: over p < q in the domain, alpha = a_p + a_q,
    beta = b_p + b_q (in the dtype of a and b), admissible when alpha > 0 > beta (theta > 0)
    or alpha < 0 < beta (theta < 0), maximising -alpha * beta (minimising alpha * beta);
    ties -> smallest p, then smallest q.

    a, b: (N, n) float32/64; domain: (N, n) bool; theta: non-zero (its sign is used).
    Returns p, q: (N,) int64 (-1 where not found) and found (N,) bool. Images in parallel;
    O(n) memory per image; exact pruned search (``_pair_search``).
    """
    a, b, domain, theta = _search_args(a, b, domain, theta)
    n = len(a)
    p = np.empty(n, dtype=np.int64)
    q = np.empty(n, dtype=np.int64)
    bad = np.zeros(n, dtype=np.int64)
    _best_pair_kernel(a, b, domain, theta < 0, PAIR_BLOCK, a.dtype.type(np.inf), p, q, bad)
    _raise_nonfinite_ab(a, b, bad)
    return p, q, p >= 0


@njit(cache=True)
def _best_feature_kernel(a, b, domain, negate, i_out, bad):
    n, d = a.shape
    for k in range(n):                        # O(n) per image: not worth a parallel region
        nbad = 0
        best = np.inf
        bi = -1
        for i in range(d):
            ai = a[k, i]
            bi_ = b[k, i]
            nbad += _nonfinite(ai) + _nonfinite(bi_)
            if negate:
                ok = ai < 0 and bi_ > 0
            else:
                ok = ai > 0 and bi_ < 0
            if ok and domain[k, i]:
                pr = ai * bi_                   # in the arrays' dtype; exact in float64 below
                if pr < best:
                    best = pr
                    bi = i
        bad[k] = nbad
        i_out[k] = bi if nbad == 0 else -1


def jsma_best_feature(a, b, domain, theta):
    """The single-feature JSMA choice (Papernot et al. 2016, Eq. 8-9) per image, as
    ``reference.jsma.best_feature``: the domain feature with a_i > 0 > b_i (theta > 0; flipped
    for theta < 0) maximising -a_i b_i (product in the dtype of a and b), ties -> smallest i.

    a, b: (N, n) float32/64; domain: (N, n) bool. Returns i (N,) int64 (-1 where not found)
    and found (N,) bool. O(n) per image, images in parallel.
    """
    a, b, domain, theta = _search_args(a, b, domain, theta)
    n = len(a)
    i = np.empty(n, dtype=np.int64)
    bad = np.zeros(n, dtype=np.int64)
    _best_feature_kernel(a, b, domain, theta < 0, i, bad)
    _raise_nonfinite_ab(a, b, bad)
    return i, i >= 0
