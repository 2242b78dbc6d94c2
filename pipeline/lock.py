"""One writer per run folder: a lock file with a heartbeat, taken over when its owner is dead.

``DEST/_lock.json`` holds the owner (host, pid, a random token), when it
started and its last heartbeat (Unix seconds). The owner rewrites it every
``HEARTBEAT_S`` seconds and deletes it when done. A lock is stale, and is
taken over with a warning, when its owner is a dead process on this host or
its heartbeat is older than ``STALE_AFTER_S`` seconds (an owner on another
host that stopped beating). After writing its lock, a taker reads it back and
gives up if another taker's token won; object stores without
create-if-absent make this best effort, which is enough for the case it
guards against: a user starting a second job on the same DEST by mistake.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipeline import commit, storage

HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
SETTLE_S = 0.2
"""Pause between writing the lock and reading it back (lets a racing taker's write land)."""

log = logging.getLogger("segpipe")


class RunLocked(RuntimeError):
    """Another live job is writing the same run folder."""


def lock_uri(dest: str) -> str:
    return storage.join(dest, "_lock.json")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(owner: dict[str, Any], now: float, stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why the lock ``owner`` is stale (its process is gone, or its heartbeat is old), or None if live."""
    if owner.get("host") == socket.gethostname() and not _process_alive(int(owner.get("pid", -1))):
        return f"its process {owner.get('pid')} on this host is gone"
    age = now - float(owner.get("heartbeat", 0))
    if age > stale_after_s:
        return f"its last heartbeat was {age:.0f} s ago"
    return None


@dataclass
class RunLock:
    """A held lock on ``dest``; use :func:`acquire` to get one, ``release()`` (or ``with``) to drop it."""

    dest: str
    token: str
    started: float
    heartbeat_s: float = HEARTBEAT_S
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _payload(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "heartbeat": time.time(),
        }

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = commit.read_json(lock_uri(self.dest))
            except (OSError, ValueError) as exc:
                log.warning("lock heartbeat on %s skipped: %s", storage.redact(self.dest), exc)
                continue
            if current.get("token") != self.token:
                log.error(
                    "the lock on %s was taken by another job (pid %s on %s); this job keeps its "
                    "shards' commit protocol but stops claiming the folder",
                    storage.redact(self.dest),
                    current.get("pid"),
                    current.get("host"),
                )
                return
            try:
                commit.write_json(lock_uri(self.dest), self._payload())
            except OSError as exc:
                log.warning("lock heartbeat on %s skipped: %s", storage.redact(self.dest), exc)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if commit.read_json(lock_uri(self.dest)).get("token") == self.token:
                storage.delete(lock_uri(self.dest))
        except (OSError, ValueError):
            log.warning(
                "could not remove the lock on %s; the next job takes it over", storage.redact(self.dest)
            )

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(dest: str, *, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S) -> RunLock:
    """Take the lock on ``dest`` (taking over a stale one) and start its heartbeat.

    Raises:
        RunLocked: a live job holds it, or a racing job took it first.
    """
    uri = lock_uri(dest)
    if storage.exists(uri):
        owner = commit.read_json(uri)
        reason = stale_reason(owner, time.time(), stale_after_s)
        if reason is None:
            age = time.time() - float(owner.get("heartbeat", 0))
            raise RunLocked(
                f"{storage.redact(dest)} is being written by another job (pid {owner.get('pid')} on "
                f"{owner.get('host')}, heartbeat {age:.0f} s ago); wait for it to end, or if it was "
                f"killed on another host, retry in {max(stale_after_s - age, 0):.0f} s"
            )
        log.warning(
            "taking over the lock on %s from pid %s on %s: %s",
            storage.redact(dest),
            owner.get("pid"),
            owner.get("host"),
            reason,
        )
    lock = RunLock(dest=dest, token=uuid.uuid4().hex, started=time.time(), heartbeat_s=heartbeat_s)
    commit.write_json(uri, lock._payload())
    time.sleep(SETTLE_S)
    winner = commit.read_json(uri)
    if winner.get("token") != lock.token:
        raise RunLocked(
            f"{storage.redact(dest)} was claimed by another job at the same moment "
            f"(pid {winner.get('pid')} on {winner.get('host')})"
        )
    lock._thread = threading.Thread(target=lock._beat, daemon=True, name="run-lock-heartbeat")
    lock._thread.start()
    return lock
