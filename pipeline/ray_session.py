"""One Ray session per process: local by default, sized to the machine; or a cluster. Quiet
unless `spin-pipeline --verbose`: Ray's INFO logs, its workers' output and Ray Data's progress
bars reach the console only then (they stay in Ray's session logs either way).

A local session is this machine's alone: every server of it (GCS, raylet, object manager, agents,
the driver, workers and actors) listens on 127.0.0.1 only, and Ray's token authentication stays
as Ray sets it up - on for a new local session, with its token in ~/.ray/auth_token - unless the
user's own RAY_AUTH_MODE says otherwise. A cluster (`--ray-address`) keeps whatever it requires;
its token comes from the user's environment (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or the file).

Ray is imported inside the functions: it reads part of its environment (which addresses to bind,
RAY_DEDUP_LOGS) at import, which `ensure_ray` sets first, and commands that never fit need not
load it.
"""
from __future__ import annotations

import ipaddress
import logging
import os

from pipeline.console import is_verbose

LOCAL = ("", "local", None)
# Ray's switch for a session confined to one machine: its node address becomes 127.0.0.1, to which
# every process of the session binds. Read by Ray at import.
ONE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ensure_ray(address: str | None = None, progress: bool = True) -> None:
    local = address in LOCAL
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if local:
        os.environ[ONE_MACHINE] = "0"
    import ray

    verbose = is_verbose()
    quiet = {"logging_level": logging.INFO if verbose else logging.WARNING, "log_to_driver": verbose}
    if not ray.is_initialized():
        if local:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=True,
                     **quiet)
            refuse_unless_loopback(ray.util.get_node_ip_address())
        else:
            ray.init(address=address, **quiet)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards complete in order: deterministic, streaming commits
    ctx.enable_progress_bars = progress and verbose  # else the fit stage's own bar, by shard
    ctx.enable_operator_progress_bars = progress and verbose
    ctx.print_on_execution_start = False


def refuse_unless_loopback(node_ip: str) -> None:
    """Stop a local session that would listen beyond this machine (Ray imported before
    `ensure_ray` could confine it)."""
    if not ipaddress.ip_address(node_ip).is_loopback:
        import ray

        ray.shutdown()
        raise RuntimeError(f"the local Ray session bound {node_ip}, which other hosts can reach: Ray was "
                           f"imported before pipeline.ray_session.ensure_ray; import it later or set {ONE_MACHINE}=0")


def available_cpus() -> float:
    """CPUs free now (a driver that trains in-process, as `run` does, holds some)."""
    import ray
    return float(ray.available_resources().get("CPU", os.cpu_count() or 1))


def available_gpus() -> float:
    import ray
    return float(ray.available_resources().get("GPU", 0.0))
