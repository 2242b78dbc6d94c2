"""Plan a run: list the source as a stream, keep image files, lay windows on slides, cut shards,
write the manifest.

Units: a plain image is one manifest row; a whole slide (:mod:`pipeline.slides`)
is opened here, its tissue found on a low-resolution level, and each window
laid on the tissue is one row (the slide's URI, the window's place in
``tile_*`` and ``core_*`` columns). Slides are opened a few at a time beside
the listing, and their rows take the slide's place in the listing order.

The plan never holds the archive in memory: the source is listed one
top-level folder at a time (several folders listed in parallel, in order),
shards are cut as the sorted listing arrives, and each shard becomes one row
group of ``DEST/manifest.parquet`` as soon as it is complete. The first shard
can be dispatched while the listing goes on.

The plan is written once and never re-derived on resume, so shard ids stay
stable even if the source changes. A replica reads its own shard's rows from
the manifest (one row group); the driver only reads the manifest's footer.

Sorted order: the URIs come out in plain string order of their path relative
to the source, exactly as sorting a full listing would give (the paths under
one folder are a contiguous range of that order, so folders can be listed one
by one).
"""

from __future__ import annotations

import collections
import fnmatch
import itertools
import math
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import slides, storage
from pipeline.concurrency import bounded_map
from pipeline.slides import SlidePlan, SlideSettings
from schemas import MANIFEST, READABLE_VERSIONS, SLIDES, check_version

IMAGE_EXTENSIONS = (
    frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}) | slides.SLIDE_EXTENSIONS
)
SLIDE_PLANNERS = 4
"""Slides opened and planned at once (each reads a header and a low-resolution level)."""
SLIDE_LOOKAHEAD = 256
"""Listing entries that may wait behind a slide being planned."""
LISTERS = 8
"""Folders listed at once (each one LIST stream on S3)."""
AUTO_SHARD_LOOKAHEAD = 100_000
"""Without --shard-size, the plan looks at up to this many images before choosing the shard size."""
SHARDS_PER_REPLICA = 8
"""Without --shard-size, small archives get about this many shards per replica (balance, cheap retries)."""
MIN_AUTO_SHARD, MAX_AUTO_SHARD = 16, 1024
"""Bounds of the chosen shard size: a 10M-image archive gets 1024 (about 10k files per table)."""


class PlanError(ValueError):
    """The source cannot be planned (missing, empty, slide pattern not matching)."""


def choose_shard_size(images: int | None, replicas: int) -> int:
    """The shard size for an archive of ``images`` images (None: more than the lookahead) on ``replicas``.

    About :data:`SHARDS_PER_REPLICA` shards per replica, as a power of two
    between :data:`MIN_AUTO_SHARD` and :data:`MAX_AUTO_SHARD`; archives larger
    than the lookahead get the maximum (10M images: 9,766 shards).
    """
    if images is None:
        return MAX_AUTO_SHARD
    wanted = max(images / (SHARDS_PER_REPLICA * max(replicas, 1)), 1)
    return int(min(max(2 ** round(math.log2(wanted)), MIN_AUTO_SHARD), MAX_AUTO_SHARD))


class SlideNamer:
    """The slide id of a URI: its parent folder's name, or the named group ``slide`` of a pattern.

    The pattern is searched in the path relative to the source; the source
    folder's own name stands for images directly in it.

    Raises:
        PlanError: the pattern is invalid, has no ``slide`` group, or does not match a path.
    """

    def __init__(self, source: str, pattern: str | None = None):
        self.prefix = source.rstrip("/") + "/"
        self.root_name = PurePosixPath(source.rstrip("/")).name
        self.regex = None
        if pattern is not None:
            try:
                self.regex = re.compile(pattern)
            except re.error as exc:
                raise PlanError(f"--slide-pattern is not a valid regular expression: {exc}") from None
            if "slide" not in self.regex.groupindex:
                raise PlanError("--slide-pattern needs a named group 'slide', e.g. '(?P<slide>[^/]+)/'")

    def __call__(self, uri: str) -> str:
        relative = uri[len(self.prefix) :] if uri.startswith(self.prefix) else uri
        if self.regex is None:
            return PurePosixPath(relative).parent.name or self.root_name
        match = self.regex.search(relative)
        if match is None or not match.group("slide"):
            raise PlanError(f"--slide-pattern matched no slide in {relative!r}")
        return match.group("slide")


