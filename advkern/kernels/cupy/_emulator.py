"""A CPU emulator for the ``cupy`` backend (``ADVKERN_CUPY_EMULATOR=1``): it runs the backend's
CUDA C as host C++ compiled by g++, on NumPy arrays, so that CI without a GPU exercises every
custom kernel through the backend-generic tests, as numba's CUDA simulator does for
``numba_cuda``.

It is a check of the kernels' logic and indexing (grid-stride loops, block reductions and
their barriers, the order of operations of the bit-exact kernels, the arguments against the
C signature), not of NVRTC (its dialect, diagnostics and options), the GPU's math library
(``expf``, ``tanh``, ... are glibc's here) or the hardware (warps, memory model, timing).
Out-of-bounds accesses go unnoticed unless the kernels are compiled with a sanitizer (see
``ADVKERN_CUPY_EMULATOR_CXXFLAGS`` below). Every kernel is compiled with
``-ffp-contract=off`` (no fused multiply-add, as ``--fmad=false`` asks of NVRTC); the kernels
compiled without that option may contract on a GPU and round differently there by an ulp.

The stand-in covers exactly what ``advkern.kernels.cupy`` and the shared driver use when
``xp`` is NumPy: ``RawKernel``, ``ascontiguousarray``, ``zeros``, ``empty``, ``ndarray``
(NumPy's: device arrays are NumPy arrays) and ``cuda.runtime.getDevice`` /
``getDeviceCount`` / ``getDeviceProperties`` (one device with one SM),
``cuda.memory.OutOfMemoryError``.

``RawKernel(code, name)`` compiles ``code`` with a small prelude (``__global__``,
``threadIdx``, ``atomicAdd``, ...) and a launcher into a shared library, once per source,
cached on disk (``$ADVKERN_CACHE/cupy-emulator`` when ``ADVKERN_CACHE`` is set, else a folder
under the system's temporary directory; written under a temporary name then renamed, so
concurrent builds are safe). A launch checks the grid, the block and every argument against
the kernel's C signature (an array for each pointer, C-contiguous, of the pointee's dtype and
writeable unless ``const``; a NumPy scalar of exactly the parameter's type for each value),
then runs:

* kernels without ``__syncthreads``: every (block, thread) in turn, in one loop inside the
  library, on the calling thread;
* kernels with ``__syncthreads``: one OS thread per CUDA thread of a block and a
  ``std::barrier``, block after block (``__shared__`` is a static, so one block's worth).
  A thread that returns stops counting at the barrier, as exited threads do on a GPU, and
  a block whose threads called ``__syncthreads`` different numbers of times (undefined
  behaviour in CUDA) raises ``EmulatorError``.

Launches are serialised (one at a time per process). Unavailable (ImportError, with the
reason) when g++ is missing or cannot compile C++20 ``<barrier>``.

``ADVKERN_CUPY_EMULATOR_CXXFLAGS`` adds g++ flags (part of the cache key). Out-of-bounds
accesses are then checkable with AddressSanitizer, NumPy's buffers getting its red zones::

    ADVKERN_CUPY_EMULATOR_CXXFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined" \
    LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)" \
    ASAN_OPTIONS=detect_leaks=0 python -m pytest tests/test_backends.py -k cupy
"""

import ctypes
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import types

import numpy as np

__all__ = ["RawKernel", "ndarray", "ascontiguousarray", "zeros", "empty", "cuda",
           "EmulatorError", "CompileException"]

ndarray = np.ndarray
ascontiguousarray = np.ascontiguousarray
zeros = np.zeros
empty = np.empty

MULTIPROCESSORS = 1      # the emulated device's SM count (sizes the backend's grids)


class EmulatorError(RuntimeError):
    """A launch the emulator refuses (bad configuration or arguments) or a kernel fault."""


class CompileException(EmulatorError):
    """g++ rejected a kernel's source."""


