"""Shared fixtures: one tiny built-in benchmark and one local Ray session per test session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Tests import Ray while they are collected, before any session starts; Ray reads at import whether
# a session stays on this machine, which pipeline.ray_session sets for the CLI (and refuses a local
# session that would listen beyond loopback).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

# the `fault` marker and `--fault-table FILE`, which writes docs/reliability.md's table
pytest_plugins = ("tests.fault_table",)


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory):
    """The `tiny` preset of the synthetic benchmark (train/, test/, truth/), made once."""
    from trainer.data.synth import SynthConfig
    from trainer.data.synth_run import generate

    out = tmp_path_factory.mktemp("tiny-benchmark")
    generate(SynthConfig.from_preset("tiny", seed=0), out, workers=2, progress=False, overwrite=True)
    return out


@pytest.fixture(scope="session")
def posable():
    """A random SMPL-sized model with pose correctives and extra regressor rows that do not sum to 1."""
    import numpy as np

    from fitting.body_model import BodyModel
    from tests.toy_body import make_toy_smpl

    rng = np.random.default_rng(0)
    arrays = make_toy_smpl(seed=3)
    arrays["posedirs"] = rng.normal(scale=0.01, size=arrays["posedirs"].shape).astype(np.float32)
    extra = np.zeros((9, 6890), dtype=np.float32)
    for row in extra:
        row[rng.choice(6890, 20, replace=False)] = rng.uniform(0, 0.1, 20)
    arrays["J_regressor_extra"] = extra
    return BodyModel(arrays)


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray():
    yield
    import sys
    if "ray" in sys.modules:
        import ray
        if ray.is_initialized():
            ray.shutdown()
