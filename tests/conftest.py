"""Test configuration: Hypothesis profiles (CI: no deadline, derandomized)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, derandomize=True, max_examples=30,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=30,
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