class OutOfMemoryError(MemoryError):
    """Never raised: arrays are NumPy's (a full host raises MemoryError)."""


def _get_device():
    return 0


def _get_device_count():
    return 1


def _get_device_properties(device):
    if int(device) != 0:
        raise EmulatorError(f"invalid device {device}: the emulator has device 0 only")
    return {"name": b"advkern CPU emulator (g++)", "multiProcessorCount": MULTIPROCESSORS,
            "maxThreadsPerBlock": 1024, "warpSize": 32, "totalGlobalMem": 0}


cuda = types.SimpleNamespace(
    runtime=types.SimpleNamespace(getDevice=_get_device, getDeviceCount=_get_device_count,
                                  getDeviceProperties=_get_device_properties),
    memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
)

# -- the compiler ---------------------------------------------------------------------------

_CXX = shutil.which("g++")
if _CXX is None:
    raise ImportError("the cupy emulator needs g++ (not found on PATH)")

_FLAGS = ("-std=c++20", "-O2", "-ffp-contract=off", "-fno-fast-math", "-fvisibility=hidden",
          "-shared", "-fPIC", "-pthread", "-w",
          *shlex.split(os.environ.get("ADVKERN_CUPY_EMULATOR_CXXFLAGS", "")))


def _compiler_id():
    try:
        out = subprocess.run([_CXX, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise ImportError(f"the cupy emulator cannot run g++: {e}") from None
    if out.returncode:
        raise ImportError(f"the cupy emulator cannot run g++: {out.stderr.strip()}")
    return os.path.realpath(_CXX) + "\n" + out.stdout


_ID = _compiler_id()


def _cache_dir():
    base = os.environ.get("ADVKERN_CACHE")
    if base:
        return os.path.join(base, "cupy-emulator")
    uid = getattr(os, "getuid", lambda: "")()
    return os.path.join(tempfile.gettempdir(), f"advkern-cupy-emulator-{uid}")


# Fixed at import: a test session may point ADVKERN_CACHE elsewhere later.
CACHE_DIR = _cache_dir()
try:
    os.makedirs(CACHE_DIR, mode=0o700, exist_ok=True)
    _st = os.stat(CACHE_DIR)
except OSError as e:
    raise ImportError(f"the cupy emulator cannot use its cache folder {CACHE_DIR}: {e}") \
        from None
# The libraries found there are loaded and run: refuse a folder someone else controls.
if hasattr(os, "getuid") and (_st.st_uid != os.getuid() or _st.st_mode & 0o022):
    raise ImportError(f"the cupy emulator's cache folder {CACHE_DIR} is not owned by this user "
                      "or is writable by others (set ADVKERN_CACHE to a private folder)")


def _build(stem, source):
    """The path of the shared library built from ``source`` (compiled on a cache miss)."""
    key = hashlib.sha256("\0".join((_ID, " ".join(_FLAGS), source)).encode()).hexdigest()[:24]
    so = os.path.join(CACHE_DIR, f"{stem}-{key}.so")
    if os.path.exists(so):
        return so
    fd, cpp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".cpp", dir=CACHE_DIR)
    tmp = cpp[:-4] + ".so"
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        try:
            r = subprocess.run([_CXX, *_FLAGS, cpp, "-o", tmp], capture_output=True, text=True)
        except OSError as e:
            raise CompileException(f"g++ failed to run on {stem}: {e}") from None
        if r.returncode:
            raise CompileException(f"g++ rejected {stem}:\n{r.stderr.strip()}")
        os.replace(tmp, so)                       # atomic: a concurrent build writes the same
        os.replace(cpp, so[:-3] + ".cpp")         # kept next to the library, for debugging
    finally:
        for p in (cpp, tmp):
            if os.path.exists(p):
                os.unlink(p)
    return so


_PROBE = """
#include <barrier>
#include <thread>
extern "C" __attribute__((visibility("default"))) int advkern_probe() {
    std::barrier<> bar(2);
    std::thread t([&] { bar.arrive_and_wait(); });
    bar.arrive_and_wait();
    t.join();
    return 42;
}
"""

try:
    _probe = ctypes.CDLL(_build("probe", _PROBE))
    if _probe.advkern_probe() != 42:
        raise CompileException("the probe library returned a wrong value")
except (CompileException, OSError) as e:
    raise ImportError(f"the cupy emulator needs g++ with C++20 <barrier> and threads: {e}") \
        from None

# -- the prelude and the launchers ------------------------------------------------------------

_COMMON = r"""
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

// CUDA's math in the global namespace, with its float overloads
using std::isfinite; using std::isinf; using std::isnan; using std::signbit;
using std::abs; using std::fabs; using std::sqrt; using std::exp; using std::log;
using std::log1p; using std::expm1; using std::tanh; using std::floor; using std::ceil;
using std::fmin; using std::fmax; using std::pow;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static

struct uint3 { unsigned int x, y, z; };
typedef uint3 dim3;
static const int warpSize = 32;

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline double __longlong_as_double(long long i) { double f; std::memcpy(&f, &i, 8); return f; }
inline long long __double_as_longlong(double f) { long long i; std::memcpy(&i, &f, 8); return i; }

// Atomics: the old value, as CUDA returns it.
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
template <class F> inline F advkern_atomic_add_float(F* p, F v) {
    F old, sum;
    __atomic_load(p, &old, __ATOMIC_SEQ_CST);
    do { sum = old + v; } while (!__atomic_compare_exchange(p, &old, &sum, false,
                                                           __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return old;
}
inline float atomicAdd(float* p, float v) { return advkern_atomic_add_float(p, v); }
inline double atomicAdd(double* p, double v) { return advkern_atomic_add_float(p, v); }
#define ADVKERN_EXPORT extern "C" __attribute__((visibility("default")))
"""

# Kernels without __syncthreads: one thread of execution, plain statics.
_SEQUENTIAL = _COMMON + r"""
static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
#line 1 "kernel.cu"
"""

# Kernels with __syncthreads: one OS thread per CUDA thread, blocks one after another.
_THREADED = r"""
#include <barrier>
#include <string>
#include <thread>
#include <vector>
""" + _COMMON + r"""
static thread_local uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
namespace advkern_emu {
static std::barrier<>* block_barrier;            // the current block's __syncthreads
static thread_local unsigned long long syncs;    // this thread's __syncthreads in the block
}
inline void __syncthreads() {
    ++advkern_emu::syncs;
    advkern_emu::block_barrier->arrive_and_wait();
}
#line 1 "kernel.cu"
"""

# The launchers' own names all start with advkern_: the kernel's parameters are in scope.
_SEQUENTIAL_LAUNCH = r"""
ADVKERN_EXPORT const char* advkern_launch(unsigned advkern_gx, unsigned advkern_gy,
                                          unsigned advkern_gz, unsigned advkern_bx,
                                          unsigned advkern_by, unsigned advkern_bz{params}) {{
    gridDim = {{advkern_gx, advkern_gy, advkern_gz}};
    blockDim = {{advkern_bx, advkern_by, advkern_bz}};
    for (unsigned advkern_z = 0; advkern_z < advkern_gz; ++advkern_z)
    for (unsigned advkern_y = 0; advkern_y < advkern_gy; ++advkern_y)
    for (unsigned advkern_x = 0; advkern_x < advkern_gx; ++advkern_x) {{
        blockIdx = {{advkern_x, advkern_y, advkern_z}};
        for (unsigned advkern_tz = 0; advkern_tz < advkern_bz; ++advkern_tz)
        for (unsigned advkern_ty = 0; advkern_ty < advkern_by; ++advkern_ty)
        for (unsigned advkern_tx = 0; advkern_tx < advkern_bx; ++advkern_tx) {{
            threadIdx = {{advkern_tx, advkern_ty, advkern_tz}};
            {name}({args});
        }}
    }}
    return nullptr;
}}
"""

_THREADED_LAUNCH = r"""
ADVKERN_EXPORT const char* advkern_launch(unsigned advkern_gx, unsigned advkern_gy,
                                          unsigned advkern_gz, unsigned advkern_bx,
                                          unsigned advkern_by, unsigned advkern_bz{params}) {{
    static std::string advkern_error;
    advkern_error.clear();
    gridDim = {{advkern_gx, advkern_gy, advkern_gz}};
    blockDim = {{advkern_bx, advkern_by, advkern_bz}};
    const unsigned advkern_nt = advkern_bx * advkern_by * advkern_bz;
    const unsigned long long advkern_nb =
        (unsigned long long)advkern_gx * advkern_gy * advkern_gz;
    std::vector<unsigned long long> advkern_counts(advkern_nt);
    unsigned long long advkern_block = 0;
    bool advkern_stop = false;
    advkern_emu::block_barrier = new std::barrier<>(advkern_nt);
    // Runs once every thread has finished the block: check that all of them called
    // __syncthreads equally often, then a fresh barrier (exited threads dropped out).
    auto advkern_done = [&]() noexcept {{
        for (unsigned t = 1; t < advkern_nt && !advkern_stop; ++t)
            if (advkern_counts[t] != advkern_counts[0]) {{
                advkern_error = "{name}: divergent __syncthreads in block " +
                    std::to_string(advkern_block) + ": thread 0 called it " +
                    std::to_string(advkern_counts[0]) + " times, thread " +
                    std::to_string(t) + " " + std::to_string(advkern_counts[t]) + " times";
                advkern_stop = true;
            }}
        delete advkern_emu::block_barrier;
        advkern_emu::block_barrier = new std::barrier<>(advkern_nt);
        if (++advkern_block == advkern_nb) advkern_stop = true;
    }};
    std::barrier<decltype(advkern_done)> advkern_between(advkern_nt, advkern_done);
    auto advkern_worker = [&](unsigned advkern_t) {{
        threadIdx = {{advkern_t % advkern_bx, (advkern_t / advkern_bx) % advkern_by,
                     advkern_t / (advkern_bx * advkern_by)}};
        // advkern_stop is written by the completion step only: read after the barrier
        for (unsigned long long advkern_b = 0; !advkern_stop; ++advkern_b) {{
            blockIdx = {{(unsigned)(advkern_b % advkern_gx),
                        (unsigned)((advkern_b / advkern_gx) % advkern_gy),
                        (unsigned)(advkern_b / ((unsigned long long)advkern_gx * advkern_gy))}};
            advkern_emu::syncs = 0;
            {name}({args});
            advkern_counts[advkern_t] = advkern_emu::syncs;
            advkern_emu::block_barrier->arrive_and_drop();
            advkern_between.arrive_and_wait();
        }}
    }};
    std::vector<std::thread> advkern_threads;
    advkern_threads.reserve(advkern_nt - 1);
    for (unsigned t = 1; t < advkern_nt; ++t) advkern_threads.emplace_back(advkern_worker, t);
    advkern_worker(0);
    for (auto& th : advkern_threads) th.join();
    delete advkern_emu::block_barrier;
    advkern_emu::block_barrier = nullptr;
    return advkern_error.empty() ? nullptr : advkern_error.c_str();
}}
"""

# -- signatures -------------------------------------------------------------------------------

# C scalar types -> NumPy dtypes (LP64: long is 64-bit).
_C_TYPES = {
    "bool": np.bool_, "char": np.int8, "signed char": np.int8, "unsigned char": np.uint8,
    "short": np.int16, "unsigned short": np.uint16, "int": np.int32, "signed": np.int32,
    "unsigned": np.uint32, "unsigned int": np.uint32, "long": np.int64,
    "long long": np.int64, "long long int": np.int64, "unsigned long": np.uint64,
    "unsigned long long": np.uint64, "unsigned long long int": np.uint64,
    "size_t": np.uint64, "int8_t": np.int8, "uint8_t": np.uint8, "int16_t": np.int16,
    "uint16_t": np.uint16, "int32_t": np.int32, "uint32_t": np.uint32, "int64_t": np.int64,
    "uint64_t": np.uint64, "float": np.float32, "double": np.float64,
}
_CTYPES = {np.dtype(k): v for k, v in (
    (np.bool_, ctypes.c_bool), (np.int8, ctypes.c_int8), (np.uint8, ctypes.c_uint8),
    (np.int16, ctypes.c_int16), (np.uint16, ctypes.c_uint16), (np.int32, ctypes.c_int32),
    (np.uint32, ctypes.c_uint32), (np.int64, ctypes.c_int64), (np.uint64, ctypes.c_uint64),
    (np.float32, ctypes.c_float), (np.float64, ctypes.c_double))}


def _strip_comments(code):
    code = re.sub(r"/\*.*?\*/", " ", code, flags=re.S)
    return re.sub(r"//[^\n]*", " ", code)


class _Param:
    __slots__ = ("name", "ctype", "pointer", "const", "dtype")

    def __init__(self, name, ctype, pointer, const, dtype):
        self.name, self.ctype, self.pointer, self.const, self.dtype = (
            name, ctype, pointer, const, dtype)


def _signature(code, name):
    """The kernel's parameters, from its ``extern "C" __global__ void name(...)``."""
    text = _strip_comments(code)
    m = re.search(r'extern\s+"C"\s+__global__\s+void\s+' + re.escape(name) + r"\s*\(([^)]*)\)",
                  text)
    if m is None:
        raise CompileException(f'no extern "C" __global__ void {name}(...) in the source')
    typedefs = dict((alias, target) for target, alias in
                    re.findall(r"typedef\s+([A-Za-z_][\w ]*?)\s+([A-Za-z_]\w*)\s*;", text))
    params = []
    body = m.group(1).strip()
    for raw in ([] if body in ("", "void") else body.split(",")):
        p = " ".join(raw.replace("*", " * ").split())
        words = p.split(" ")
        if len(words) < 2 or not re.fullmatch(r"[A-Za-z_]\w*", words[-1]):
            raise CompileException(f"{name}: cannot read the parameter {raw.strip()!r}")
        pname, words = words[-1], words[:-1]
        stars = words.count("*")
        if stars > 1:
            raise CompileException(f"{name}: parameter {pname}: only T* pointers are supported")
        star = words.index("*") if stars else len(words)
        base = [w for w in words[:star] if w not in ("const", "volatile", "__restrict__")]
        const = "const" in words[:star]
        tname = " ".join(base)
        for _ in range(8):
            tname = typedefs.get(tname, tname)
        if tname == "void" and stars:
            dtype = None                             # void*: any array
        elif tname in _C_TYPES:
            dtype = np.dtype(_C_TYPES[tname])
        else:
            raise CompileException(f"{name}: parameter {pname}: unsupported type {p!r}")
        params.append(_Param(pname, " ".join(words), bool(stars), const, dtype))
    return params


def _c_param(p):
    return f"{p.ctype} {p.name}"


# -- kernels --------------------------------------------------------------------------------

_LAUNCH_LOCK = threading.Lock()
_SYNC = re.compile(r"\b__syncthreads\s*\(")


def _dims(v, what, limits):
    if isinstance(v, (int, np.integer)):
        v = (v,)
    if not isinstance(v, tuple) or not 1 <= len(v) <= 3:
        raise EmulatorError(f"{what} must be an int or a tuple of 1 to 3 ints, got {v!r}")
    out = []
    for d, lim in zip(v, limits):
        if not isinstance(d, (int, np.integer)) or isinstance(d, (bool, np.bool_)):
            raise EmulatorError(f"{what} must hold ints, got {v!r}")
        if not 1 <= int(d) <= lim:
            raise EmulatorError(f"{what} {v!r} out of range (1..{lim} each): an invalid "
                                "launch configuration on a GPU")
        out.append(int(d))
    return tuple(out) + (1,) * (3 - len(out))


class RawKernel:
    """``cupy.RawKernel`` on the host: ``code`` compiled by g++ at the first call."""

    def __init__(self, code, name, options=(), backend="nvrtc", translate_cucomplex=False,
                 *, enable_cooperative_groups=False, jitify=False):
        self.code, self.name, self.options = code, name, tuple(options)
        self.backend = backend
        self._fn = None
        self._params = None
        self.threaded = bool(_SYNC.search(_strip_comments(code)))

    def _compile(self):
        params = _signature(self.code, self.name)
        cparams = "".join(", " + _c_param(p) for p in params)
        args = ", ".join(p.name for p in params)
        head, launch = ((_THREADED, _THREADED_LAUNCH) if self.threaded
                        else (_SEQUENTIAL, _SEQUENTIAL_LAUNCH))
        source = head + self.code + "\n" + launch.format(params=cparams, name=self.name,
                                                          args=args)
        lib = ctypes.CDLL(_build(self.name, source))
        fn = lib.advkern_launch
        fn.argtypes = [ctypes.c_uint] * 6 + [
            ctypes.c_void_p if p.pointer else _CTYPES[p.dtype] for p in params]
        fn.restype = ctypes.c_char_p
        self._lib, self._params, self._fn = lib, params, fn

    def compile(self, log_stream=None):
        if self._fn is None:
            self._compile()

    def _convert(self, args):
        if not isinstance(args, tuple):
            raise EmulatorError(f"{self.name}: args must be a tuple, got {type(args).__name__}")
        params = self._params
        if len(args) != len(params):
            raise EmulatorError(f"{self.name}: {len(params)} parameters, {len(args)} arguments")
        out = []
        for p, a in zip(params, args):
            if p.pointer:
                if not isinstance(a, np.ndarray):
                    raise EmulatorError(f"{self.name}: {p.name} ({p.ctype}) needs an array, "
                                        f"got {type(a).__name__}")
                if p.dtype is not None and a.dtype != p.dtype:
                    raise EmulatorError(f"{self.name}: {p.name} ({p.ctype}) needs a {p.dtype} "
                                        f"array, got {a.dtype}")
                if not a.flags.c_contiguous:
                    raise EmulatorError(f"{self.name}: {p.name} must be C-contiguous")
                if not p.const and not a.flags.writeable:
                    raise EmulatorError(f"{self.name}: {p.name} ({p.ctype}) is not const "
                                        "(the kernel may write it), but the array is "
                                        "read-only")
                out.append(a.ctypes.data)
            else:
                if not isinstance(a, np.generic) or a.dtype != p.dtype:
                    got = a.dtype if isinstance(a, np.generic) else type(a).__name__
                    raise EmulatorError(f"{self.name}: {p.name} ({p.ctype}) needs a NumPy "
                                        f"{p.dtype} scalar, got {got}")
                out.append(a.item())
        return out

    def __call__(self, grid, block, args, *, shared_mem=0):
        if shared_mem:
            raise EmulatorError(f"{self.name}: dynamic shared memory is not emulated")
        g = _dims(grid, f"{self.name}: grid", (2**31 - 1, 65535, 65535))
        b = _dims(block, f"{self.name}: block", (1024, 1024, 64))
        if b[0] * b[1] * b[2] > 1024:
            raise EmulatorError(f"{self.name}: block {block!r} has more than 1024 threads")
        if self._fn is None:
            self._compile()
        conv = self._convert(args)
        with _LAUNCH_LOCK:
            err = self._fn(*g, *b, *conv)
        if err is not None:
            raise EmulatorError(err.decode(errors="replace"))
