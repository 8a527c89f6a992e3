"""The step lease: one holder, stale leases taken over, a lost lease noticed before the next commit;
locally (real processes racing) and on a real S3 API."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.lease import LEASE, Lease, StepBusy
from tests.test_storage import s3, s3_endpoint  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parents[1]


def write_owner(step: Path, host: str, pid: int, heartbeat_age: float) -> None:
    step.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (step / LEASE).write_text(json.dumps({"host": host, "pid": pid, "id": "other", "started": now - 600,
                                          "heartbeat": now - heartbeat_age}))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.fault("a second process asks for a step's lease while the first holds it",
                   "refused with one line naming the holder (host, pid, heartbeat age)")
def test_one_holder_at_a_time(tmp_path):
    step = tmp_path / "round=0" / "fits"
    with Lease(step, "round 0 fits") as lease:
        owner = json.loads((step / LEASE).read_text())
        assert owner["host"] == socket.gethostname() and owner["pid"] == lease.owner.pid
        with pytest.raises(StepBusy, match=r"round 0 fits is being written by .* pid \d+"):
            Lease(step, "round 0 fits").acquire()
        lease.check()
    assert not (step / LEASE).exists()
    with Lease(step, "round 0 fits"):  # free again
        pass


@pytest.mark.parametrize("host, pid, age, taken", [
    (socket.gethostname(), None, 0.0, True),   # a dead process of this host
    ("elsewhere", 12345, 500.0, True),         # no heartbeat for longer than stale_after
    ("elsewhere", 12345, 5.0, False),          # alive elsewhere
    (socket.gethostname(), "self", 0.0, False),  # a live process here (this one)
])
@pytest.mark.fault("a step's writer died (this host) or stopped renewing its lease (any host)",
                   "its lease is taken over; a live writer's is not")
def test_stale_leases_are_taken_over(tmp_path, host, pid, age, taken):
    import os

    step = tmp_path / "fits"
    write_owner(step, host, dead_pid() if pid is None else os.getpid() if pid == "self" else pid, age)
    lease = Lease(step, "fits", stale_after=120)
    if taken:
        with lease:
            assert json.loads((step / LEASE).read_text())["id"] == lease.owner.id
    else:
        with pytest.raises(StepBusy):
            lease.acquire()


def test_corrupt_lease_is_stale(tmp_path):
    (tmp_path / LEASE).write_text("{not json")
    with Lease(tmp_path, "fits"):
        pass


@pytest.mark.fault("a writer frozen past its lease's expiry finds it taken over",
                   "it stops before its next commit and leaves the new owner's lease alone")
def test_heartbeat_is_renewed_and_a_lost_lease_is_noticed(tmp_path):
    with Lease(tmp_path, "fits", renew_every=0.1) as lease:
        first = json.loads((tmp_path / LEASE).read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads((tmp_path / LEASE).read_text())["heartbeat"] > first
        write_owner(tmp_path, "elsewhere", 1, 0.0)  # taken over while this process was frozen
        with pytest.raises(StepBusy, match="lost its lease to elsewhere pid 1"):
            lease.check()
    assert json.loads((tmp_path / LEASE).read_text())["host"] == "elsewhere", "the new owner's lease was removed"


RACER = """
import sys, time
from pipeline.lease import Lease, StepBusy
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
    with Lease(sys.argv[1], "fits"):
        print("held", flush=True)
        time.sleep(3)
except StepBusy:
    print("busy", flush=True)
"""


@pytest.mark.fault("four processes ask for a free step's lease at the same instant", "exactly one gets it")
def test_racing_processes_get_one_lease(tmp_path):
    start = str(time.time() + 4)  # every racer imports first, then all try at the same instant
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "fits"), start], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outcomes = sorted(r.communicate(timeout=60)[0].strip() for r in racers)
    assert outcomes == ["busy", "busy", "busy", "held"]


@pytest.mark.fault("a second writer of a step of a run on `s3://`", "refused while the lease is live (write, then read back)")
def test_lease_on_an_object_store(s3):  # noqa: F811 - the fixture
    from trainer.data import storage

    step = storage.join(s3, "round=0", "fits")
    with Lease(step, "round 0 fits", renew_every=0.2):
        assert storage.is_file(storage.join(step, LEASE))
        with pytest.raises(StepBusy, match="being written by"):
            Lease(step, "round 0 fits", renew_every=0.2).acquire()
    assert not storage.exists(storage.join(step, LEASE))
