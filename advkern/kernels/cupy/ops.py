"""The ``cupy`` backend's custom kernels: the ops interface of ``advkern.kernels._gpu``.

Every kernel is CUDA C in a module-level string, compiled by NVRTC through ``cupy.RawKernel``
on first use and cached per (kernel, dtype) (``_kernel``; CuPy also caches the binary on
disk). One source serves both dtypes: a prelude defines ``T`` as ``float`` or ``double`` and
the math the kernels need under dtype-neutral names (``t_exp`` is ``expf`` or ``exp``, ...).
GEMMs are not here: the shared driver calls ``xp.matmul`` (cuBLAS).

Bit-exactness. The kernels the contract wants bit for bit with the NumPy reference (linf_step,
de_step, jsma_pair, jsma_feature, and l2_step, whose clip and casts are the reference's) are
compiled with ``--fmad=false``: NVRTC would otherwise contract a + F * (b - c) into one FMA,
which rounds once instead of twice. They also copy numpy's clip exactly: NaN propagates, and
on a tie (only +0 vs -0 can tie unequal bits) ``np.clip`` with array bounds returns the bound
while with scalar bounds it returns the value (``clip_b`` / ``clip_x``; measured on numpy
2.4, as numba_cpu's kernels also found). The other kernels need float tolerance only.

Launches (``_THREADS`` = 256 threads per block everywhere):

* elementwise kernels (bias_act, act_grad, im2col, col2im, maxpool_fwd / _bwd, linf_step,
  de_step, the DE patches; the losses with one thread per row): one thread per output
  element in a 64-bit grid-stride loop (N * P * F * HO * WO reaches 5e10), grid =
  min(ceil(n / 256), 32 * SMs). They are memory-bound: 8 resident 256-thread blocks fill an
  H200 SM's 2048 threads, and capping the grid at 32 blocks per SM (4 waves of 8) keeps the
  tail short without launching hundreds of millions of blocks for the largest outputs.
  col2im and maxpool_bwd are gathers (one thread per input pixel, looping over the taps or
  windows that reach it): no atomics, the reference's order of additions, the same bits
  every run.
* per-image kernels (l2_step, jsma_pair, jsma_feature): one 256-thread block per image, a
  block-wide tree reduction in shared memory; thousands of images give each SM several
  blocks, and each block streams its image's rows (coalesced, strided by 256).

Nothing here synchronises or copies to the host: shapes are checked from array metadata only.

``cupy`` comes from ``._cupy_module``: the real CuPy, or with ``ADVKERN_CUPY_EMULATOR=1`` the
CPU emulator (``._emulator``), which runs this CUDA C as host C++ (g++) on NumPy arrays and
under which grids are capped at 2 blocks.
"""

import numpy as np

from ...errors import AdvkernError, ShapeError
from ._cupy_module import EMULATED, cupy

__all__ = ["count_nonfinite", "bias_act", "act_grad", "im2col", "col2im", "maxpool_fwd", "maxpool_bwd",
           "softmax_xent", "cw_margin", "linf_step", "l2_step", "jsma_pair", "jsma_feature",
           "de_step", "de_patch_dense", "de_patch_conv"]

_THREADS = 256          # also the size of the shared reduction arrays in the CUDA source
# Under the CPU emulator (one emulated SM) at most 2 blocks, as numba_cuda's simulator: the
# grid-stride loops then loop from 513 elements on, which the tests' small arrays reach.
_BLOCKS_PER_SM = 2 if EMULATED else 32
_ACT_CODES = {"none": 0, "relu": 1, "tanh": 2, "sigmoid": 3}

# -- CUDA C sources ---------------------------------------------------------------------------

_PRELUDE = {
    "float": r"""
typedef float T;
__device__ __forceinline__ float t_exp(float v) { return expf(v); }
__device__ __forceinline__ float t_log1p(float v) { return log1pf(v); }
__device__ __forceinline__ float t_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ float t_floor(float v) { return floorf(v); }
__device__ __forceinline__ float t_neg_inf() { return __int_as_float((int)0xff800000); }
""",
    "double": r"""
typedef double T;
__device__ __forceinline__ double t_exp(double v) { return exp(v); }
__device__ __forceinline__ double t_log1p(double v) { return log1p(v); }
__device__ __forceinline__ double t_tanh(double v) { return tanh(v); }
__device__ __forceinline__ double t_floor(double v) { return floor(v); }
__device__ __forceinline__ double t_neg_inf() {
    return __longlong_as_double(0xfff0000000000000ULL);
}
""",
}

_COMMON = r"""
#define GRID_STRIDE(e, n) \
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < (n); \
         e += (long long)blockDim.x * gridDim.x)

// np.clip with ARRAY bounds (numpy's SIMD max then min): NaN propagates from any operand and
// on a tie (+0 vs -0) the bound wins.
__device__ __forceinline__ T max_b(T a, T b) { return (a != a || a > b) ? a : b; }
__device__ __forceinline__ T min_b(T a, T b) { return (a != a || a < b) ? a : b; }
__device__ __forceinline__ T clip_b(T v, T lo, T hi) { return min_b(max_b(v, lo), hi); }

// np.clip with SCALAR bounds: NaN propagates, on a tie the value wins.
__device__ __forceinline__ T max_x(T a, T b) { return (b != b) ? b : ((a < b) ? b : a); }
__device__ __forceinline__ T min_x(T a, T b) { return (b != b) ? b : ((b < a) ? b : a); }
__device__ __forceinline__ T clip_x(T v, T lo, T hi) { return min_x(max_x(v, lo), hi); }
"""

_SRC = {}

_SRC["bias_act"] = r"""
extern "C" __global__ void bias_act(T* y, const T* b, long long n, long long inner,
                                    long long nb, int has_bias, int act) {
    GRID_STRIDE(e, n) {
        T v = y[e];
        if (has_bias) v = v + b[(e / inner) % nb];
        if (act == 1) v = v > (T)0 ? v : (T)0;          // NaN -> 0, as np.where(x > 0, x, 0)
        else if (act == 2) v = t_tanh(v);
        else if (act == 3) v = (T)1 / ((T)1 + t_exp(-v));
        y[e] = v;
    }
}
"""

