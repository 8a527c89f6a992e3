"""One writer per step: an exclusive lease file in the step's folder, RUN/round=N/STEP/_LEASE.json.

The lease names its owner (host, pid, a random id) and carries a heartbeat that a background thread
renews every `renew_every` seconds while the step runs. Another process that finds a live lease
stops with one line naming the owner. A lease is stale, and is taken over, when its heartbeat is
older than `stale_after` seconds (a killed or frozen owner on any host) or when its owner is a
process of this host that no longer exists. Heartbeats are wall-clock times, so `stale_after`
must exceed the clock skew between hosts as well as `renew_every`.

Locally the lease is created by a hard link, which fails if it exists, so exactly one of two racing processes gets it. On an
object store without conditional writes the lease is written and read back after a pause; the
later of two racing writers wins and the other stops, so a race there is narrowed, not excluded.
The owner checks that it still holds the lease before every commit (`Lease.check`), so a writer
that lost its lease (frozen past `stale_after`) stops instead of writing over the new owner.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from fitting.errors import BadInput
from pipeline.rundir import LEASE
from trainer.data import storage
from trainer.data.storage import Location


class StepBusy(BadInput):
    """The step has a live writer, or this process lost its lease to another one."""


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    id: str
    started: float
    heartbeat: float

    def describe(self, now: float) -> str:
        return f"{self.host} pid {self.pid} (heartbeat {now - self.heartbeat:.0f} s ago)"


def _read(path: Location) -> Owner | None:
    try:
        data = json.loads(storage.read_text(path))
        return Owner(str(data["host"]), int(data["pid"]), str(data["id"]), float(data["started"]), float(data["heartbeat"]))
    except BadInput:
        return None  # gone
    except (ValueError, KeyError, TypeError):
        # not a lease this code wrote (writes are whole: a link or a rename locally, one PUT on
        # an object store): an owner nobody can renew, so stale
        return Owner("?", -1, "corrupt", 0.0, 0.0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(owner: Owner, now: float, stale_after: float) -> bool:
    if now - owner.heartbeat > stale_after:
        return True
    return owner.host == socket.gethostname() and not _pid_alive(owner.pid)


class Lease:
    """Hold with `with Lease(step_dir):`; `check()` before each commit."""

    def __init__(self, step_dir: Location, what: str, renew_every: float = 15.0, stale_after: float = 120.0):
        self.path = storage.join(step_dir, LEASE)
        self.what = what
        self.renew_every, self.stale_after = float(renew_every), float(stale_after)
        now = time.time()
        self.owner = Owner(socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: Owner | None = None

    # ------------------------------------------------------------------ taking and giving back
    def __enter__(self) -> "Lease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(3):  # a stale lease removed by someone else between our read and our create
            current = _read(self.path)
            now = time.time()
            if current is not None and not is_stale(current, now, self.stale_after):
                raise StepBusy(f"{self.what} is being written by {current.describe(now)}; "
                               f"wait for it, or stop it (its lease: {self.path})")
            if current is not None:
                self._remove_stale(current)
            if self._create():
                self._thread = threading.Thread(target=self._renew, name="lease-heartbeat", daemon=True)
                self._thread.start()
                return
        raise StepBusy(f"{self.what}: another process keeps taking the lease {self.path}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost is None and self._holds():
            storage.delete(self.path)

    # ------------------------------------------------------------------ while held
    def check(self) -> None:
        """StepBusy if another process has taken the lease since."""
        if self.lost is None and not self._holds():
            self.lost = _read(self.path) or Owner("?", -1, "gone", 0.0, 0.0)
        if self.lost is not None:
            raise StepBusy(f"{self.what}: this process lost its lease to {self.lost.describe(time.time())}; "
                           "nothing more is written")

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_every):
            if not self._holds():
                self.lost = _read(self.path) or Owner("?", -1, "gone", 0.0, 0.0)
                return
            self._write(self.path, heartbeat=time.time())

    # ------------------------------------------------------------------ storage
    def _holds(self) -> bool:
        current = _read(self.path)
        return current is not None and current.id == self.owner.id

    def _payload(self, heartbeat: float) -> str:
        return json.dumps({**asdict(self.owner), "heartbeat": heartbeat})

    def _write(self, path: Location, heartbeat: float) -> None:
        storage.write_text(path, self._payload(heartbeat))

    def _create(self) -> bool:
        """Create the lease if nobody has; True when this process holds it afterwards."""
        heartbeat = time.time()
        location = storage.location(self.path)
        if isinstance(location, Path):
            # written whole beside it, then linked into place: link fails if the lease exists,
            # and a reader never sees a lease half written
            location.parent.mkdir(parents=True, exist_ok=True)
            draft = location.with_name(f".{LEASE}.{self.owner.id}")
            draft.write_text(self._payload(heartbeat))
            try:
                os.link(draft, location)
            except FileExistsError:
                return False
            finally:
                draft.unlink()
            return True
        if storage.exists(location):
            return False
        self._write(location, heartbeat)
        time.sleep(min(2.0, self.renew_every))  # a racing writer's PUT lands in this window
        return self._holds()

    def _remove_stale(self, stale: Owner) -> None:
        """Delete the lease if it is still the stale one read before (not a fresh one that
        another process created since)."""
        current = _read(self.path)
        if current is not None and current.id == stale.id:
            storage.delete(self.path)
