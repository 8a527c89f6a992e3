"""A fit round on a two-node Ray cluster (Ray's own multi-node harness, `ray.cluster_utils.Cluster`)
that loses its worker node while that node's actor is fitting a shard.

Run as `python -m tests.cluster_round DATA RUN [--auth]`: it starts the cluster on 127.0.0.1 (token
authentication with --auth), runs `fit_round` against it with --ray-address, removes the worker
node mid-round and prints one JSON line: what was removed when, and the round's summary. A process
of its own, because a Ray driver holds one session per process and the cluster's environment (token
mode, loopback) must be set before Ray is imported.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

FIT_ACTOR = "ShardFitter)).submit"   # the process title of a Ray Data actor while it runs a task


def busy_actor(raylet_pid: int, timeout: float):
    """The first process under the raylet whose title says a ShardFitter is running a task."""
    import psutil

    raylet = psutil.Process(raylet_pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for proc in raylet.children(recursive=True):
                if proc.name().endswith(FIT_ACTOR):
                    return proc
        except psutil.Error:
            pass
        time.sleep(0.1)
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("run")
    parser.add_argument("--auth", action="store_true")
    args = parser.parse_args()
    run = Path(args.run)
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    if args.auth:
        from tests.servers import new_token
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(new_token(run.parent / "auth_token")))

    from ray.cluster_utils import Cluster

    from pipeline import rundir
    from pipeline.config import RunConfig
    from pipeline.fit_stage import fit_round
    from pipeline.rundir import read_fits

    config = RunConfig.from_dict({
        "data": args.data,
        "fit": {"batch_size": 16, "num_actors": 2, "cpus_per_actor": 1,
                # a shard must take seconds, so that the node is removed while one is being fitted
                "smplify": {"stages": [{"name": "camera", "iterations": 50, "solver": "adam"},
                                       {"name": "body", "iterations": 600, "solver": "adam"}]}},
    })
    start = time.monotonic()
    # the head holds one actor, the worker node the other
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    events: dict = {"cluster_seconds": round(time.monotonic() - start, 1)}
    fits_dir = rundir.step_dir(run, 0, "fits")

    def remove_worker_mid_shard() -> None:
        actor = busy_actor(worker.all_processes["raylet"][0].process.pid, timeout=300)
        if actor is None:
            events["removed"] = False
            return
        time.sleep(0.5)  # inside the shard: it takes seconds
        events["committed_before_removal"] = len(list(fits_dir.glob("part-*.parquet")))
        events["actor_cpu_seconds"] = round(sum(actor.cpu_times()[:2]), 1)
        cluster.remove_node(worker, allow_graceful=False)
        events["removed"] = True
        events["removed_at"] = round(time.monotonic() - start, 1)

    chaos = threading.Thread(target=remove_worker_mid_shard, daemon=True)
    chaos.start()
    try:
        summary = fit_round(run, 0, config, ray_address=cluster.address, progress=False)
        chaos.join(timeout=5)
        ids = read_fits(run, 0).column("sample_id").to_pylist()
        print(json.dumps({**events, "rows": summary["rows"], "quarantined": summary["quarantined"],
                          "sample_ids": ids, "seconds": round(time.monotonic() - start, 1)}), flush=True)
    finally:
        import ray
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