_SRC["act_grad"] = r"""
extern "C" __global__ void act_grad(T* d, const T* o, long long n, int act) {
    GRID_STRIDE(e, n) {
        T dv = d[e];
        const T ov = o[e];
        // The reference's expressions and order: where(o > 0, d, 0), d * (1 - o*o),
        // (d * o) * (1 - o).
        if (act == 1) dv = ov > (T)0 ? dv : (T)0;
        else if (act == 2) dv = dv * ((T)1 - ov * ov);
        else if (act == 3) dv = dv * ov * ((T)1 - ov);
        d[e] = dv;
    }
}
"""

_SRC["im2col"] = r"""
extern "C" __global__ void im2col(const T* x, T* out, long long total, long long C,
                                  long long H, long long W, long long kh, long long kw,
                                  long long sh, long long sw, long long pt, long long pl,
                                  long long ho, long long wo) {
    const long long L = ho * wo, R = C * kh * kw;
    GRID_STRIDE(e, total) {                 // e = (n*R + row)*L + col: writes coalesced
        const long long col = e % L, t = e / L;
        const long long row = t % R, n = t / R;
        const long long i = col / wo, j = col % wo;
        const long long v = row % kw, u = (row / kw) % kh, c = row / (kw * kh);
        const long long y = i * sh + u - pt, xx = j * sw + v - pl;
        out[e] = (y >= 0 && y < H && xx >= 0 && xx < W) ? x[((n * C + c) * H + y) * W + xx]
                                                         : (T)0;
    }
}
"""

_SRC["col2im"] = r"""
extern "C" __global__ void col2im(const T* dcols, T* out, long long total, long long C,
                                  long long H, long long W, long long kh, long long kw,
                                  long long sh, long long sw, long long pt, long long pl,
                                  long long ho, long long wo) {
    const long long L = ho * wo, R = C * kh * kw;
    GRID_STRIDE(e, total) {                 // e = ((n*C + c)*H + y)*W + x: one input pixel
        const long long x = e % W, t = e / W;
        const long long y = t % H, c = (t / H) % C, n = t / (H * C);
        const T* src = dcols + n * R * L;
        T acc = (T)0;
        // Taps in the reference's order (u, then v), so the sum rounds as its scatter-adds.
        for (long long u = 0; u < kh; ++u) {
            const long long ys = y + pt - u;
            if (ys < 0) break;              // only decreases as u grows
            if (ys % sh) continue;
            const long long i = ys / sh;
            if (i >= ho) continue;
            for (long long v = 0; v < kw; ++v) {
                const long long xs = x + pl - v;
                if (xs < 0) break;
                if (xs % sw) continue;
                const long long j = xs / sw;
                if (j >= wo) continue;
                acc = acc + src[((c * kh + u) * kw + v) * L + i * wo + j];
            }
        }
        out[e] = acc;
    }
}
"""

_SRC["maxpool_fwd"] = r"""
extern "C" __global__ void maxpool_fwd(const T* x, T* out, int* arg, long long total,
                                       long long H, long long W, long long kh, long long kw,
                                       long long sh, long long sw, long long ho,
                                       long long wo) {
    GRID_STRIDE(e, total) {                 // e = (nc*ho + i)*wo + j: one window
        const long long j = e % wo, t = e / wo;
        const long long i = t % ho, nc = t / ho;
        const T* src = x + nc * H * W + (i * sh) * W + j * sw;
        T best = src[0];
        int a = 0;
        // np.argmax: the first maximum in row-major order (replace only on >), and the first
        // NaN if there is one (nothing replaces a NaN).
        for (int tap = 1; tap < (int)(kh * kw) && best == best; ++tap) {
            const T v = src[(tap / kw) * W + tap % kw];
            if (v > best || v != v) { best = v; a = tap; }
        }
        out[e] = best;
        arg[e] = a;
    }
}
"""

_SRC["maxpool_bwd"] = r"""
extern "C" __global__ void maxpool_bwd(const T* dout, const int* arg, T* dx, long long total,
                                       long long H, long long W, long long kh, long long kw,
                                       long long sh, long long sw, long long ho,
                                       long long wo) {
    GRID_STRIDE(e, total) {                 // e = (nc*H + y)*W + x: one input pixel
        const long long x = e % W, t = e / W;
        const long long y = t % H, nc = t / H;
        const T* g = dout + nc * ho * wo;
        const int* am = arg + nc * ho * wo;
        T acc = (T)0;
        // Windows (possibly overlapping) in the reference's order of taps (u, then v).
        for (long long u = 0; u < kh; ++u) {
            const long long ys = y - u;
            if (ys < 0) break;
            if (ys % sh) continue;
            const long long i = ys / sh;
            if (i >= ho) continue;
            for (long long v = 0; v < kw; ++v) {
                const long long xs = x - v;
                if (xs < 0) break;
                if (xs % sw) continue;
                const long long j = xs / sw;
                if (j >= wo) continue;
                if (am[i * wo + j] == (int)(u * kw + v)) acc = acc + g[i * wo + j];
            }
        }
        dx[e] = acc;
    }
}
"""

# Row k of the logits as the reference reads them: K == 1 is the two-class row (0, z).
_ZEXT = r"""
__device__ __forceinline__ T zext(const T* zr, long long K, long long k) {
    return K == 1 ? (k == 0 ? (T)0 : zr[0]) : zr[k];
}
"""

