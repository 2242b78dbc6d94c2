"""Plan a run: list the source, keep image files, derive slide ids, cut shards.

The plan is written once to ``DEST/manifest.parquet`` and never re-derived on
resume, so shard ids stay stable even if the source changes.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import storage
from schemas import MANIFEST

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})


class PlanError(ValueError):
    """The source cannot be planned (missing, empty, slide pattern not matching)."""


def _uri_for(source: str, fs_path: str, root_path: str) -> str:
    """The URI of a listed file, written in the same form as ``source``."""
    relative = fs_path[len(root_path) :].lstrip("/")
    return storage.join(source, relative)


def list_images(source: str) -> list[str]:
    """Sorted URIs of the image files under ``source`` (recursive).

    Image files are chosen by extension (case-insensitive, see
    :data:`IMAGE_EXTENSIONS`); directories are never listed, whatever their name.
    Hidden files and folders (name starting with '.') are skipped.

    Raises:
        PlanError: the source does not exist or is not a folder/prefix.
    """
    fs, root = storage.resolve(source)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise PlanError(f"source {storage.redact(source)} does not exist")
    if info.type != pafs.FileType.Directory:
        raise PlanError(f"source {storage.redact(source)} is not a folder or prefix")
    selector = pafs.FileSelector(root, recursive=True)
    uris = []
    for entry in storage.retry_transient(lambda: fs.get_file_info(selector)):
        if entry.type != pafs.FileType.File:
            continue
        relative = PurePosixPath(entry.path[len(root) :].lstrip("/"))
        if any(part.startswith(".") for part in relative.parts):
            continue
        if relative.suffix.lower() in IMAGE_EXTENSIONS:
            uris.append(_uri_for(source, entry.path, root))
    return sorted(uris)


def slide_ids(uris: list[str], source: str, pattern: str | None = None) -> list[str]:
    """The slide id of each URI.

    Default: the name of the image's parent folder (the source folder's own
    name for images directly in it). With ``pattern``, a regular expression
    searched in the path relative to ``source`` whose named group ``slide``
    gives the id.

    Raises:
        PlanError: the pattern has no ``slide`` group or does not match some path.
    """
    prefix = source.rstrip("/") + "/"
    relative = [u[len(prefix) :] if u.startswith(prefix) else u for u in uris]
    if pattern is None:
        root_name = PurePosixPath(source.rstrip("/")).name
        return [PurePosixPath(r).parent.name or root_name for r in relative]
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise PlanError(f"--slide-pattern is not a valid regular expression: {exc}") from None
    if "slide" not in regex.groupindex:
        raise PlanError("--slide-pattern needs a named group 'slide', e.g. '(?P<slide>[^/]+)/'")
    ids, misses = [], []
    for r in relative:
        match = regex.search(r)
        if match is None or not match.group("slide"):
            misses.append(r)
            ids.append("")
        else:
            ids.append(match.group("slide"))
    if misses:
        raise PlanError(
            f"--slide-pattern matched no slide in {len(misses)} of {len(uris)} paths, e.g. {misses[0]!r}"
        )
    return ids


def make_manifest(uris: list[str], slides: list[str], shard_size: int) -> pa.Table:
    """The manifest table (:data:`schemas.MANIFEST`): image ids in listing order, fixed-size shards."""
    if shard_size < 1:
        raise PlanError(f"shard size must be at least 1, got {shard_size}")
    image_ids = list(range(len(uris)))
    return pa.table(
        {
            "uri": [storage.redact(u) for u in uris],
            "image_id": image_ids,
            "slide_id": slides,
            "shard_id": [i // shard_size for i in image_ids],
        },
        schema=MANIFEST,
    )


def plan(source: str, *, shard_size: int, slide_pattern: str | None = None) -> pa.Table:
    """List ``source`` and return its manifest.

    Raises:
        PlanError: missing source, no image files, or a bad slide pattern.
    """
    uris = list_images(source)
    if not uris:
        raise PlanError(
            f"no image files under {storage.redact(source)} "
            f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    return make_manifest(uris, slide_ids(uris, source, slide_pattern), shard_size)
