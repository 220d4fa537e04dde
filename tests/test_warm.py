"""The background compile of numba_cpu's kernels (``kernels.numba_cpu.warm``): its stages
still run as the API changes, it knows a cold cache from a warm one, and the process it
starts compiles into the cache that a later process loads."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

from advkern.kernels.numba_cpu import warm  # noqa: E402


def test_every_stage_runs():
    warm.run(list(warm.STAGES))
    assert not warm.is_cold()           # the JSMA stage cached its pair kernel
    assert warm.start() is None         # a warm cache starts nothing
    warm.finish(None)


def _cold_in(cache):
    code = "from advkern.kernels.numba_cpu import warm; print(warm.is_cold())"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


def test_a_background_process_fills_an_empty_cache(tmp_path):
    cache = tmp_path / "numba-cache"
    assert _cold_in(cache) == "True"
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    # the cheapest stage (a few kernels, ~3 s to compile): what it compiles is written to
    # the cache folder, which a later process then loads
    code = ("from advkern.kernels.numba_cpu import warm; "
            "p = warm.start(['adversarial-training']); assert p is not None; "
            "warm.finish(p, timeout=300); print(p.returncode)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "0"
    assert list(cache.rglob("*.nbi")) and list(cache.rglob("*.nbc"))


def test_unknown_stages_are_ignored_by_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "advkern.kernels.numba_cpu.warm", "nonsense"],
                       capture_output=True, text=True)
    assert r.returncode == 0