_SRC["softmax_xent"] = _ZEXT + r"""
extern "C" __global__ void softmax_xent(const T* z, const long long* labels, T* values,
                                        T* dz, long long N, long long K, int want_dz) {
    const long long KE = K == 1 ? 2 : K;
    GRID_STRIDE(n, N) {                     // one row per thread: K is ~10
        const T* zr = z + n * K;
        const long long y = labels[n];
        // top = np.argmax: the first maximum, or the first NaN
        long long top = 0;
        T zt = zext(zr, K, 0);
        for (long long k = 1; k < KE && zt == zt; ++k) {
            const T v = zext(zr, K, k);
            if (v > zt || v != v) { zt = v; top = k; }
        }
        // reference.losses.log_softmax: s = z - z_top, lse = log1p(sum_{k != top} exp(s_k))
        T sum = (T)0, sy = (T)0;
        for (long long k = 0; k < KE; ++k) {
            const T s = zext(zr, K, k) - zt;
            if (k != top) sum = sum + t_exp(s);
            if (k == y) sy = s;
        }
        const T lse = t_log1p(sum);
        values[n] = lse - sy;               // -(s_y - lse), exactly
        if (!want_dz) continue;
        if (K == 1) {                       // d/dz of the second column only
            dz[n] = t_exp((zext(zr, K, 1) - zt) - lse) - (y == 1 ? (T)1 : (T)0);
        } else {
            for (long long k = 0; k < K; ++k)
                dz[n * K + k] = t_exp((zr[k] - zt) - lse) - (k == y ? (T)1 : (T)0);
        }
    }
}
"""

_SRC["cw_margin"] = _ZEXT + r"""
extern "C" __global__ void cw_margin(const T* z, const long long* labels, T* values, T* dz,
                                     long long N, long long K, int want_dz) {
    const long long KE = K == 1 ? 2 : K;
    GRID_STRIDE(n, N) {
        const T* zr = z + n * K;
        const long long y = labels[n];
        // reference.losses.margin: argmax of z with z_y set to -inf (first max / first NaN;
        // when every other class is -inf this can return y itself, as numpy does)
        long long j = 0;
        T bj = y == 0 ? t_neg_inf() : zext(zr, K, 0);
        for (long long k = 1; k < KE && bj == bj; ++k) {
            const T v = k == y ? t_neg_inf() : zext(zr, K, k);
            if (v > bj || v != v) { bj = v; j = k; }
        }
        T zy = (T)0;
        for (long long k = 0; k < KE; ++k)
            if (k == y) zy = zext(zr, K, k);
        values[n] = zext(zr, K, j) - zy;
        if (!want_dz) continue;
        // d[j] = 1 first, then d[y] = -1 (y wins if j == y)
        if (K == 1) {
            dz[n] = y == 1 ? (T)-1 : (j == 1 ? (T)1 : (T)0);
        } else {
            for (long long k = 0; k < K; ++k)
                dz[n * K + k] = k == y ? (T)-1 : (k == j ? (T)1 : (T)0);
        }
    }
}
"""

_SRC["count_nonfinite"] = r"""
extern "C" __global__ void count_nonfinite(const T* a, const T* b, const T* c, long long n,
                                           int count_c, unsigned long long* total) {
    GRID_STRIDE(e, n) {
        // One atomic per NaN/Inf element: none on the inputs of a sound attack.
        bool bad = !isfinite(a[e]) || !isfinite(b[e]) || (count_c && !isfinite(c[e]));
        if (bad) atomicAdd(total, 1ULL);
    }
}
"""

_SRC["linf_step"] = r"""
extern "C" __global__ void linf_step(const T* xa, const T* g, const T* x0, const T* eps,
                                     const T* alpha, T lo, T hi, const bool* active, T* out,
                                     long long total, long long D) {
    GRID_STRIDE(e, total) {
        const long long n = e / D;
        const T xv = xa[e];
        if (!active[n]) { out[e] = xv; continue; }
        const T gv = g[e];
        // np.sign: +-1, +0 for +-0, NaN for NaN
        const T sg = gv > (T)0 ? (T)1 : (gv < (T)0 ? (T)-1 : (gv == gv ? (T)0 : gv));
        const T t = alpha[n] * sg;          // steepest_step, cast to dt
        T v = xv + t;                       // x_adv = xa + step
        const T x0v = x0[e], ev = eps[n];
        v = clip_b(v, x0v - ev, x0v + ev);  // project: np.clip(x_adv, x - e, x + e)
        out[e] = clip_x(v, lo, hi);         // then np.clip(., lo, hi)
    }
}
"""

_SRC["l2_step"] = r"""
// Block reductions over blockDim.x == 256 threads (a power of two); red is reused, so each
// ends with a barrier after every thread has read the result.
__device__ double block_sum(double v, double* red) {
    const int t = threadIdx.x;
    red[t] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) red[t] = red[t] + red[t + s];
        __syncthreads();
    }
    const double r = red[0];
    __syncthreads();
    return r;
}

// NaN-propagating max (numpy's max does propagate NaN).
__device__ __forceinline__ double dmax(double a, double b) { return (a != a || a > b) ? a : b; }

__device__ double block_max(double v, double* red) {
    const int t = threadIdx.x;
    red[t] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s) red[t] = dmax(red[t], red[t + s]);
        __syncthreads();
    }
    const double r = red[0];
    __syncthreads();
    return r;
}

// delta = x_adv - x0 with x_adv = xa + step, each rounded to dt as the reference does:
// steepest_step returns (g * scale).astype(dt) (scale float64), project takes x_adv - x.
__device__ __forceinline__ T l2_delta(T xv, T gv, T x0v, double scale) {
    const T s = (T)((double)gv * scale);
    const T nw = xv + s;
    return nw - x0v;
}

extern "C" __global__ void l2_step(const T* xa, const T* g, const T* x0, const double* eps,
                                   const double* alpha, T lo, T hi, const bool* active,
                                   T* out, long long D) {
    __shared__ double red[256];
    const long long n = blockIdx.x;         // one block per image
    const T* xr = xa + n * D;
    const T* gr = g + n * D;
    const T* x0r = x0 + n * D;
    T* orow = out + n * D;
    const long long t0 = threadIdx.x, stride = blockDim.x;
    if (!active[n]) {                       // uniform over the block: no barrier is skipped
        for (long long i = t0; i < D; i += stride) orow[i] = xr[i];
        return;
    }
    // ||g||: reference.projections.l2_norms in float64, m * sqrt(sum((v / m)^2)), divided by
    // 1 instead of m when m is not > 0
    double m = 0.0;
    for (long long i = t0; i < D; i += stride) m = dmax(m, fabs((double)gr[i]));
    m = block_max(m, red);
    double safe = m > 0.0 ? m : 1.0;
    double ss = 0.0;
    for (long long i = t0; i < D; i += stride) {
        const double q = (double)gr[i] / safe;
        ss = ss + q * q;
    }
    ss = block_sum(ss, red);
    const double ng = m * sqrt(ss);
    const double scale = ng > 0.0 ? alpha[n] / ng : 0.0;   // zero gradient: no step
    // ||d||, d recomputed in each pass (the same operations, so the same bits)
    double md = 0.0;
    for (long long i = t0; i < D; i += stride)
        md = dmax(md, fabs((double)l2_delta(xr[i], gr[i], x0r[i], scale)));
    md = block_max(md, red);
    safe = md > 0.0 ? md : 1.0;
    double sd = 0.0;
    for (long long i = t0; i < D; i += stride) {
        const double q = (double)l2_delta(xr[i], gr[i], x0r[i], scale) / safe;
        sd = sd + q * q;
    }
    sd = block_sum(sd, red);
    const double nd = md * sqrt(sd);
    const double ev = eps[n];
    const double factor = nd > ev ? ev / nd : 1.0;   // project_l2: only outside the ball
    for (long long i = t0; i < D; i += stride) {
        const T d = l2_delta(xr[i], gr[i], x0r[i], scale);
        const T pd = (T)((double)d * factor);        // (delta * factor).astype(dt)
        orow[i] = clip_x(x0r[i] + pd, lo, hi);       // np.clip(x + P(delta), lo, hi)
    }
}
"""

