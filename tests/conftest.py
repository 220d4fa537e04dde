"""Test configuration: Hypothesis profiles (CI: no deadline, derandomized); on machines without
a CUDA driver, the CUDA simulator for the numba_cuda backend and the CPU emulator for the
cupy backend."""

import ctypes
import os


def _cuda_driver_present():
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


# Without a GPU, the numba_cuda backend runs under numba's CUDA simulator and the cupy
# backend under advkern's CPU emulator (its CUDA C compiled by g++; unavailable without g++),
# so the backend-generic tests exercise every one of their kernels in CI. The variables must
# be set before numba or the backends are first imported (this file is imported before any
# test module).
if not _cuda_driver_present():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    os.environ.setdefault("ADVKERN_CUPY_EMULATOR", "1")


def _simulator_polls_politely():
    """Make the CUDA simulator's barrier cost microseconds instead of milliseconds.

    The simulator runs a block as Python threads; its block manager busy-polls
    ``thread.is_alive()`` holding the GIL, so each ``syncthreads`` waits out the interpreter's
    5 ms switch interval before the released threads can run. A per-image reduction has ~20
    barriers, so one simulated L2 step on 12 images took ~1 s. Yielding the GIL at each poll
    changes no result (the barrier protocol is the simulator's own) and cut the GPU stand-in
    tests' time by about a quarter (108 s -> 79 s for the test_engine/backends/invariants/cw/lbfgs
    GPU cases on two workers).
    """
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        return
    import threading
    import time

    try:
        from numba.cuda.simulator import kernel as simkernel
        block_thread = simkernel.BlockThread
    except (ImportError, AttributeError):  # another numba-cuda layout: only slower
        return

    def is_alive(self, _alive=threading.Thread.is_alive):
        time.sleep(0)
        return _alive(self)

    block_thread.is_alive = is_alive


_simulator_polls_politely()

from hypothesis import HealthCheck, Phase, settings

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=30,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=30,
                          suppress_health_check=[HealthCheck.too_slow])
# The scarce GPU run (bench/gpu_check.sh): reproducible, and a failure is reported as found
# rather than shrunk (shrinking replays the kernels hundreds of times).
settings.register_profile("gpu", deadline=None, derandomize=True, max_examples=30,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate],
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """``trained(name, **train_kw)``: a bundled architecture trained once per test session.

    Uses advkern's own cache (pretrained) pointed at a fresh folder, so the test run checks
    real training from scratch and never depends on a developer's cache.
    """
    from advkern.nets import zoo

    os.environ["ADVKERN_CACHE"] = str(tmp_path_factory.mktemp("advkern-cache"))
    memo = {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in memo:
            memo[key] = zoo.pretrained(name, progress=False, **kw)
        return memo[key]

    return get
