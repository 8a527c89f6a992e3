"""Ray as a user and an attacker meet it: a local session that only this machine can reach and that
keeps Ray's token authentication on, a fit round that loses a node of a real two-node cluster, and
the README's `ray job submit` path against a head with token authentication."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.servers import has_job_server, is_loopback, listeners, ray_head, stop_group

ROOT = Path(__file__).resolve().parents[1]


def fit_config(path: Path, data: Path, iterations: tuple[int, int]) -> Path:
    """A run YAML whose SMPLify takes `iterations` (camera, body) Adam steps: a round long enough
    to watch, or short enough to wait for."""
    import yaml

    stages = [{"name": "camera", "iterations": iterations[0], "solver": "adam"},
              {"name": "body", "iterations": iterations[1], "solver": "adam"}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"data": str(data), "fit": {"batch_size": 8, "smplify": {"stages": stages}}}))
    return path


def reshard(src: Path, dst: Path, rows: int, limit: int | None = None) -> int:
    """The benchmark's train split as shards of `rows` rows (at most `limit` rows in all)."""
    (dst / "train").mkdir(parents=True)
    table = pq.read_table(sorted((src / "train").glob("*.parquet")))
    table = table.slice(0, limit) if limit else table
    for i, start in enumerate(range(0, len(table), rows)):
        pq.write_table(table.slice(start, rows), dst / "train" / f"part-{i:05d}.parquet")
    return len(table)


def user_env(home: Path) -> dict[str, str]:
    """A user's shell: no Ray authentication setting, a home of its own (where Ray keeps its token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ENABLE"))}
    home.mkdir(parents=True, exist_ok=True)
    return {**env, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}


def reachable_from_the_network(found: set) -> list[int]:
    """The session's ports that accept a TCP connection on this host's own non-loopback addresses,
    as another host's connection would arrive."""
    import psutil

    addresses = [a.address for nic in psutil.net_if_addrs().values() for a in nic
                 if a.family == socket.AF_INET and not is_loopback(a.address)]
    open_ports = []
    for port in sorted({entry.port for entry in found}):
        for address in addresses:
            with socket.socket() as probe:
                probe.settimeout(1.0)
                if probe.connect_ex((address, port)) == 0:
                    open_ports.append(port)
    return open_ports


def intrude(gcs_address: str, marker: Path, home: Path) -> subprocess.CompletedProcess:
    """Another process without the session's token connects to its GCS and runs a task that
    writes `marker`: what an intruder who reaches the port would do."""
    code = ("import pathlib, ray\n"
            f"ray.init(address={gcs_address!r})\n"
            f"ray.get(ray.remote(lambda: pathlib.Path({str(marker)!r}).write_text('written')).remote())\n")
    # on loopback, as a process of this machine reaches it (Ray would turn 127.0.0.1 into the host's
    # address otherwise); giving up in seconds, not 20
    env = {**user_env(home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_NUM_REDIS_GET_RETRIES": "2"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.fault("another host, or a local process without the session's token, reaches the local Ray session of `fit`",
                   "every socket of the session listens on 127.0.0.1 only; a client without the token is refused")
def test_local_fit_round_listens_on_loopback_only_and_keeps_authentication(tiny_benchmark, tmp_path):
    reshard(tiny_benchmark, tmp_path / "data", rows=16, limit=64)
    config = fit_config(tmp_path / "config.yaml", tmp_path / "data", (40, 80))
    fit = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "fit", "--round", "0", "--config", str(config),
         "--run", str(tmp_path / "run"), "--num-actors", "1"],
        env=user_env(tmp_path / "home"), cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    seen: set = set()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and fit.poll() is None:
            found = listeners([fit.pid])
            seen |= set(found)
            if any("ShardFitter" in entry.process for entry in found):
                break  # an actor is up: every kind of process of the session is there
            time.sleep(0.3)
        seen |= set(listeners([fit.pid]))
        gcs = [entry for entry in seen if entry.process == "gcs_server"]
        assert gcs, f"no GCS seen; fit exited with {fit.poll()}: {fit.stderr.read() if fit.poll() is not None else ''}"
        marker = tmp_path / "intruder-was-here"
        intruder = intrude(f"127.0.0.1:{gcs[0].port}", marker, tmp_path / "intruder-home")
    finally:
        stop_group(fit)
    exposed = sorted({(e.ip, e.port, e.process) for e in seen if not is_loopback(e.ip)})
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert not reachable_from_the_network(seen), "a port of the session answers on this host's network address"
    assert not marker.exists() and intruder.returncode != 0, "a process without the token ran a task"


@pytest.mark.slow
@pytest.mark.fault("a worker node of a two-node Ray cluster (token authentication) is removed while its actor fits a shard",
                   "the round finishes; every row fitted once")
def test_fit_round_survives_losing_a_worker_node(tiny_benchmark, tmp_path):
    rows = reshard(tiny_benchmark, tmp_path / "data", rows=16, limit=96)
    result = subprocess.run(
        [sys.executable, "-m", "tests.cluster_round", str(tmp_path / "data"), str(tmp_path / "run"), "--auth"],
        cwd=ROOT, env=user_env(tmp_path / "home"), capture_output=True, text=True, timeout=540,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    report = json.loads(lines[-1])
    assert report["removed"], "the worker node's actor never started a shard"
    shards = len(list((tmp_path / "data" / "train").glob("*.parquet")))
    assert report["committed_before_removal"] < shards, "the node was removed after the round's work"
    ids = report["sample_ids"]
    assert len(ids) == len(set(ids)) == rows - report["quarantined"], "a row was lost or fitted twice"


def submit_when_ready(client, entrypoint: str, timeout: float) -> str:
    """Submit once the head's job agent has registered: the dashboard answers before it does."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.mark.slow
@pytest.mark.fault("a rendered fit manifest's entrypoint submitted with `JobSubmissionClient` to a head with token authentication",
                   "a wrong token is refused; the job succeeds and the round is done")
@pytest.mark.skipif(not has_job_server(), reason="Ray's job server needs the cluster extra: pip install -e '.[cluster]'")
def test_rendered_fit_entrypoint_runs_as_a_ray_job_with_token_authentication(tiny_benchmark, tmp_path):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    from pipeline.manifests import JobSpec, rayjob_manifest

    reshard(tiny_benchmark, tmp_path / "data", rows=16, limit=32)
    config = fit_config(tmp_path / "config.yaml", tmp_path / "data", (10, 20))
    spec = JobSpec.from_dict({"kind": "fit", "round": 0, "image": "spin-pipeline:test", "gpus_per_worker": 0,
                              "data": str(tmp_path / "data"), "run": str(tmp_path / "run"), "config": str(config),
                              "mlflow_uri": "http://127.0.0.1:5000", "volumes": [f"shared:{tmp_path}"]})
    entrypoint = rayjob_manifest(spec)["spec"]["entrypoint"]
    with ray_head(tmp_path / "head") as head:
        token = Path(head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        with pytest.raises(AuthenticationError):
            JobSubmissionClient(head.dashboard, headers={"Authorization": "Bearer wrong"}).list_jobs()
        client = JobSubmissionClient(head.dashboard, headers={"Authorization": f"Bearer {token}"})
        job = submit_when_ready(client, entrypoint, timeout=300)
        deadline = time.monotonic() + 400
        while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
            time.sleep(1)
        logs = client.get_job_logs(job)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    from pipeline import rundir
    assert rundir.read_success(tmp_path / "run", 0, "fits")["rows"] > 0
