"""GEMM FLOP counts of the benchmarked work, and the sgemm rates they are held against.

Only the matrix products count (the work a BLAS would do); bias adds, activations, pooling,
the loss, im2col/col2im copies, the sign step and the JSMA/DE bookkeeping are not counted.
A multiply-add is 2 FLOPs. Per image, for layer i with input shape shapes[i] and output
shapes[i + 1]:

    dense  (in -> out):                     2 * in * out
    conv2d (C, H, W) -> (F, Ho, Wo), KHxKW: 2 * F * C * KH * KW * Ho * Wo

fwd(model) = the sum over layers (the forward pass of one image). The input-gradient
backward of a layer (dx = dy W^T for dense, the transposed convolution for conv2d) is one
GEMM of the same size as its forward, so:

    loss_grad (one attack step)  2 * fwd per image: the forward plus the input-gradient
                                 backward of EVERY layer (the first layer's dx is the
                                 gradient the attack wants). No weight-gradient GEMMs: an
                                 attack never needs them (a training step would add another
                                 1 * fwd for them, i.e. 3 * fwd).
    jacobian (K logits)          (1 + K) * fwd per image: one forward, and the backward
                                 seeded with the K one-hot rows (K input-gradient passes).
                                 The reference repeats the forward K times; that extra work
                                 is not credited.
    de_score (P candidates)      P * fwd per image: a full forward of every candidate. An
                                 incremental backend does less; its rate is then an
                                 "effective" full-scoring-equivalent GFLOP/s.
    PGD, S steps                 (2 * S + 1) * fwd per image: S steps, and one forward to
                                 score the final iterate.
    JSMA                         sum over images of (iterations + 1) * (1 + K) * fwd: one
                                 Jacobian per iteration plus the final success check. The
                                 pair search (m (m - 1) / 2 pair scores per iteration) is
                                 not GEMM work, so JSMA's distance to the GEMM bound is large
                                 by construction.
    one-pixel DE                 queries * fwd: P candidates at the start and P per
                                 generation run (early stop included).

The GEMM bound of an item is its FLOPs divided by an sgemm rate (GFLOP/s) measured in the
same run with ``np.dot`` on float32 matrices (``python -m bench --gpu``: cuBLAS through
``cupy.matmul``, TF32 off; see ``GemmLib``): ``gemm_shapes`` lists the model's own GEMMs
(im2col form for convolutions, forward and input-gradient backward) and ``model_rate`` times
exactly those (the "shape-matched" rate); ``sgemm_rate`` times any one shape, e.g. the
square 1024 product.
"""

import time

import numpy as np


def layer_flops(model):
    """[(layer index, description, forward GEMM FLOPs per image)] for the layers with GEMMs."""
    out = []
    for i, layer in enumerate(model.layers):
        src, dst = model.shapes[i], model.shapes[i + 1]
        if layer.type == "dense":
            out.append((i, f"dense {src[0]}->{dst[0]}", 2 * src[0] * dst[0]))
        elif layer.type == "conv2d":
            c, (kh, kw), (f, ho, wo) = src[0], layer.kernel, dst
            out.append((i, f"conv {c}->{f} {kh}x{kw} -> {ho}x{wo}",
                        2 * f * c * kh * kw * ho * wo))
    return out


def fwd(model):
    """Forward GEMM FLOPs of one image."""
    return sum(f for _, _, f in layer_flops(model))


def loss_grad(model, n):
    return 2 * n * fwd(model)


def jacobian(model, n):
    return n * (1 + model.num_logits) * fwd(model)


def de_score(model, n, popsize):
    return n * popsize * fwd(model)


def pgd(model, n, steps):
    return n * (2 * steps + 1) * fwd(model)


def jsma(model, iterations):
    """iterations: (N,) the attack's info['iterations']."""
    calls = int(np.sum(np.asarray(iterations) + 1))
    return calls * (1 + model.num_logits) * fwd(model)


def pixel(model, queries):
    """queries: (N,) the attack's info['queries'] (candidates scored per image)."""
    return int(np.sum(queries)) * fwd(model)