def _is_image(relative: PurePosixPath) -> bool:
    return relative.suffix.lower() in IMAGE_EXTENSIONS and not any(p.startswith(".") for p in relative.parts)


def excluded(relative: PurePosixPath, patterns: tuple[str, ...]) -> bool:
    """Does the path relative to the source match one of ``patterns`` (shell globs, case-sensitive,
    ``*`` crossing folders: ``*_labels.*`` matches ``a/b/x_labels.tif``)?"""
    text = relative.as_posix()
    return any(fnmatch.fnmatchcase(text, pattern) for pattern in patterns)


def iter_images(
    source: str, *, listers: int = LISTERS, filesystem: pafs.FileSystem | None = None
) -> Iterator[str]:
    """The image URIs under ``source`` (recursive), sorted, as a stream (see :func:`iter_listing`)."""
    return (uri for uri, _ in iter_listing(source, listers=listers, filesystem=filesystem))


def _filesystem_and_path(source: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    return (filesystem, source) if filesystem is not None else storage.resolve(source)


def check_source(source: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """``source``'s filesystem and path, after one request that it is a folder or prefix (the segment
    job asks before it starts Ray, so a mistyped source fails at once).

    Raises:
        PlanError: the source does not exist or is not a folder/prefix.
    """
    fs, root = _filesystem_and_path(source, filesystem)
    info = storage.retry_transient(lambda: fs.get_file_info(root))
    if info.type == pafs.FileType.NotFound:
        raise PlanError(f"source {storage.redact(source)} does not exist")
    if info.type != pafs.FileType.Directory:
        raise PlanError(f"source {storage.redact(source)} is not a folder or prefix")
    return fs, root


def _no_images_message(source: str, exclude: tuple[str, ...] = ()) -> str:
    left_out = f"; --exclude {' '.join(exclude)} left out the rest" if exclude else ""
    return (
        f"no image files under {storage.redact(source)} "
        f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))}{left_out})"
    )


def check_source_top_level(source: str) -> list[pafs.FileInfo]:
    """:func:`check_source`, then the one LIST of the top level that the plan needs: it must hold an
    image file or a folder. Returns that listing (give it to :class:`Plan` as ``top_level``, so a
    flat archive of a million files is not listed twice).

    The segment job asks before it starts Ray, so an empty folder (or one of
    notes and spreadsheets) fails in a second. A source whose folders hold
    no image is refused by :class:`Plan` once they are listed.

    Raises:
        PlanError: the source does not exist, is not a folder/prefix, or has
            nothing at its top level that is or may hold an image.
    """
    fs, root = check_source(source)
    top = storage.retry_transient(lambda: fs.get_file_info(pafs.FileSelector(root)))
    for entry in top:
        if entry.base_name.startswith("."):
            continue
        if entry.type == pafs.FileType.Directory or (
            entry.type == pafs.FileType.File and _is_image(PurePosixPath(entry.base_name))
        ):
            return top
    raise PlanError(_no_images_message(source))


