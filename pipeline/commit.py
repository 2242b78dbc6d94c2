"""The run's files on storage and the shard commit protocol.

Layout (the user-facing contract)::

    DEST/run.json                       settings, model card + fingerprint, versions
    DEST/manifest.parquet               the plan: one row per input image
    DEST/instances/shard-00042.parquet  one row per instance
    DEST/images/shard-00042.parquet     one row per image of the shard
    DEST/_commits/shard-00042.json      commit marker + shard summary, written last

Protocol: a shard's two Parquet files are each written whole under a
temporary name and renamed into place (one whole-object PUT on S3), then its
marker is written last. A shard counts as done only when its marker says
``committed``; a rerun rewrites both files under the same names, so a shard
never has two copies. Output names come only from shard ids, never from input
keys.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage

COMMITTED = "committed"
FAILED = "failed"


def shard_name(shard_id: int) -> str:
    """``shard-00042`` for shard 42 (the only way output names are made)."""
    if not isinstance(shard_id, int) or shard_id < 0:
        raise ValueError(f"shard id must be a non-negative int, got {shard_id!r}")
    return f"shard-{shard_id:05d}"


def instances_uri(dest: str, shard_id: int) -> str:
    return storage.join(dest, "instances", f"{shard_name(shard_id)}.parquet")


def images_uri(dest: str, shard_id: int) -> str:
    return storage.join(dest, "images", f"{shard_name(shard_id)}.parquet")


def marker_uri(dest: str, shard_id: int) -> str:
    return storage.join(dest, "_commits", f"{shard_name(shard_id)}.json")


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
    """Write the shard's files, then its ``committed`` marker (with ``summary``) last.

    Each write is retried on transient storage errors.
    """
    for uri, table in ((instances_uri(dest, shard_id), instances), (images_uri(dest, shard_id), images)):
        data = parquet_bytes(table)
        storage.retry_transient(lambda uri=uri, data=data: storage.write_bytes_atomic(uri, data))
    marker = {**summary, "shard_id": shard_id, "status": COMMITTED}
    storage.retry_transient(lambda: write_json(marker_uri(dest, shard_id), marker))


def mark_failed(dest: str, shard_id: int, summary: dict[str, Any]) -> None:
    """Write a ``failed`` marker: the shard is redone by ``--resume``."""
    marker = {**summary, "shard_id": shard_id, "status": FAILED}
    storage.retry_transient(lambda: write_json(marker_uri(dest, shard_id), marker))


def read_markers(dest: str) -> dict[int, dict[str, Any]]:
    """All shard markers under ``DEST/_commits``, by shard id."""
    fs, root = storage.resolve(storage.join(dest, "_commits"))
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return {}
    markers = {}
    for entry in fs.get_file_info(pafs.FileSelector(root)):
        name = entry.base_name
        if entry.type == pafs.FileType.File and name.startswith("shard-") and name.endswith(".json"):
            marker = json.loads(storage.read_bytes(storage.join(dest, "_commits", name)))
            markers[int(marker["shard_id"])] = marker
    return markers


def committed_shards(dest: str) -> set[int]:
    """Ids of the shards whose marker says committed."""
    return {sid for sid, marker in read_markers(dest).items() if marker.get("status") == COMMITTED}
