"""One writer per output root: the run lock that nightly, ingest and reprocess runs take.

Prefect's deployment concurrency limit only covers runs of one deployment on one server; two
``medflow nightly`` commands, a served run and a manual one, or two servers can still overlap.
The lock lives under the root itself, so every writer sees it:

- **Local root**: ``<root>/locks/run.lock``, held with an OS lock (``fcntl.flock``) on an open
  file. The kernel drops it when the holding process exits, however it exits (SIGKILL included),
  so a killed run never leaves a lock that blocks the next one. The file's content (pid, host,
  flow, start time) only says who holds it.
- **Object store** (``s3://...``): ``<root>/locks/run.json``, a lease with an expiry that the
  holder renews from a background thread. A killed run stops renewing, and its lease may be taken
  over once expired (``ttl_s``, two minutes by default). Object stores have no lock primitive:
  a lease is written, then read back after a short pause, and the run holds it only if the lease
  read back is its own.

The second run does not fail: it is told who holds the lock and returns a *skipped* result
(``medflow.flows.locking.exclusive_run`` wraps a flow in the lock).
No patient data goes into a lock: only process ids, host, flow name and times.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from medflow.storage.layout import OutputRoot

__all__ = ["RunLock", "run_lock", "skipped_result"]

_LEASE_TTL_S = 120.0
_LEASE_SETTLE_S = 0.5  # pause between writing a lease and reading it back (object stores)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class RunLock:
    """The outcome of trying to take a root's run lock.

    ``acquired``: whether this run holds it; ``holder``: who holds it (this run's own record
    when acquired, the other run's when not, as far as it could be read).
    """

    root: str
    path: str
    acquired: bool
    holder: dict[str, Any] = field(default_factory=dict)

    def describe_holder(self) -> str:
        h = self.holder
        if not h:
            return "another run (no details recorded)"
        bits = [f"{h.get('flow', '?')} run"]
        if h.get("run_id"):
            bits.append(str(h["run_id"]))
        bits.append(f"pid {h.get('pid', '?')} on {h.get('host', '?')}")
        if h.get("acquired_at"):
            bits.append(f"since {h['acquired_at']}")
        return " ".join(bits)


def _holder_record(flow: str, run_id: str | None, token: str) -> dict[str, Any]:
    return {
        "flow": flow,
        "run_id": run_id,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "token": token,
        "acquired_at": _now().isoformat(timespec="seconds"),
    }


@contextlib.contextmanager
def run_lock(
    root: str,
    flow: str,
    *,
    run_id: str | None = None,
    ttl_s: float = _LEASE_TTL_S,
) -> Iterator[RunLock]:
    """Try once (never wait) to take ``root``'s run lock for the ``with`` block.

    Yields a :class:`RunLock`; when ``acquired`` is False another run holds it and the caller
    must not write. The lock is released when the block ends.
    """
    if ttl_s <= 0:
        raise ValueError(f"Expected a lease ttl_s > 0, got {ttl_s} instead.")
    out = OutputRoot(root)
    if out.is_local:
        with _local_lock(out, flow, run_id) as lock:
            yield lock
    else:
        with _lease_lock(out, flow, run_id, ttl_s) as lock:
            yield lock


@contextlib.contextmanager
def _local_lock(out: OutputRoot, flow: str, run_id: str | None) -> Iterator[RunLock]:
    import fcntl

    path = out.join("locks", "run.lock")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OSError(f"{path}: cannot open the run lock file ({e.strerror}).") from e
    try:
        try:
            # per open file: a second open in the same process conflicts too
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield RunLock(out.url, path, False, _read_local_holder(fd))
            return
        holder = _holder_record(flow, run_id, uuid.uuid4().hex)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield RunLock(out.url, path, True, holder)
        finally:
            os.ftruncate(fd, 0)  # the lock file says nobody holds it
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _read_local_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data) if data else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def _lease_lock(out: OutputRoot, flow: str, run_id: str | None, ttl_s: float) -> Iterator[RunLock]:
    fs = out.fs
    path = out.join("locks", "run.json")
    current = _read_lease(fs, path)
    if current and not _expired(current):
        yield RunLock(out.url, path, False, current)
        return
    lease = _holder_record(flow, run_id, uuid.uuid4().hex)
    _write_lease(fs, path, lease, ttl_s)
    time.sleep(_LEASE_SETTLE_S)  # another writer racing us has written by now: last one wins
    current = _read_lease(fs, path)
    if not current or current.get("token") != lease["token"]:
        yield RunLock(out.url, path, False, current or {})
        return
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl_s / 3):
            with contextlib.suppress(Exception):  # a missed renewal is retried next period
                _write_lease(fs, path, lease, ttl_s)

    renewer = threading.Thread(target=renew, name="medflow-lease", daemon=True)
    renewer.start()
    try:
        yield RunLock(out.url, path, True, lease)
    finally:
        stop.set()
        renewer.join()
        current = _read_lease(fs, path)
        if current and current.get("token") == lease["token"]:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(path)


def _read_lease(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        with fs.open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a torn or foreign file: treated as no lease
    return data if isinstance(data, dict) else None


def _write_lease(fs: Any, path: str, lease: dict[str, Any], ttl_s: float) -> None:
    lease["expires_at"] = time.time() + ttl_s
    with fs.open(path, "wb") as f:
        f.write(json.dumps(lease).encode())


def _expired(lease: dict[str, Any]) -> bool:
    try:
        return float(lease.get("expires_at", 0)) < time.time()
    except (TypeError, ValueError):
        return True


def skipped_result(lock: RunLock) -> dict[str, Any]:
    """What a run returns when another one holds the lock: no counts, the reason, who holds it."""
    return {
        "run_id": "",
        "skipped": "another run holds the lock",
        "lock_holder": lock.describe_holder(),
        "discovered": {},
        "series_planned": 0,
        "series_skipped": 0,
        "status": {},
        "modality": {},
        "quarantined": {},
        "seconds": 0.0,
    }