def iter_listing(
    source: str,
    *,
    listers: int = LISTERS,
    filesystem: pafs.FileSystem | None = None,
    top_level: list[pafs.FileInfo] | None = None,
    exclude: tuple[str, ...] = (),
) -> Iterator[tuple[str, int | None]]:
    """(URI, size in bytes) of the image files under ``source`` (recursive), sorted, as a stream.

    One LIST of the top level, then each top-level folder listed recursively
    (``listers`` at a time, in sorted order, each retried on transient
    errors). Image files are chosen by extension (case-insensitive, see
    :data:`IMAGE_EXTENSIONS`); directories are never images, whatever their
    name; hidden files and folders (name starting with '.') are skipped.
    ``filesystem`` lists ``source`` as a path on that filesystem instead of
    resolving it as a URI (a generated listing in benchmarks and tests).
    ``top_level``: the top level as :func:`check_source_top_level` listed it
    (neither checked nor listed again). ``exclude``: files whose path relative
    to ``source`` matches one of these globs are left out (:func:`excluded`).

    Raises:
        PlanError: the source does not exist or is not a folder/prefix.
    """
    if top_level is None:
        fs, root = check_source(source, filesystem)
        top = storage.retry_transient(lambda: fs.get_file_info(pafs.FileSelector(root)))
    else:  # already checked and listed
        (fs, root), top = _filesystem_and_path(source, filesystem), top_level
    # A folder's paths all start with "name/": sorting the top level by that key keeps global order.
    top = sorted(
        (e for e in top if not e.base_name.startswith(".")),
        key=lambda e: e.base_name + ("/" if e.type == pafs.FileType.Directory else ""),
    )

    def relative(path: str) -> PurePosixPath:
        return PurePosixPath(path[len(root) :].lstrip("/"))

    def wanted(entry: pafs.FileInfo) -> bool:
        path = relative(entry.path)
        return entry.type == pafs.FileType.File and _is_image(path) and not excluded(path, exclude)

    def list_folder(entry: pafs.FileInfo) -> list[tuple[str, int | None]]:
        if entry.type != pafs.FileType.Directory:
            return [(entry.path, entry.size)] if wanted(entry) else []
        selector = pafs.FileSelector(entry.path, recursive=True)
        listed = storage.retry_transient(lambda: fs.get_file_info(selector))
        return sorted((e.path, e.size) for e in listed if wanted(e))

    with ThreadPoolExecutor(listers, thread_name_prefix="list") as pool:
        for entries in bounded_map(pool, list_folder, top, listers):
            for path, size in entries:
                yield storage.join(source, str(relative(path))), size


@dataclass(frozen=True)
class Shard:
    """One shard of the plan: its id and its manifest rows (:data:`schemas.MANIFEST`)."""

    shard_id: int
    rows: pa.Table


