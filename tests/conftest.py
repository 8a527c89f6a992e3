"""Shared fixtures: one tiny built-in benchmark and one local Ray session per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory):
    """The `tiny` preset of the synthetic benchmark (train/, test/, truth/), made once."""
    from trainer.synth import SynthConfig
    from trainer.synth_run import generate

    out = tmp_path_factory.mktemp("tiny-benchmark")
    generate(SynthConfig.from_preset("tiny", seed=0), out, workers=2, progress=False, overwrite=True)
    return out


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray():
    yield
    import sys
    if "ray" in sys.modules:
        import ray
        if ray.is_initialized():
            ray.shutdown()
