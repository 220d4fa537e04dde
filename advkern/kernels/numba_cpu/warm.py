"""Compile numba_cpu's kernels ahead of their first use, in a background process.

Numba compiles a kernel on its first call on a machine and keeps the machine code in its
on-disk cache; later processes load it (about 0.1 s a kernel). On a fresh machine the demo
spends about 35 s compiling (two cores, measured: cold numba cache vs warm, same demo),
single-threaded, so one of the two cores idles while the other compiles.

``start(stages)`` launches ``python -m advkern.kernels.numba_cpu.warm STAGE ...``: a process
(one thread) that runs each stage's attacks on UNTRAINED copies of the bundled
architectures with a few images. The calls are the ones the demo makes (same layers,
dtype, attack parameters that pick the code path), hence the same kernel signatures, and
numba writes them to the same cache, which the demo's own first call then loads. Nothing
depends on it for correctness: a kernel the demo reaches first is compiled there as usual
(numba replaces cache files atomically, so two processes writing one entry is safe), and
an unexpected signature costs only the background CPU. The stages are listed in the order
the demo needs them, after what the demo compiles itself in its first seconds.
"""

import os
import subprocess
import sys

__all__ = ["STAGES", "is_cold", "start", "finish", "run"]


def _data(n=4):
    from ...nets.datasets import load_mnist
    x, y = load_mnist("test")
    return x[:n], y[:n]


def _jsma():
    from ...attacks import run_attack
    from ...nets.architectures import build
    x, y = _data()
    for arch in ("mlp", "cnn"):
        for use_logits in (True, False):
            run_attack(build(arch), x, y, "jsma", theta=1.0, gamma=0.1, target="next",
                       use_logits=use_logits, backend="numba_cpu")


def _pixel():
    from ...attacks import run_attack
    from ...nets.architectures import build
    x, y = _data()
    for arch in ("mlp", "cnn"):
        for k in (1, 3, 5):
            run_attack(build(arch), x, y, "pixel", pixels=k, popsize=20, generations=2,
                       backend="numba_cpu")


def _adversarial_training():
    from ...nets.architectures import build
    from ...nets.train import train
    x, y = _data(8)
    train(build("mlp"), x, y, epochs=1, batch_size=4, adversarial="fgsm", eps=0.1,
          backend="numba_cpu", progress=False)


def _layers():
    """The linearity experiment's maxout and rbf nets: training and FGSM."""
    from ...attacks import run_attack
    from ...nets.architectures import build
    from ...nets.train import train
    x, y = _data(8)
    for arch in ("maxout", "rbf"):
        m = build(arch, data=(x, y)) if arch == "rbf" else build(arch)
        m, _ = train(m, x, y, epochs=1, batch_size=4, backend="numba_cpu", progress=False)
        run_attack(m, x, y, "fgsm", eps=0.1, backend="numba_cpu")


STAGES = {"jsma": _jsma, "pixel": _pixel, "adversarial-training": _adversarial_training,
          "layers": _layers}


def is_cold():
    """True when numba's cache holds no JSMA pair kernel yet: a machine (or a cache folder,
    NUMBA_CACHE_DIR) this version's kernels have not run on."""
    try:
        from .steps import _best_pair_kernel
        return not os.path.exists(_best_pair_kernel._cache._cache_file._index_path)
    except Exception:        # a numba without these internals: assume warm, start nothing
        return False


def start(stages=tuple(STAGES)):
    """Launch the background compile of ``stages`` (names of ``STAGES``) when numba's cache
    is cold; returns the ``subprocess.Popen`` or None. Its output is discarded; it runs one
    thread (numba, OpenMP and BLAS pools of 1), leaving the other cores to the caller."""
    if not is_cold():
        return None
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    try:
        return subprocess.Popen([sys.executable, "-m", __name__, *stages], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    except OSError:
        return None


def finish(proc, timeout=30.0):
    """Wait for a background compile (a finished one returns at once); stop it after
    ``timeout`` seconds. None: nothing to do."""
    if proc is None:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run(stages):
    """Run the named stages in this process (what the background process does)."""
    for name in stages:
        STAGES[name]()


if __name__ == "__main__":
    run([s for s in sys.argv[1:] if s in STAGES])
