"""The run's files on storage and the shard commit protocol.

Layout (the user-facing contract)::

    DEST/run.json                       settings, model card + fingerprint, versions
    DEST/manifest.parquet               the plan: one row per input image
    DEST/instances/shard-00042.parquet  one row per instance
    DEST/images/shard-00042.parquet     one row per image of the shard
    DEST/_commits/shard-00042.committed.json   commit marker + shard summary, written last
    DEST/_commits/shard-00042.failed.json      or: the shard failed every attempt (summary, error)

Protocol: a shard's markers are deleted first; its two Parquet files are each
written whole under a temporary name and renamed into place (one
whole-object PUT on S3); its ``committed`` marker is written last. A shard
counts as done only when its ``committed`` marker exists; a rerun rewrites
both files under the same names, so a shard never has two copies. A shard has
at most one marker at any time, and its status is in the marker's name, so
one listing of ``_commits/`` tells the state of every shard (no GET per
marker; 10,000 markers are 10 LIST pages on S3). Runs written before the
status was in the name (``shard-00042.json``, status inside) still read: those
markers are opened one by one. Output names come only from shard ids, never
from input keys.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage

COMMITTED = "committed"
FAILED = "failed"
_MARKER_NAME = re.compile(r"^shard-(\d{5,})(?:\.(committed|failed))?\.json$")


def shard_name(shard_id: int) -> str:
    """``shard-00042`` for shard 42 (the only way output names are made)."""
    if not isinstance(shard_id, int) or shard_id < 0:
        raise ValueError(f"shard id must be a non-negative int, got {shard_id!r}")
    return f"shard-{shard_id:05d}"


def instances_uri(dest: str, shard_id: int) -> str:
    return storage.join(dest, "instances", f"{shard_name(shard_id)}.parquet")


def images_uri(dest: str, shard_id: int) -> str:
    return storage.join(dest, "images", f"{shard_name(shard_id)}.parquet")


def marker_uri(dest: str, shard_id: int, status: str | None) -> str:
    """The marker of ``shard_id`` with ``status`` (committed / failed), or the legacy name for None."""
    suffix = f".{status}.json" if status else ".json"
    return storage.join(dest, "_commits", f"{shard_name(shard_id)}{suffix}")


def _remove_markers(dest: str, shard_id: int) -> None:
    """Delete every marker the shard may have (committed, failed, legacy); missing ones are fine."""
    for status in (COMMITTED, FAILED, None):
        try:
            storage.retry_transient(lambda status=status: storage.delete(marker_uri(dest, shard_id, status)))
        except FileNotFoundError:
            continue


def parquet_bytes(table: pa.Table) -> bytes:
    """``table`` as a zstd-compressed Parquet file in memory (schema metadata kept)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_json(uri: str, payload: dict[str, Any]) -> None:
    """Atomically write ``payload`` as indented JSON."""
    storage.write_bytes_atomic(uri, json.dumps(payload, indent=2, sort_keys=True).encode())


def read_json(uri: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(uri))


def commit_shard(
    dest: str, shard_id: int, instances: pa.Table, images: pa.Table, summary: dict[str, Any]
) -> None:
    """Remove the shard's markers, write its files, then its ``committed`` marker (with ``summary``) last.

    Each write is retried on transient storage errors.
    """
    _remove_markers(dest, shard_id)
    for uri, table in ((instances_uri(dest, shard_id), instances), (images_uri(dest, shard_id), images)):
        data = parquet_bytes(table)
        storage.retry_transient(lambda uri=uri, data=data: storage.write_bytes_atomic(uri, data))
    marker = {**summary, "shard_id": shard_id, "status": COMMITTED}
    storage.retry_transient(lambda: write_json(marker_uri(dest, shard_id, COMMITTED), marker))


def mark_failed(dest: str, shard_id: int, summary: dict[str, Any]) -> None:
    """Replace the shard's marker by a ``failed`` one: the shard is redone by ``--resume``."""
    _remove_markers(dest, shard_id)
    marker = {**summary, "shard_id": shard_id, "status": FAILED}
    storage.retry_transient(lambda: write_json(marker_uri(dest, shard_id, FAILED), marker))


@dataclass
class ShardStates:
    """The state of a run's shards from one listing of ``_commits/``: ids committed and failed."""

    committed: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    legacy_markers: int = 0
    """Markers of the older naming that had to be opened to read their status."""


def shard_states(dest: str) -> ShardStates:
    """Which shards are committed or failed: one listing of ``DEST/_commits``.

    A shard with two markers (impossible by the protocol, unless a listing
    raced a commit) counts as committed only if one of them says so and none
    says failed. Legacy ``shard-NNNNN.json`` markers are read (8 at a time).
    """
    fs, root = storage.resolve(storage.join(dest, "_commits"))
    selector = pafs.FileSelector(root, allow_not_found=True)
    states = ShardStates()
    legacy = []
    for entry in storage.retry_transient(lambda: fs.get_file_info(selector)):
        match = _MARKER_NAME.match(entry.base_name)
        if entry.type != pafs.FileType.File or not match:
            continue
        shard_id, status = int(match.group(1)), match.group(2)
        if status is None:
            legacy.append(shard_id)
        else:
            (states.committed if status == COMMITTED else states.failed).add(shard_id)
    if legacy:
        with ThreadPoolExecutor(8) as pool:
            for shard_id, marker in zip(
                legacy, pool.map(lambda s: read_marker(dest, s, None), legacy), strict=True
            ):
                (states.committed if marker.get("status") == COMMITTED else states.failed).add(shard_id)
        states.legacy_markers = len(legacy)
    states.committed -= states.failed
    return states


def read_marker(dest: str, shard_id: int, status: str | None = COMMITTED) -> dict[str, Any]:
    """The JSON of one marker (for people and tests; readers of state use :func:`shard_states`)."""
    return read_json(marker_uri(dest, shard_id, status))


def committed_shards(dest: str) -> set[int]:
    """Ids of the shards with a committed marker (one listing of ``_commits/``)."""
    return shard_states(dest).committed