# -- sgemm rates ----------------------------------------------------------------------------


def gemm_shapes(model, batch):
    """The (M, K, N) float32 products of one forward + input-gradient backward at ``batch``.

    dense: (batch, in) @ (in, out), then (batch, out) @ (out, in).
    conv2d (im2col): (batch*Ho*Wo, C*KH*KW) @ (C*KH*KW, F), then
    (batch*Ho*Wo, F) @ (F, C*KH*KW).
    """
    shapes = []
    for i, layer in enumerate(model.layers):
        src, dst = model.shapes[i], model.shapes[i + 1]
        if layer.type == "dense":
            shapes += [(batch, src[0], dst[0]), (batch, dst[0], src[0])]
        elif layer.type == "conv2d":
            m, k = batch * dst[1] * dst[2], src[0] * layer.kernel[0] * layer.kernel[1]
            shapes += [(m, k, dst[0]), (m, dst[0], k)]
    return shapes


class GemmLib:
    """Where the sgemm rates are measured: ``np.dot`` (the default) or a GPU array module.

    xp: the array module (numpy or cupy); rand(shape, rng) -> a float32 array of xp;
    sync(): waits for the device (a no-op for numpy); name: for the report.
    """

    def __init__(self, name, xp, rand, sync):
        self.name, self.xp, self.rand, self.sync = name, xp, rand, sync


NUMPY = GemmLib("np.dot", np, lambda shape, rng: rng.standard_normal(shape, dtype=np.float32),
                lambda: None)


def cupy_lib(cupy):
    """cuBLAS through ``cupy.matmul`` (float32; TF32 only if CUPY_TF32=1, which bench/gpu.py
    refuses). The operands are drawn on the device (no host transfer of 10^8 numbers)."""
    def rand(shape, rng):
        return cupy.random.RandomState(int(rng.integers(2**31))).standard_normal(
            shape, dtype=cupy.float32)
    return GemmLib("cupy.matmul", cupy, rand, lambda: cupy.cuda.Device().synchronize())


def _time_gemm(m, k, n, repeats, rng, lib=NUMPY):
    """The best of ``repeats`` timed products (a, b) -> out, after a warm-up.

    The best, not the median: a bound should be what the BLAS can do, and on a shared
    machine the slower samples measure the other users. On a device (lib.sync not a no-op)
    each sample is a run of back-to-back products long enough (>= ~2 ms) that the launch
    and the synchronisation are not what is measured, divided by their number.
    """
    xp = lib.xp
    a, b = lib.rand((m, k), rng), lib.rand((k, n), rng)
    out = xp.empty((m, n), dtype=xp.float32)
    mm = np.dot if xp is np else xp.matmul
    mm(a, b, out=out)  # warm-up: threads started, pages touched, cuBLAS handle created
    lib.sync()
    inner = 1
    if lib is not NUMPY:
        t0 = time.perf_counter()
        mm(a, b, out=out)
        lib.sync()
        inner = max(1, min(200, int(2e-3 / max(time.perf_counter() - t0, 1e-7))))
    times = []
    for _ in range(repeats):
        lib.sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            mm(a, b, out=out)
        lib.sync()
        times.append((time.perf_counter() - t0) / inner)
    return min(times)


def sgemm_rate(m, k, n, repeats=5, seed=0, lib=NUMPY):
    """GFLOP/s of float32 (m, k) @ (k, n) (np.dot, or lib's matmul), best of ``repeats``."""
    t = _time_gemm(m, k, n, repeats, np.random.default_rng(seed), lib)
    return 2 * m * k * n / t / 1e9


def model_rate(model, batch, repeats=5, seed=0, lib=NUMPY):
    """Shape-matched sgemm GFLOP/s: total FLOPs / total best time of ``gemm_shapes``."""
    rng = np.random.default_rng(seed)
    total_flops = total_time = 0.0
    for m, k, n in gemm_shapes(model, batch):
        total_time += _time_gemm(m, k, n, repeats, rng, lib)
        total_flops += 2 * m * k * n
    return total_flops / total_time / 1e9