class Plan:
    """The shards of ``source``, cut as its sorted listing arrives (iterate to get them).

    With ``shard_size`` None, up to :data:`AUTO_SHARD_LOOKAHEAD` images are
    listed at construction and :func:`choose_shard_size` picks the size for
    ``replicas``; ``self.shard_size`` is the size used either way.
    ``filesystem``, ``top_level``, ``exclude``: see :func:`iter_listing`. ``slide_settings``: how windows
    are laid on slide files; after iteration ``self.slides`` holds one
    ``slides`` row per slide file (:data:`schemas.SLIDES`).

    Raises (at construction or while iterating):
        PlanError: missing source, no image files (or no slide that could be
            planned), or a bad slide pattern.
    """

    def __init__(
        self,
        source: str,
        *,
        shard_size: int | None,
        replicas: int = 1,
        slide_pattern: str | None = None,
        filesystem: pafs.FileSystem | None = None,
        slide_settings: SlideSettings | None = None,
        top_level: list[pafs.FileInfo] | None = None,
        exclude: tuple[str, ...] = (),
    ):
        if shard_size is not None and shard_size < 1:
            raise PlanError(f"shard size must be at least 1, got {shard_size}")
        self.source = source
        self._namer = SlideNamer(source, slide_pattern)
        self._slide_settings = slide_settings or SlideSettings()
        self.slides: list[dict] = []
        self._exclude = exclude
        self._listing = iter_listing(source, filesystem=filesystem, top_level=top_level, exclude=exclude)
        self._lookahead: list[tuple[str, int | None]] = []
        if shard_size is None:
            for uri in self._listing:
                self._lookahead.append(uri)
                if len(self._lookahead) >= AUTO_SHARD_LOOKAHEAD:
                    break
            complete = len(self._lookahead) < AUTO_SHARD_LOOKAHEAD
            shard_size = choose_shard_size(len(self._lookahead) if complete else None, replicas)
        self.shard_size = shard_size

    def __iter__(self) -> Iterator[Shard]:
        batch: list[tuple[str, str, dict | None]] = []
        image_id = shard_id = 0
        for unit in self._units(itertools.chain(self._lookahead, self._listing)):
            batch.append(unit)
            if len(batch) == self.shard_size:
                yield Shard(shard_id, _shard_rows(batch, image_id, shard_id))
                image_id, shard_id, batch = image_id + len(batch), shard_id + 1, []
        self._lookahead = []
        if batch:
            yield Shard(shard_id, _shard_rows(batch, image_id, shard_id))
        elif shard_id == 0 and self.slides:
            reasons = "; ".join(f"{r['slide_id']}: {r['error'] or 'no tissue'}" for r in self.slides[:3])
            raise PlanError(
                f"no slide under {storage.redact(self.source)} has a window to segment ({reasons})"
            )
        elif shard_id == 0:
            raise PlanError(_no_images_message(self.source, self._exclude))

    def _units(self, listing) -> Iterator[tuple[str, str, dict | None]]:
        """(uri, slide_id, window columns or None) per manifest row, in listing order; slides are planned
        :data:`SLIDE_PLANNERS` at a time while the listing goes on."""
        pending: collections.deque = collections.deque()
        with ThreadPoolExecutor(SLIDE_PLANNERS, thread_name_prefix="slide-plan") as pool:
            for uri, size in listing:
                slide = slides.is_slide_candidate(uri, size)
                pending.append(
                    (uri, pool.submit(slides.plan_slide, uri, self._slide_settings) if slide else None)
                )
                while pending and (
                    pending[0][1] is None or pending[0][1].done() or len(pending) > SLIDE_LOOKAHEAD
                ):
                    yield from self._expand(*pending.popleft())
            while pending:
                yield from self._expand(*pending.popleft())

    def _expand(self, uri: str, planned) -> Iterator[tuple[str, str, dict | None]]:
        """The units of one listed file: itself (a plain image), or its slide's windows (``planned``:
        the future of its :class:`SlidePlan`), whose ``slides`` row is recorded."""
        if planned is None:
            yield uri, self._namer(uri), None
            return
        plan: SlidePlan = planned.result()
        if not plan.is_slide:
            yield uri, self._namer(uri), None
            return
        self.slides.append(plan.row)
        intensity = {k: plan.row.get(k) for k in ("intensity_offset", "intensity_scale")}
        for window in plan.windows:
            yield uri, plan.row["slide_id"], {**window.row(), **intensity}


_PLAIN_IMAGE = {name: None for name in MANIFEST.names} | {
    "tile_x0": 0.0,
    "tile_y0": 0.0,
    "tile_downsample": 1.0,
}
"""The window columns of a plain image's manifest row (origin 0, downsample 1, no level or core)."""


def plain_image_row(uri: str, image_id: int = 0, slide_id: str = "", shard_id: int = 0) -> dict:
    """The manifest row (dict) of a plain image file: for calling a replica's reader directly."""
    return {**_PLAIN_IMAGE, "uri": uri, "image_id": image_id, "slide_id": slide_id, "shard_id": shard_id}


def _shard_rows(units: list[tuple[str, str, dict | None]], first_id: int, shard_id: int) -> pa.Table:
    n = len(units)
    columns: dict[str, list] = {
        "uri": [storage.redact(uri) for uri, _, _ in units],
        "image_id": pa.array(range(first_id, first_id + n), pa.int64()),
        "slide_id": [slide_id for _, slide_id, _ in units],
        "shard_id": pa.array([shard_id] * n, pa.int32()),
    }
    if all(window is None for _, _, window in units):  # a tile archive: constant window columns
        columns.update({name: [value] * n for name, value in _PLAIN_IMAGE.items() if name not in columns})
    else:
        rows = [{**_PLAIN_IMAGE, **window} if window else _PLAIN_IMAGE for _, _, window in units]
        columns.update({name: [r[name] for r in rows] for name in _PLAIN_IMAGE if name not in columns})
    return pa.table(columns, schema=MANIFEST)


def slides_uri(dest: str) -> str:
    return storage.join(dest, "slides.parquet")