_SRC["jsma_pair"] = r"""
// (v1, p1, q1) before (v2, p2, q2): any candidate (p >= 0) beats none, then the smaller
// product, then the smaller p, then the smaller q. -0 == +0 ties, as in np.argmin.
__device__ __forceinline__ bool pair_before(T v1, long long p1, long long q1,
                                            T v2, long long p2, long long q2) {
    if (p1 < 0) return false;
    if (p2 < 0) return true;
    if (v1 < v2) return true;
    if (v2 < v1) return false;
    return p1 < p2 || (p1 == p2 && q1 < q2);
}

extern "C" __global__ void jsma_pair(const T* a, const T* b, const bool* domain, int positive,
                                     long long D, long long* P, long long* Q, bool* found) {
    __shared__ T sv[256];
    __shared__ long long sp[256];
    __shared__ long long sq[256];
    const long long n = blockIdx.x;         // one block per image
    const T* ar = a + n * D;
    const T* br = b + n * D;
    const bool* dr = domain + n * D;
    T bv = (T)0;
    long long bp = -1, bq = -1;
    // Thread t owns the rows p = t, t + 256, ...; p and q only grow, so keeping the first
    // strict minimum is the lexicographic min of the rows this thread saw.
    for (long long p = threadIdx.x; p < D - 1; p += blockDim.x) {
        if (!dr[p]) continue;
        const T ap = ar[p], bpv = br[p];
        for (long long q = p + 1; q < D; ++q) {
            if (!dr[q]) continue;
            const T al = ap + ar[q];
            const T be = bpv + br[q];
            const bool ok = positive ? (al > (T)0 && be < (T)0) : (al < (T)0 && be > (T)0);
            if (!ok) continue;
            const T v = al * be;            // minimised: -alpha * beta is maximised
            if (bp < 0 || v < bv) { bv = v; bp = p; bq = q; }
        }
    }
    const int t = threadIdx.x;
    sv[t] = bv; sp[t] = bp; sq[t] = bq;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s && pair_before(sv[t + s], sp[t + s], sq[t + s], sv[t], sp[t], sq[t])) {
            sv[t] = sv[t + s]; sp[t] = sp[t + s]; sq[t] = sq[t + s];
        }
        __syncthreads();
    }
    if (t == 0) {
        P[n] = sp[0];                       // -1, -1 when nothing was admissible
        Q[n] = sq[0];
        found[n] = sp[0] >= 0;
    }
}
"""

_SRC["jsma_feature"] = r"""
__device__ __forceinline__ bool feat_before(T v1, long long i1, T v2, long long i2) {
    if (i1 < 0) return false;
    if (i2 < 0) return true;
    if (v1 < v2) return true;
    if (v2 < v1) return false;
    return i1 < i2;
}

extern "C" __global__ void jsma_feature(const T* a, const T* b, const bool* domain,
                                        int positive, long long D, long long* I,
                                        bool* found) {
    __shared__ T sv[256];
    __shared__ long long si[256];
    const long long n = blockIdx.x;         // one block per image
    const T* ar = a + n * D;
    const T* br = b + n * D;
    const bool* dr = domain + n * D;
    T bv = (T)0;
    long long best = -1;
    for (long long i = threadIdx.x; i < D; i += blockDim.x) {
        if (!dr[i]) continue;
        const T ai = ar[i], bi = br[i];
        const bool ok = positive ? (ai > (T)0 && bi < (T)0) : (ai < (T)0 && bi > (T)0);
        if (!ok) continue;
        const T v = ai * bi;                // minimised: -a * b is maximised
        if (best < 0 || v < bv) { bv = v; best = i; }
    }
    const int t = threadIdx.x;
    sv[t] = bv; si[t] = best;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (t < s && feat_before(sv[t + s], si[t + s], sv[t], si[t])) {
            sv[t] = sv[t + s]; si[t] = si[t + s];
        }
        __syncthreads();
    }
    if (t == 0) {
        I[n] = si[0];
        found[n] = si[0] >= 0;
    }
}
"""

