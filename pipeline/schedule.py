"""The driver's scheduling loop: shards to replicas, retries with backoff, failures marked, progress.

The driver holds, per shard, only its id, its size and its attempt count:
O(shards), never the manifest's rows. A replica reads its shard's rows from
the manifest itself, except for the shards handed out while the plan is
still being listed (the manifest is not complete yet): those carry their rows,
and the driver forgets them once the manifest is published.

Each replica holds up to :data:`SHARDS_IN_FLIGHT` shards (one decodes and
encodes while the other infers). A shard whose replica dies gets a fresh
replica; a shard that fails is retried after 1 s, 2 s, 4 s... up to
``max_attempts``, then marked failed (``--resume`` redoes it).
"""

from __future__ import annotations

import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from pipeline import commit
from pipeline.decode import one_line

SHARDS_IN_FLIGHT = 2
"""Shards a replica holds at once: one decodes/encodes while the other infers; 3 measured no faster."""
RETRY_DELAY_S = 1.0
"""A failed shard attempt is retried after 1 s, then 2 s, 4 s...: a storage outage gets time to pass."""


def backoff_timeout(pending, not_before: dict[int, float], now: float) -> float | None:
    """Seconds until the earliest pending shard's retry delay ends; None if none is waiting.

    None makes the driver block until a shard finishes; a shard that may go
    now but has no free replica slot must not turn the wait into a busy loop.
    """
    waiting = [not_before[s] for s in pending if not_before.get(s, 0.0) > now]
    return min(waiting) - now if waiting else None


class Scheduler:
    """Runs shards on Ray replica actors (``ShardWorker``) and records the outcome in ``report``.

    Args:
        dest: the run (for failed markers).
        new_replica: makes a fresh replica actor.
        replicas: how many replicas to keep.
        max_attempts: attempts per shard before it is marked failed.
        report: a ``RunReport`` to fill (committed, failed, counts, stage seconds).
        progress: None (auto), True or False: the progress bar on stderr.
        manifest_ready: whether replicas can read shards' rows from the manifest yet.
    """

    def __init__(
        self,
        dest: str,
        new_replica: Callable[[], Any],
        replicas: int,
        *,
        max_attempts: int,
        report,
        progress: bool | None = None,
        manifest_ready: bool = True,
    ):
        import ray

        self._ray = ray
        self.dest = dest
        self._new_replica = new_replica
        self.actors = [new_replica() for _ in range(replicas)]
        self.load = [0] * replicas
        self.max_attempts = max_attempts
        self.report = report
        self.manifest_ready = manifest_ready
        self.pending: deque[int] = deque()
        self.sizes: dict[int, int] = {}
        self.rows: dict[int, list[dict]] = {}
        self.attempts: Counter[int] = Counter()
        self.not_before: dict[int, float] = {}
        self.in_flight: dict[Any, tuple[int, int, Any]] = {}
        self.bar = _progress_bar(progress)

    def describe_replicas(self) -> list[dict[str, Any]]:
        """Each replica's ``describe()`` (waits until every replica has loaded its model)."""
        return self._ray.get([actor.describe.remote() for actor in self.actors])

    def free_slots(self) -> int:
        return sum(max(0, SHARDS_IN_FLIGHT - load) for load in self.load)

    def add(self, shard_id: int, size: int, rows: list[dict] | None = None) -> None:
        """Queue a shard of ``size`` images.

        Before the manifest is published, a shard queued without ``rows`` waits
        for it; one with rows can go at once (give rows only when a slot is free,
        so the driver holds the rows of at most a few shards).
        """
        self.pending.append(shard_id)
        self.sizes[shard_id] = size
        if rows is not None and not self.manifest_ready:
            self.rows[shard_id] = rows
        self.bar.total = (self.bar.total or 0) + size
        self.bar.refresh()

    def publish_manifest(self) -> None:
        """The manifest is complete: shards not yet handed out may be read from it by the replicas."""
        self.manifest_ready = True
        self.rows.clear()

    def step(self, *, block: bool) -> None:
        """Hand out what can go, then handle finished shards (waiting for one when ``block``)."""
        for index in range(len(self.actors)):
            while self.load[index] < SHARDS_IN_FLIGHT and (shard_id := self._next_ready()) is not None:
                self.attempts[shard_id] += 1
                actor = self.actors[index]
                ref = actor.run_shard.remote(shard_id, self.rows.get(shard_id), self.attempts[shard_id])
                self.in_flight[ref] = (shard_id, index, actor)
                self.load[index] += 1
        timeout = backoff_timeout(self.pending, self.not_before, time.monotonic()) if block else 0.0
        if not self.in_flight:
            time.sleep(timeout or 0.0)
            return
        ready, _ = self._ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
        for ref in ready:
            self._finished(ref)

    def run(self) -> None:
        """Until every queued shard is committed or failed; then the replicas are stopped."""
        while self.pending or self.in_flight:
            self.step(block=True)
        self.bar.close()
        for actor in self.actors:
            self._ray.kill(actor)

    def _next_ready(self) -> int | None:
        now = time.monotonic()
        for shard_id in self.pending:
            if self.not_before.get(shard_id, 0.0) <= now and (self.manifest_ready or shard_id in self.rows):
                self.pending.remove(shard_id)
                return shard_id
        return None

    def _finished(self, ref) -> None:
        from ray.exceptions import RayActorError, RayError, WorkerCrashedError

        shard_id, index, actor = self.in_flight.pop(ref)
        self.load[index] -= 1
        report, name = self.report, commit.shard_name(shard_id)
        try:
            summary = self._ray.get(ref)
        except (RayActorError, WorkerCrashedError) as exc:
            if self.actors[index] is actor:
                self.actors[index] = self._new_replica()
            error = f"replica died: {one_line(exc, 200)}"
        except RayError as exc:
            error = one_line(getattr(exc, "cause", None) or exc, 300)
        else:
            report.committed.append(shard_id)
            report.images_ok += summary["images_ok"]
            report.images_error += summary["images"] - summary["images_ok"]
            report.instances += summary["instances"]
            report.instances_cut += summary.get("instances_cut", 0)
            report.stage_s.update(summary["timings_s"])
            errors = summary["images"] - summary["images_ok"]
            self._line(
                f"{name} committed: {summary['images']} images ({errors} errors), "
                f"{summary['instances']} instances, {summary['timings_s']['total_s']:.1f} s"
            )
            self._advance(summary["images"])
            return
        attempt = self.attempts[shard_id]
        if attempt < self.max_attempts:
            report.retries += 1
            self._line(f"{name} attempt {attempt} failed: {error}; retrying")
            self.not_before[shard_id] = time.monotonic() + RETRY_DELAY_S * 2 ** (attempt - 1)
            self.pending.appendleft(shard_id)
            return
        report.failed[shard_id] = error
        try:
            commit.mark_failed(self.dest, shard_id, {"attempts": attempt, "error": error})
        except OSError as exc:
            # No marker at all is also redone by --resume; losing this write loses nothing.
            self._line(f"could not write the failed marker of {name}: {exc}")
        self._line(f"{name} failed after {attempt} attempts: {error}")
        self._advance(self.sizes[shard_id])

    def _advance(self, images: int) -> None:
        self.bar.update(images)
        self.bar.set_postfix(committed=len(self.report.committed), failed=len(self.report.failed))

    def _line(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)


def _progress_bar(enabled: bool | None):
    from tqdm import tqdm

    return tqdm(
        total=0,
        unit="img",
        desc="segment",
        disable=(None if enabled is None else not enabled),
        file=sys.stderr,
        smoothing=0.1,
    )