def write_slides(dest: str, rows: list[dict]) -> None:
    """``DEST/slides.parquet`` (:data:`schemas.SLIDES`): one row per slide file; nothing without slides."""
    if rows:
        table = pa.Table.from_pylist(rows, schema=SLIDES)
        fs, path = storage.resolve(slides_uri(dest))
        with fs.open_output_stream(path) as stream:
            pq.write_table(table, stream, compression="zstd")


def manifest_uri(dest: str) -> str:
    return storage.join(dest, "manifest.parquet")


class ManifestWriter:
    """Writes ``DEST/manifest.parquet`` one shard (one row group) at a time; it appears whole at close.

    The file is written under a dot-file name (readers skip it) and moved into
    place when complete (a rename locally, a server-side copy on S3). Use as a
    context manager; an exception leaves no manifest.
    """

    def __init__(self, dest: str):
        self.uri = manifest_uri(dest)
        self.shards = self.images = 0
        self._temporary = storage.join(dest, ".tmp-manifest.parquet")
        self._fs, self._path = storage.resolve(self.uri)
        self._temporary_path = storage.resolve(self._temporary)[1]
        self._stream = None
        self._writer = None

    def __enter__(self) -> ManifestWriter:
        self._fs.create_dir(self._path.rsplit("/", 1)[0], recursive=True)
        self._stream = self._fs.open_output_stream(self._temporary_path)
        self._writer = pq.ParquetWriter(self._stream, MANIFEST, compression="zstd")
        return self

    def write(self, shard: Shard) -> None:
        """Append the shard's rows as one row group (shards must come in order, from 0)."""
        if shard.shard_id != self.shards:
            raise ValueError(f"shard {shard.shard_id} written after {self.shards} shards")
        self._writer.write_table(shard.rows, row_group_size=max(shard.rows.num_rows, 1))
        self.shards += 1
        self.images += shard.rows.num_rows

    def __exit__(self, kind, value, traceback) -> None:
        self._writer.close()
        self._stream.close()
        if kind is None:
            storage.retry_transient(lambda: self._fs.move(self._temporary_path, self._path))
        else:
            self._fs.delete_file(self._temporary_path)


class ManifestReader:
    """Reads one shard's rows, or every shard's size, from a run's manifest without reading the rest.

    New manifests hold one shard per row group; older ones one row group in
    all: row groups are chosen by their ``shard_id`` statistics, so both work.
    """

    def __init__(self, dest: str):
        fs, path = storage.resolve(manifest_uri(dest))
        self._file = pq.ParquetFile(fs.open_input_file(path))
        check_version(self._file.schema_arrow, "manifest", READABLE_VERSIONS)
        self._column = self._file.schema_arrow.get_field_index("shard_id")

    def _group_range(self, index: int) -> tuple[int, int] | None:
        stats = self._file.metadata.row_group(index).column(self._column).statistics
        return (stats.min, stats.max) if stats is not None and stats.has_min_max else None

    def rows(self, shard_id: int) -> list[dict]:
        """The manifest rows of ``shard_id`` (dicts, in manifest order)."""
        groups = [
            i
            for i in range(self._file.num_row_groups)
            if (r := self._group_range(i)) is None or r[0] <= shard_id <= r[1]
        ]
        table = self._file.read_row_groups(groups)
        table = table.filter(pc.equal(table["shard_id"], shard_id))
        for name in MANIFEST.names:  # manifests before version 3 have no window columns
            if name not in table.column_names:
                value = _PLAIN_IMAGE[name]
                table = table.append_column(
                    name, pa.array([value] * table.num_rows, MANIFEST.field(name).type)
                )
        return table.select(MANIFEST.names).cast(MANIFEST).to_pylist()

    def shard_sizes(self) -> dict[int, int]:
        """Images per shard id, from the footer when each row group is one shard, else from one column."""
        ranges = [self._group_range(i) for i in range(self._file.num_row_groups)]
        if all(r is not None and r[0] == r[1] for r in ranges):
            meta = self._file.metadata
            return {r[0]: meta.row_group(i).num_rows for i, r in enumerate(ranges)}
        counts = pc.value_counts(self._file.read(columns=["shard_id"])["shard_id"])
        return {int(c["values"]): int(c["counts"]) for c in counts.to_pylist()}

    def close(self) -> None:
        self._file.close()