_SRC["de_step"] = r"""
extern "C" __global__ void de_step(const T* pop, const long long* r1, const long long* r2,
                                   const long long* r3, const double* cross,
                                   const long long* forced, T f, double cr, int use_cross,
                                   const T* lower, const T* upper, T* out, long long P,
                                   long long dim, long long total) {
    GRID_STRIDE(e, total) {                 // e = (n*P + p)*dim + d
        const long long d = e % dim, np_ = e / dim, n = np_ / P;
        const T* base = pop + n * P * dim;
        // reference.pixel.de_step: pop[r1] + f * (pop[r2] - pop[r3]) in dt, unfused
        const T diff = base[r2[np_] * dim + d] - base[r3[np_] * dim + d];
        const T prod = f * diff;
        T v = base[r1[np_] * dim + d] + prod;
        // crossover: cross (float64 draws) < CR compared in float64, or the forced coordinate
        if (use_cross && !(cross[e] < cr || d == forced[np_])) v = pop[e];
        out[e] = clip_b(v, lower[d], upper[d]);   // np.clip with (dim,) array bounds
    }
}
"""

# Pixel j of a candidate (row, col, v_1..v_C): its coordinates as reference.pixel's
# np.clip(np.floor(v), 0, size - 1).astype(intp); the integer clamp after the cast only keeps
# a NaN (undefined for the reference as well) inside the image.
_PIXELS = r"""
__device__ __forceinline__ long long pix_coord(T v, long long size) {
    const long long r = (long long)clip_x(t_floor(v), (T)0, (T)(size - 1));
    return r < 0 ? 0 : (r > size - 1 ? size - 1 : r);
}

// Whether a later pixel of the candidate lands on (r, s): later pixels win.
__device__ __forceinline__ bool overwritten(const T* cand, long long j, long long k,
                                            long long S, long long H, long long W,
                                            long long r, long long s) {
    for (long long j2 = j + 1; j2 < k; ++j2)
        if (pix_coord(cand[j2 * S], H) == r && pix_coord(cand[j2 * S + 1], W) == s)
            return true;
    return false;
}
"""

_SRC["de_patch_dense"] = _PIXELS + r"""
extern "C" __global__ void de_patch_dense(const T* base, const T* w, const T* x, const T* pop,
                                          T* out, long long total, long long P, long long M,
                                          long long C, long long H, long long W,
                                          long long k) {
    const long long S = 2 + C;
    GRID_STRIDE(e, total) {                 // e = (n*P + p)*M + m: w reads coalesced over m
        const long long m = e % M, cp = e / M, n = cp / P;
        const T* cand = pop + cp * k * S;
        const T* xn = x + n * C * H * W;
        T acc = base[n * M + m];
        for (long long j = 0; j < k; ++j) {
            const long long r = pix_coord(cand[j * S], H), s = pix_coord(cand[j * S + 1], W);
            if (overwritten(cand, j, k, S, H, W, r, s)) continue;
            for (long long c = 0; c < C; ++c) {
                const long long at = (c * H + r) * W + s;        // flat input feature
                acc = acc + (cand[j * S + 2 + c] - xn[at]) * w[at * M + m];
            }
        }
        out[e] = acc;
    }
}
"""

_SRC["de_patch_conv"] = _PIXELS + r"""
extern "C" __global__ void de_patch_conv(const T* base, const T* w, const T* x, const T* pop,
                                         T* out, long long total, long long P, long long F,
                                         long long HO, long long WO, long long C, long long H,
                                         long long W, long long KH, long long KW,
                                         long long sh, long long sw, long long pt,
                                         long long pl, long long k) {
    const long long S = 2 + C, L = HO * WO;
    GRID_STRIDE(e, total) {                 // e = ((n*P + p)*F + f)*L + i*WO + jj
        const long long o = e % L, t = e / L;
        const long long f = t % F, cp = t / F, n = cp / P;
        const long long i = o / WO, jj = o % WO;
        const T* cand = pop + cp * k * S;
        const T* xn = x + n * C * H * W;
        T acc = base[(n * F + f) * L + o];
        for (long long j = 0; j < k; ++j) {
            const long long r = pix_coord(cand[j * S], H), s = pix_coord(cand[j * S + 1], W);
            const long long u = r + pt - i * sh, v = s + pl - jj * sw;   // the tap reading it
            if (u < 0 || u >= KH || v < 0 || v >= KW) continue;
            if (overwritten(cand, j, k, S, H, W, r, s)) continue;
            for (long long c = 0; c < C; ++c)
                acc = acc + (cand[j * S + 2 + c] - xn[(c * H + r) * W + s])
                            * w[((f * C + c) * KH + u) * KW + v];
        }
        out[e] = acc;
    }
}
"""

# Kernels whose results the contract wants bit for bit: no FMA contraction.
_EXACT = frozenset({"linf_step", "l2_step", "jsma_pair", "jsma_feature", "de_step"})

_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def _source(name, dtype):
    """The full CUDA C source of kernel ``name`` for ``dtype`` (float32 or float64)."""
    return _PRELUDE[_CTYPES[np.dtype(dtype)]] + _COMMON + _SRC[name]


def _compile_options(name):
    return ("--fmad=false",) if name in _EXACT else ()


# -- compilation and launch ---------------------------------------------------------------------

_kernels = {}
_max_blocks_by_device = {}


def _kernel(name, dt):
    """The RawKernel of ``name`` for dtype dt, built on first use (NVRTC compiles it at the
    first launch; CuPy keeps the binary in its disk cache)."""
    key = (name, dt)
    k = _kernels.get(key)
    if k is None:
        k = cupy.RawKernel(_source(name, dt), name, options=_compile_options(name))
        _kernels[key] = k
    return k


def _max_blocks():
    dev = cupy.cuda.runtime.getDevice()
    b = _max_blocks_by_device.get(dev)
    if b is None:
        try:
            sms = int(cupy.cuda.runtime.getDeviceProperties(dev)["multiProcessorCount"])
        except Exception:           # attribute lookup only sizes the grid: fall back safely
            sms = 132
        b = _BLOCKS_PER_SM * max(sms, 1)
        _max_blocks_by_device[dev] = b
    return b


