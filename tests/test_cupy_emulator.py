"""The CPU emulator of the cupy backend (advkern.kernels.cupy._emulator) itself: CUDA
semantics it must keep (grid-stride indexing over 3-D grids, block reductions with
__syncthreads over several blocks) and the launch errors it must raise instead of running a
kernel on wrong arguments. The backend's kernels are checked by test_backends / test_engine."""

import os

import numpy as np
import pytest

E = pytest.importorskip("advkern.kernels.cupy._emulator")

_INDEX = r"""
extern "C" __global__ void advkern_test_index(unsigned int* hits, long long n) {
    const long long nt = (long long)blockDim.x * blockDim.y * blockDim.z;
    const long long t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    const long long b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    for (long long e = b * nt + t; e < n; e += nt * gridDim.x * gridDim.y * gridDim.z)
        atomicAdd(&hits[e], 1u);
}
"""

_REDUCE = r"""
typedef double T;
extern "C" __global__ void advkern_test_reduce(const T* x, T* out, long long d) {
    __shared__ T red[64];
    T acc = 0;
    for (long long i = threadIdx.x; i < d; i += blockDim.x) acc += x[blockIdx.x * d + i];
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = red[0];
}
"""

_DIVERGENT = r"""
extern "C" __global__ void advkern_test_divergent(int* out) {
    if (threadIdx.x < 3) return;            // undefined behaviour in CUDA: a partial barrier
    __syncthreads();
    out[threadIdx.x] = 1;
}
"""


def test_the_backend_runs_on_the_emulator_when_asked():
    if os.environ.get("ADVKERN_CUPY_EMULATOR") != "1":
        pytest.skip("ADVKERN_CUPY_EMULATOR is not set (a CUDA driver is present)")
    from advkern import kernels

    be = kernels.get("cupy")
    assert be.EMULATED and be.SIMULATED and be.xp is np
    assert be.ops.cupy is E


def test_grid_stride_over_3d_grids_and_blocks_hits_every_element_once():
    k = E.RawKernel(_INDEX, "advkern_test_index")
    for grid, block, n in (((2, 3, 1), (4, 2, 3), 1000), ((1,), (32,), 5), (3, (7, 1, 2), 9)):
        hits = np.zeros(n, np.uint32)
        k(grid, block, (hits, np.int64(n)))
        np.testing.assert_array_equal(hits, 1)


def test_block_reductions_with_syncthreads_over_several_blocks():
    k = E.RawKernel(_REDUCE, "advkern_test_reduce")
    assert k.threaded
    x = np.random.default_rng(0).standard_normal((5, 300))
    out = np.zeros(5)
    k((5,), (64,), (x, out, np.int64(300)))
    np.testing.assert_allclose(out, x.sum(axis=1), rtol=1e-12)


def test_divergent_syncthreads_is_an_error():
    k = E.RawKernel(_DIVERGENT, "advkern_test_divergent")
    with pytest.raises(E.EmulatorError, match="divergent __syncthreads in block 0"):
        k((2,), (32,), (np.zeros(32, np.int32),))


def test_launches_are_checked_against_the_c_signature():
    k = E.RawKernel(_REDUCE, "advkern_test_reduce")
    x, out, d = np.ones((2, 8)), np.zeros(2), np.int64(8)
    ro = np.zeros(2)
    ro.flags.writeable = False
    bad = [((x, out, 8), "NumPy int64 scalar, got int"),
           ((x, out, np.int32(8)), "NumPy int64 scalar, got int32"),
           ((x.astype(np.float32), out, d), "float64 array, got float32"),
           ((np.ones((2, 16))[:, ::2], out, d), "C-contiguous"),
           ((x, ro, d), "read-only"),
           ((x, out), "3 parameters, 2 arguments")]
    for args, match in bad:
        with pytest.raises(E.EmulatorError, match=match):
            k((2,), (8,), args)
    for grid, block in (((0,), (8,)), ((2,), (2048,)), ((2,), (64, 32)), ((1.0,), (8,))):
        with pytest.raises(E.EmulatorError):
            k(grid, block, (x, out, d))


def test_a_source_g_plus_plus_rejects_raises_compile_exception():
    src = 'extern "C" __global__ void advkern_test_bad(int* a) { a[0] = undeclared; }'
    with pytest.raises(E.CompileException, match="undeclared"):
        E.RawKernel(src, "advkern_test_bad")((1,), (1,), (np.zeros(1, np.int32),))
