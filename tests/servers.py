"""Real servers for the reliability tests, each in its own process group on 127.0.0.1:
an MLflow tracking server, a Ray head with token authentication (Ray's job server needs the
`cluster` extra), and the listening sockets of a process tree.

A server is stopped by signalling its own process group and waiting for every process it
started; never with `ray stop`, which stops every Ray session of the user on the machine.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port that is free on the loopback interface now."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, and 127.x.x.x mapped into IPv6 (::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@dataclass(frozen=True)
class Listener:
    ip: str
    port: int
    pid: int
    process: str


def process_tree(root: int) -> list[psutil.Process]:
    """The process `root` and all its descendants that are alive now."""
    try:
        parent = psutil.Process(root)
        return [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return []


def listeners(roots: list[int]) -> list[Listener]:
    """Every listening TCP socket and every bound, unconnected UDP socket of the process trees."""
    procs = {p.pid: p for root in roots for p in process_tree(root)}
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid not in procs or not conn.laddr:
            continue
        listening = conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr)
        if listening:
            try:
                name = procs[conn.pid].name()
            except psutil.Error:
                name = "?"
            found.append(Listener(conn.laddr.ip, conn.laddr.port, conn.pid, name))
    return found


def stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group that `proc` leads, then SIGKILL what is left of it and of the
    processes it started (some move to their own group)."""
    family = process_tree(proc.pid)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        alive = [p for p in family if p.is_running()]
        if sig == signal.SIGKILL:
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
        _, alive = psutil.wait_procs(alive, timeout=wait)
        if not alive:
            break
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Until `url` answers (any HTTP status counts: an answer means the server is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s: {log.read_text()[-2000:]}")


# ---------------------------------------------------------------------------- MLflow


@dataclass(frozen=True)
class MlflowServer:
    uri: str            # http://127.0.0.1:PORT
    store: Path         # the server's SQLite backend store
    artifacts: Path     # where the server keeps artifacts it is sent
    pid: int


@contextmanager
def mlflow_server(root: Path, timeout: float = 180.0) -> Iterator[MlflowServer]:
    """`mlflow server` on 127.0.0.1 with a SQLite store and served artifacts under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), root / "server.log"
    store, artifacts = root / "server.db", root / "artifacts"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", LOOPBACK, "--port", str(port),
             "--backend-store-uri", f"sqlite:///{store}", "--artifacts-destination", str(artifacts),
             "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
        )
    try:
        wait_http(f"http://{LOOPBACK}:{port}/health", proc, timeout, log)
        yield MlflowServer(f"http://{LOOPBACK}:{port}", store, artifacts, proc.pid)
    finally:
        stop_group(proc, grace=5.0)


# ---------------------------------------------------------------------------- Ray


def loopback_ray_env(token_file: Path | None) -> dict[str, str]:
    """The environment of a Ray node on this machine only: loopback addresses (Ray's switch for a
    single-machine cluster) and, with a token file, token authentication."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    # this interpreter's scripts (ray, spin-pipeline) first, as in an activated environment
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if token_file is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    return env


def new_token(path: Path) -> Path:
    """A token file as `ray get-auth-token --generate` writes one, but in `path`, readable by its
    owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return path


@dataclass(frozen=True)
class RayHead:
    address: str        # 127.0.0.1:GCS_PORT
    dashboard: str      # http://127.0.0.1:PORT, the job server
    env: dict[str, str]  # what a client on this machine needs (token mode, token path)
    pid: int


def has_job_server() -> bool:
    """Whether Ray's job server can run here: it needs `ray[default]` (the `cluster` extra)."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401 - what Ray itself imports to decide
    except ImportError:
        return False
    return True


@contextmanager
def ray_head(root: Path, num_cpus: int = 2, timeout: float = 180.0) -> Iterator[RayHead]:
    """`ray start --head --block` on 127.0.0.1 with token authentication and the dashboard's job
    server, as a user starts a head for `ray job submit`."""
    root.mkdir(parents=True, exist_ok=True)
    env = loopback_ray_env(new_token(root / "auth_token"))
    # the job agent's port too: Ray's fixed default (52365) is taken by any other session with an agent
    gcs, dashboard, agent, log = free_port(), free_port(), free_port(), root / "head.log"
    # a short session folder of its own: Unix socket paths must stay under 108 characters
    temp_dir = tempfile.mkdtemp(prefix="rayhead-")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--node-ip-address={LOOPBACK}",
             "--include-dashboard=true", f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard}",
             f"--dashboard-agent-listen-port={agent}",
             f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        wait_http(f"http://{LOOPBACK}:{dashboard}/api/version", proc, timeout, log)
        yield RayHead(f"{LOOPBACK}:{gcs}", f"http://{LOOPBACK}:{dashboard}", env, proc.pid)
    finally:
        stop_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