def _launch_elementwise(name, dt, n, args):
    """One thread per element, 64-bit grid-stride (see the module docstring)."""
    if n <= 0:
        return
    blocks = min(-(-n // _THREADS), _max_blocks())
    _kernel(name, dt)((blocks,), (_THREADS,), args)


def _launch_per_image(name, dt, n, args):
    """One 256-thread block per image (the block reductions assume blockDim.x == 256)."""
    if n <= 0:
        return
    _kernel(name, dt)((int(n),), (_THREADS,), args)


# -- argument checks (metadata only: nothing here touches device memory) -----------------------

def _i64(v):
    return np.int64(int(v))


def _float_dtype(a, name):
    dt = np.dtype(a.dtype)
    if dt not in _CTYPES:
        raise AdvkernError(f"{name} must be float32 or float64, got dtype {dt}")
    return dt


def _input(a, dtype=None):
    """An input as a C-contiguous device array (a no-op when it already is one)."""
    return cupy.ascontiguousarray(a, dtype=dtype)


def _output(a, name, shape, dtype):
    """``out`` arguments are written in place, so they must be exactly what is asked for."""
    if tuple(a.shape) != tuple(shape):
        raise ShapeError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    if np.dtype(a.dtype) != np.dtype(dtype):
        raise AdvkernError(f"{name} must have dtype {np.dtype(dtype)}, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ShapeError(f"{name} must be C-contiguous")
    return a


def _same(a, dt, shape, name):
    a = _input(a, dt)
    if tuple(a.shape) != tuple(shape):
        raise ShapeError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    return a


def _act_code(act):
    try:
        return _ACT_CODES[act]
    except KeyError:
        raise AdvkernError(f"unknown activation {act!r}") from None


# -- checks -------------------------------------------------------------------------------------

def count_nonfinite(a, b, c=None):
    """A device uint64 (1,): the number of positions where a, b or c (same size) hold a
    NaN/Inf. One pass over the three arrays; the caller reads it once."""
    dt = _float_dtype(a, "a")
    a, b = _input(a), _input(b, dt)
    c = a if c is None else _input(c, dt)
    total = cupy.zeros(1, np.uint64)
    # 256 threads, grid-stride over the elements: three reads each, memory-bound.
    _launch_elementwise("count_nonfinite", dt, a.size,
                        (a, b, c, _i64(a.size), np.int32(c is not a), total))
    return total


# -- layers -------------------------------------------------------------------------------------

def bias_act(y, b, inner, act):
    """In place: y.flat[i] = act(y.flat[i] + b[(i // inner) % b.size]) (b None: no bias)."""
    code = _act_code(act)
    if b is None and code == 0:
        return
    dt = _float_dtype(y, "y")
    _output(y, "y", y.shape, dt)
    if b is None:
        bb, nb, has = y, 1, 0           # never read: has_bias = 0
    else:
        bb = _input(b, dt)
        nb, has = bb.size, 1
        if nb == 0:
            raise ShapeError("bias must not be empty")
    inner = int(inner)
    if inner < 1:
        raise ShapeError(f"inner must be >= 1, got {inner}")
    # 256 threads, grid-stride over y: elementwise and memory-bound (one read, one write).
    _launch_elementwise("bias_act", dt, y.size,
                        (y, bb, _i64(y.size), _i64(inner), _i64(nb), np.int32(has),
                         np.int32(code)))


def act_grad(d, out, act):
    """In place: d *= act'(.) from the activation's output ``out`` (same shape as d)."""
    code = _act_code(act)
    if code == 0:
        return
    dt = _float_dtype(d, "d")
    _output(d, "d", d.shape, dt)
    o = _same(out, dt, d.shape, "out")
    # 256 threads, grid-stride over d: elementwise, memory-bound (two reads, one write).
    _launch_elementwise("act_grad", dt, d.size, (d, o, _i64(d.size), np.int32(code)))


def im2col(x, kh, kw, sh, sw, pt, pl, ho, wo, out):
    """x (N, C, H, W) -> out (N, C*kh*kw, ho*wo), zero outside the image."""
    dt = _float_dtype(x, "x")
    x = _input(x)
    if x.ndim != 4:
        raise ShapeError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    _output(out, "out", (n, c * kh * kw, ho * wo), dt)
    # 256 threads, one per column entry: consecutive threads write consecutive outputs.
    _launch_elementwise("im2col", dt, out.size,
                        (x, out, _i64(out.size), _i64(c), _i64(h), _i64(w), _i64(kh),
                         _i64(kw), _i64(sh), _i64(sw), _i64(pt), _i64(pl), _i64(ho),
                         _i64(wo)))


def col2im(dcols, h, w, kh, kw, sh, sw, pt, pl, ho, wo, out):
    """The adjoint of im2col, as a gather: out (N, C, H, W)."""
    dt = _float_dtype(out, "out")
    if out.ndim != 4 or tuple(out.shape[2:]) != (h, w):
        raise ShapeError(f"out must be (N, C, {h}, {w}), got shape {tuple(out.shape)}")
    n, c = out.shape[:2]
    _output(out, "out", out.shape, dt)
    dcols = _same(dcols, dt, (n, c * kh * kw, ho * wo), "dcols")
    # 256 threads, one per input pixel (a gather of <= kh*kw taps: no atomics).
    _launch_elementwise("col2im", dt, out.size,
                        (dcols, out, _i64(out.size), _i64(c), _i64(h), _i64(w), _i64(kh),
                         _i64(kw), _i64(sh), _i64(sw), _i64(pt), _i64(pl), _i64(ho),
                         _i64(wo)))


def maxpool_fwd(x, kh, kw, sh, sw, out, arg):
    """x (N, C, H, W) -> out (N, C, HO, WO) window max, arg (int32) its first tap u*kw + v."""
    dt = _float_dtype(x, "x")
    x = _input(x)
    if x.ndim != 4:
        raise ShapeError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if out.ndim != 4:
        raise ShapeError(f"out must be (N, C, HO, WO), got shape {tuple(out.shape)}")
    ho, wo = out.shape[2:]
    if out.size and ((ho - 1) * sh + kh > h or (wo - 1) * sw + kw > w):
        raise ShapeError(f"{ho} x {wo} pooling windows do not fit in a {h} x {w} input")
    _output(out, "out", (n, c, ho, wo), dt)
    _output(arg, "arg", (n, c, ho, wo), np.int32)
    # 256 threads, one per window: kh*kw reads each, memory-bound.
    _launch_elementwise("maxpool_fwd", dt, out.size,
                        (x, out, arg, _i64(out.size), _i64(h), _i64(w), _i64(kh), _i64(kw),
                         _i64(sh), _i64(sw), _i64(ho), _i64(wo)))


def maxpool_bwd(dout, arg, kh, kw, sh, sw, dx):
    """dx (N, C, H, W): each input pixel sums dout over the windows whose arg is it."""
    dt = _float_dtype(dx, "dx")
    _output(dx, "dx", dx.shape, dt)
    if dx.ndim != 4:
        raise ShapeError(f"dx must be (N, C, H, W), got shape {tuple(dx.shape)}")
    dout = _input(dout, dt)
    if dout.ndim != 4 or tuple(dout.shape[:2]) != tuple(dx.shape[:2]):
        raise ShapeError(f"dout must be (N, C, HO, WO) for dx {tuple(dx.shape)}, got "
                         f"{tuple(dout.shape)}")
    ho, wo = dout.shape[2:]
    arg = _same(arg, np.int32, dout.shape, "arg")
    h, w = dx.shape[2:]
    # 256 threads, one per input pixel (a gather over the windows holding it: no atomics).
    _launch_elementwise("maxpool_bwd", dt, dx.size,
                        (dout, arg, dx, _i64(dx.size), _i64(h), _i64(w), _i64(kh), _i64(kw),
                         _i64(sh), _i64(sw), _i64(ho), _i64(wo)))


# -- losses ---------------------------------------------------------------------------------------

def _loss(name, z, labels, values, dz):
    dt = _float_dtype(z, "z")
    z = _input(z)
    if z.ndim != 2:
        raise ShapeError(f"z must be (N, K), got shape {tuple(z.shape)}")
    n, k = z.shape
    y = _same(labels, np.int64, (n,), "labels")
    _output(values, "values", (n,), dt)
    if dz is not None:
        _output(dz, "dz", (n, k), dt)
    # 256 threads, one row per thread, grid-stride: K ~ 10 logits stay in registers and a row
    # is a few dozen flops, so a thread per row keeps it one pass over z.
    _launch_elementwise(name, dt, n,
                        (z, y, values, values if dz is None else dz, _i64(n), _i64(k),
                         np.int32(dz is not None)))


def softmax_xent(z, labels, values, dz):
    """values = logsumexp(z) - z_y as reference.losses.log_softmax; dz = softmax - onehot."""
    _loss("softmax_xent", z, labels, values, dz)


def cw_margin(z, labels, values, dz):
    """values = max_{j != y} z_j - z_y (first j on ties); dz +1 at j, -1 at y."""
    _loss("cw_margin", z, labels, values, dz)


# -- PGD steps ------------------------------------------------------------------------------------

def _step_args(xa, g, x0, eps, alpha, active, out, radius_dt=None):
    dt = _float_dtype(xa, "xa")
    xa = _input(xa)
    if xa.ndim != 2:
        raise ShapeError(f"xa must be (N, D), got shape {tuple(xa.shape)}")
    n = xa.shape[0]
    g = _same(g, dt, xa.shape, "g")
    x0 = _same(x0, dt, xa.shape, "x0")
    eps = _same(eps, radius_dt or dt, (n,), "eps")
    alpha = _same(alpha, radius_dt or dt, (n,), "alpha")
    active = _same(active, np.bool_, (n,), "active")
    _output(out, "out", xa.shape, dt)
    return dt, xa, g, x0, eps, alpha, active


def linf_step(xa, g, x0, eps, alpha, lo, hi, active, out):
    """out = active ? clip(clip(xa + alpha*sign(g), x0 - eps, x0 + eps), lo, hi) : xa."""
    dt, xa, g, x0, eps, alpha, active = _step_args(xa, g, x0, eps, alpha, active, out)
    d = xa.shape[1]
    # 256 threads, grid-stride over N*D: elementwise and memory-bound.
    _launch_elementwise("linf_step", dt, xa.size,
                        (xa, g, x0, eps, alpha, dt.type(lo), dt.type(hi), active, out,
                         _i64(xa.size), _i64(d)))


def l2_step(xa, g, x0, eps, alpha, lo, hi, active, out):
    """Per image: s = alpha g / ||g||, d = xa + s - x0 projected onto the eps-ball, then the
    box (one block per image, float64 norms).

    eps and alpha are read as float64, as the reference keeps them (per_sample_eps): a dt
    array converts exactly, a float64 one keeps the reference's radius and step bit for bit.
    """
    dt, xa, g, x0, eps, alpha, active = _step_args(xa, g, x0, eps, alpha, active, out,
                                                   np.float64)
    n, d = xa.shape
    if d == 0:
        return
    # One 256-thread block per image: two float64 norms need block reductions; N blocks of
    # 256 (8 resident per SM) keep the SMs full from a few thousand images up.
    _launch_per_image("l2_step", dt, n,
                      (xa, g, x0, eps, alpha, dt.type(lo), dt.type(hi), active, out,
                       _i64(d)))


# -- JSMA -----------------------------------------------------------------------------------------

def _jsma_args(a, b, domain):
    dt = _float_dtype(a, "a")
    a = _input(a)
    if a.ndim != 2:
        raise ShapeError(f"a must be (N, D), got shape {tuple(a.shape)}")
    b = _same(b, dt, a.shape, "b")
    domain = _same(domain, np.bool_, a.shape, "domain")
    return dt, a, b, domain


def jsma_pair(a, b, domain, positive, p, q, found):
    """reference.jsma.best_pair per image: p, q (int64, -1 if none), found (bool)."""
    dt, a, b, domain = _jsma_args(a, b, domain)
    n, d = a.shape
    for arr, name, adt in ((p, "p", np.int64), (q, "q", np.int64), (found, "found", np.bool_)):
        _output(arr, name, (n,), adt)
    # One 256-thread block per image: D^2/2 pairs per image, compute-bound, block reduction.
    _launch_per_image("jsma_pair", dt, n,
                      (a, b, domain, np.int32(bool(positive)), _i64(d), p, q, found))


def jsma_feature(a, b, domain, positive, i, found):
    """reference.jsma.best_feature per image: i (int64, -1 if none), found (bool)."""
    dt, a, b, domain = _jsma_args(a, b, domain)
    n, d = a.shape
    _output(i, "i", (n,), np.int64)
    _output(found, "found", (n,), np.bool_)
    # One 256-thread block per image: a strided scan of D features and a block reduction.
    _launch_per_image("jsma_feature", dt, n,
                      (a, b, domain, np.int32(bool(positive)), _i64(d), i, found))


# -- DE -------------------------------------------------------------------------------------------

def de_step(pop, r1, r2, r3, cross, forced, F, CR, lower, upper, out):
    """reference.pixel.de_step, bit-exact: clip(where(take, pop[r1] + F (pop[r2] - pop[r3]),
    pop), lower, upper) with take = cross < CR or d == forced (CR None: always the mutant)."""
    dt = _float_dtype(pop, "pop")
    pop = _input(pop)
    if pop.ndim != 3:
        raise ShapeError(f"pop must be (B, P, dim), got shape {tuple(pop.shape)}")
    nb, p, dim = pop.shape
    r1, r2, r3 = (_same(r, np.int64, (nb, p), name)
                  for r, name in ((r1, "r1"), (r2, "r2"), (r3, "r3")))
    if CR is None:
        # never read (use_cross = 0); cross an empty float64 array (no allocation), so that
        # every pointer has its parameter's type
        cross_a, forced_a, cr, use = cupy.empty(0, np.float64), r1, np.float64(0.0), 0
    else:
        # The draws are float64 uniforms and the reference compares them to the Python
        # float CR in float64.
        cross_a = _same(cross, np.float64, pop.shape, "cross")
        forced_a = _same(forced, np.int64, (nb, p), "forced")
        cr, use = np.float64(CR), 1
    lower = _same(lower, dt, (dim,), "lower")
    upper = _same(upper, dt, (dim,), "upper")
    _output(out, "out", pop.shape, dt)
    # 256 threads, grid-stride over N*P*dim: elementwise gathers, memory-bound.
    _launch_elementwise("de_step", dt, pop.size,
                        (pop, r1, r2, r3, cross_a, forced_a, dt.type(F), cr, np.int32(use),
                         lower, upper, out, _i64(p), _i64(dim), _i64(pop.size)))


def _patch_args(base, x, pop):
    dt = _float_dtype(base, "base")
    x = _input(x, dt)
    if x.ndim != 4:
        raise ShapeError(f"x must be (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    pop = _input(pop, dt)
    if pop.ndim != 3 or pop.shape[0] != n or pop.shape[2] == 0 or pop.shape[2] % (2 + c):
        raise ShapeError(f"pop must be ({n}, P, k*{2 + c}), got shape {tuple(pop.shape)}")
    k = pop.shape[2] // (2 + c)
    return dt, _input(base), x, pop, n, c, h, w, pop.shape[1], k


def de_patch_dense(base, w, x, pop, out):
    """out (N*P, M) [n*P + p] = base[n] + sum over the candidate's effective pixels j and
    channels c of (v_jc - x[n, c, r_j, s_j]) * w[(c*H + r_j)*W + s_j]."""
    dt, base, x, pop, n, c, h, wd, p, k = _patch_args(base, x, pop)
    if base.ndim != 2 or base.shape[0] != n:
        raise ShapeError(f"base must be ({n}, M), got shape {tuple(base.shape)}")
    m = base.shape[1]
    w = _same(w, dt, (c * h * wd, m), "w")
    _output(out, "out", (n * p, m), dt)
    # 256 threads, one per (candidate, m) in 64-bit grid-stride (N*P*M reaches 1e9): a
    # warp reads 32 consecutive m of a row of w, the candidate's pixels are broadcasts.
    _launch_elementwise("de_patch_dense", dt, out.size,
                        (base, w, x, pop, out, _i64(out.size), _i64(p), _i64(m), _i64(c),
                         _i64(h), _i64(wd), _i64(k)))


def de_patch_conv(base, w, x, pop, sh, sw, pt, pl, out):
    """out (N*P, F, HO, WO) = base[n] plus, at every output whose receptive field holds an
    effective pixel (r, s) of the candidate, sum_c delta_c * w[f, c, u, v] for its tap."""
    dt, base, x, pop, n, c, h, wd, p, k = _patch_args(base, x, pop)
    if base.ndim != 4 or base.shape[0] != n:
        raise ShapeError(f"base must be ({n}, F, HO, WO), got shape {tuple(base.shape)}")
    f, ho, wo = base.shape[1:]
    w = _input(w, dt)
    if w.ndim != 4 or w.shape[0] != f or w.shape[1] != c:
        raise ShapeError(f"w must be ({f}, {c}, KH, KW), got shape {tuple(w.shape)}")
    kh, kw = w.shape[2:]
    _output(out, "out", (n * p, f, ho, wo), dt)
    # 256 threads, one per (candidate, f, i, j) in 64-bit grid-stride (up to 5e10): base and
    # out are streamed coalesced; most threads find no pixel in their receptive field.
    _launch_elementwise("de_patch_conv", dt, out.size,
                        (base, w, x, pop, out, _i64(out.size), _i64(p), _i64(f), _i64(ho),
                         _i64(wo), _i64(c), _i64(h), _i64(wd), _i64(kh), _i64(kw), _i64(sh),
                         _i64(sw), _i64(pt), _i64(pl), _i64(k)))
