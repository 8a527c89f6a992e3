"""One Ray session per process: local by default, sized to the machine, quiet; or a cluster.

Ray is imported inside the functions: it reads part of its environment (RAY_DEDUP_LOGS) at
import, which `ensure_ray` sets first, and commands that never fit need not load it.
"""
from __future__ import annotations

import logging
import os

LOCAL = ("", "local", None)


def ensure_ray(address: str | None = None, progress: bool = True) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import ray

    if not ray.is_initialized():
        if address in LOCAL:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                     logging_level=logging.WARNING, configure_logging=True)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards complete in order: deterministic, streaming commits
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = False


def available_cpus() -> float:
    """CPUs free now (a driver that trains in-process, as `run` does, holds some)."""
    import ray
    return float(ray.available_resources().get("CPU", os.cpu_count() or 1))


def available_gpus() -> float:
    import ray
    return float(ray.available_resources().get("GPU", 0.0))
