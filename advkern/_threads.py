"""Thread settings of the fixed workloads the CLI runs (the demo, the experiments' quick forms)."""

import contextlib


@contextlib.contextmanager
def single_threaded_blas():
    """NumPy's BLAS single-threaded for the duration (threadpoolctl; a no-op without it).

    The demo and the experiments run many small GEMMs on the NumPy reference (the VAE, the
    distilled students' training, predictions), where a multi-threaded BLAS forks and joins
    every GEMM and waits for its slowest thread, which on a shared machine is often
    descheduled (numba_cpu's kernels limit BLAS the same way, for the same reason: see
    ``kernels.numba_cpu.nn``). Measured on two cores, warm caches: the demo 34.0 s
    single-threaded vs 34.5-36.3 s with two BLAS threads on an idle machine; the quick
    distillation experiment 9.4-9.5 s vs 10.4-11.0 s beside another job.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield
