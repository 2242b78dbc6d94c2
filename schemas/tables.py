"""Arrow schemas of everything a run writes, with units and conventions.

Coordinates: image pixels, x to the right, y down; pixel (row i, column j)
covers [j, j + 1) x [i, i + 1), so its centre is (j + 0.5, i + 0.5). Boxes are
x0, y0, x1, y1 in those coordinates (x1, y1 are the far edges).

Every file carries its schema name and version in the Arrow metadata
(``segpipe.schema``, ``segpipe.schema_version``); readers check the version.

Whole slides: a slide is segmented window by window. Every coordinate
written for a slide (boxes, centroids, polygons) is in **level-0 pixels of
the slide**; the RLE mask stays in its window's frame, whose origin and scale
are ``tile_x0, tile_y0, tile_downsample`` (plain images: 0, 0, 1). To put a
mask on the slide::

    window = pycocotools.mask.decode({"size": [row.height, row.width], "counts": row.rle})
    # window pixel (i, j) covers level-0 x in tile_x0 + [j, j + 1) * tile_downsample, same for y

Versions: 1 (segpipe 0.1) had no shape or intensity features, no µm columns
and no ``images.channels`` / ``images.pixel_size_um``; version 2 adds them
(:data:`ADDED_IN_VERSION_2`); version 3 adds whole-slide windows
(:data:`ADDED_IN_VERSION_3`); version 4 adds ``images.scale``
(:data:`ADDED_IN_VERSION_4`). Readers of older runs still read every column
those have; asking for a feature of a version 1 run says so; a run resumes
writing shards at the version it started with (:func:`at_version`).
"""

from __future__ import annotations

import json

import pyarrow as pa

SCHEMA_VERSION = "4"
READABLE_VERSIONS = ("1", "2", "3", "4")
"""Schema versions the readers (stats, exports, evaluation, pictures) accept."""

IMAGE_STATUSES = ("ok", "unreadable", "decode", "too_large", "unsupported", "inference")
"""``images.status`` values: ``ok`` or the kind of error that kept the image from being segmented.

* ``unreadable``: the bytes could not be read (I/O error, missing object);
* ``decode``: not a decodable image (corrupt, truncated, another format);
* ``too_large``: more pixels than ``--max-pixels`` (checked from the header);
* ``unsupported``: an image file by its magic bytes that the decoder cannot open
  (zero-sized, unusual compression or layout);
* ``inference``: the model raised on this image.

A slide window that cannot be read is ``unreadable`` (I/O) or ``decode``
(corrupt or truncated tile data). A slide that cannot be planned at all has
no windows: its error is in ``slides.parquet``.
"""

SLIDE_STATUSES = ("ok", "unreadable", "unsupported", "too_large")
"""``slides.status``: ``ok``, or why the slide got no windows (see :data:`SLIDES`)."""


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": doc})


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"segpipe.schema": name, "segpipe.schema_version": SCHEMA_VERSION})


WINDOW_FIELDS = [
    _field(
        "tile_x0",
        pa.float64(),
        "level-0 slide x of the window's pixel-edge origin (may be negative: padding); 0 for a plain image",
        True,
    ),
    _field("tile_y0", pa.float64(), "level-0 slide y of that origin; 0 for a plain image", True),
    _field(
        "tile_downsample",
        pa.float64(),
        "level-0 pixels per window pixel; 1 for a plain image",
        True,
    ),
]
"""Where a window lies on its slide (manifest, images and instances carry them)."""


MANIFEST = _schema(
    "manifest",
    [
        _field("uri", pa.string(), "source image URI (redacted of credentials)"),
        _field("image_id", pa.int64(), "0-based position of the image in the sorted listing"),
        _field("slide_id", pa.string(), "slide (group) the image belongs to"),
        _field("shard_id", pa.int32(), "shard that processes the image: image_id // shard_size"),
        *WINDOW_FIELDS,
        _field("level", pa.int16(), "pyramid level the window is read from; null for a plain image", True),
        _field(
            "tile_size",
            pa.int32(),
            "window side in window pixels (windows at the slide's edge are padded to it); null for a "
            "plain image",
            True,
        ),
        *(
            _field(
                f"core_{name}",
                pa.int64(),
                f"the window's core (the rectangle whose objects it keeps: [core_x0, core_x1) x "
                f"[core_y0, core_y1), level-0 px; the cores partition the slide): {name}; null for a "
                "plain image",
                True,
            )
            for name in ("x0", "y0", "x1", "y1")
        ),
        _field(
            "intensity_offset",
            pa.float64(),
            "the slide's normalisation of raw values (the model card's preprocessing, measured once per "
            "slide on tissue windows): input = (raw - offset) / scale; null: measured per image",
            True,
        ),
        _field("intensity_scale", pa.float64(), "see intensity_offset", True),
    ],
)
"""``DEST/manifest.parquet``: the plan, one row per input unit (a plain image, or a window of a
slide; ``uri`` is then the slide's), written once per run."""

IMAGES = _schema(
    "images",
    [
        _field("image_id", pa.int64(), "see manifest"),
        _field("uri", pa.string(), "see manifest"),
        _field("slide_id", pa.string(), "see manifest"),
        _field("shard_id", pa.int32(), "see manifest"),
        _field("status", pa.string(), f"one of {', '.join(IMAGE_STATUSES)}"),
        _field("error", pa.string(), "one-line error message; null when status is ok", nullable=True),
        _field("height", pa.int32(), "image height in px; null if not decoded", nullable=True),
        _field("width", pa.int32(), "image width in px; null if not decoded", nullable=True),
        _field("n_instances", pa.int32(), "instances written to instances/ for this image"),
        _field(
            "n_empty_masks",
            pa.int32(),
            "detections dropped because their mask was empty after the mask threshold "
            "(or after exclusive pixel ownership)",
        ),
        _field(
            "n_suppressed",
            pa.int32(),
            "detections dropped by mask-overlap suppression (duplicates and fragments)",
        ),
        _field(
            "channels",
            pa.list_(pa.string()),
            "the image's channel names as decoded (red/green/blue, gray, c0..., or OME names); "
            "the intensity lists of its instances follow this order; null if not decoded",
            nullable=True,
        ),
        _field(
            "pixel_size_um",
            pa.float64(),
            "pixel size in µm: --pixel-size-um, else the file's metadata (OME PhysicalSizeX, TIFF "
            "resolution in cm or ImageJ µm); for a window, the slide's times tile_downsample; null "
            "when unknown",
            nullable=True,
        ),
        *WINDOW_FIELDS,
        _field(
            "n_cut",
            pa.int32(),
            "instances kept that touch an inner edge of the window (larger than the overlap lets it "
            "see whole: their masks may be cut); 0 for a plain image",
            True,
        ),
        _field(
            "scale",
            pa.float64(),
            "factor the image was resampled by before the model (--scale; auto enlarges images whose "
            "objects are small); masks, boxes and measurements are in the image's own pixels "
            "whatever it is; 1 for a slide window (read at --mpp); null if not decoded",
            True,
        ),
    ],
)
"""``DEST/images/shard-NNNNN.parquet``: one row per manifest row of the shard (image or window), ok
or not; height and width are the window's for a slide."""

INSTANCES = _schema(
    "instances",
    [
        _field("image_id", pa.int64(), "see manifest"),
        _field("uri", pa.string(), "see manifest"),
        _field("slide_id", pa.string(), "see manifest"),
        _field("shard_id", pa.int32(), "see manifest"),
        _field("instance_id", pa.int32(), "0-based rank within the image, by descending score"),
        _field("label", pa.int16(), "model label (1..K; 0 is background and never written)"),
        _field("class_name", pa.string(), "model card class name of label"),
        _field("score", pa.float32(), "detection confidence in [0, 1]"),
        _field("x0", pa.float32(), "box left edge, px of the original image (level-0 px of a slide)"),
        _field("y0", pa.float32(), "box top edge, px"),
        _field("x1", pa.float32(), "box right edge, px"),
        _field("y1", pa.float32(), "box bottom edge, px"),
        _field("area", pa.int64(), "mask pixel count (the truth for area; px^2 of the image or window)"),
        _field("centroid_x", pa.float64(), "mean x of mask pixel centres, px (level-0 px of a slide)"),
        _field("centroid_y", pa.float64(), "mean y of mask pixel centres, px"),
        _field("perimeter", pa.float64(), "polygon boundary length incl. holes, px"),
        _field(
            "axis_major_length",
            pa.float64(),
            "px; major axis of the ellipse with the mask's second moments (regionprops)",
        ),
        _field("axis_minor_length", pa.float64(), "px; minor axis of that ellipse (regionprops)"),
        _field("eccentricity", pa.float64(), "of that ellipse, 0 (circle) to 1 (line) (regionprops)"),
        _field(
            "orientation",
            pa.float64(),
            "radians in [-pi/2, pi/2]: angle from the row (y, down) axis to the major axis (regionprops)",
        ),
        _field(
            "solidity",
            pa.float64(),
            "area / convex area (pixels whose centres are in the hull of the pixel-edge mid-points; "
            "regionprops)",
        ),
        _field(
            "circularity",
            pa.float64(),
            "4 pi area / perimeter^2 with regionprops' perimeter (not the polygon's); ~0.9 for a disc",
        ),
        _field(
            "area_um2", pa.float64(), "area in µm² (images.pixel_size_um); null when unknown", nullable=True
        ),
        _field(
            "perimeter_um",
            pa.float64(),
            "perimeter in µm; null when the pixel size is unknown",
            nullable=True,
        ),
        _field("axis_major_length_um", pa.float64(), "major axis in µm; null when unknown", nullable=True),
        _field("axis_minor_length_um", pa.float64(), "minor axis in µm; null when unknown", nullable=True),
        _field(
            "intensity_mean",
            pa.list_(pa.float64()),
            "mean raw value over the mask, one per channel (images.channels), native units",
        ),
        _field("intensity_std", pa.list_(pa.float64()), "population standard deviation, per channel"),
        _field("intensity_min", pa.list_(pa.float64()), "minimum raw value, per channel"),
        _field("intensity_max", pa.list_(pa.float64()), "maximum raw value, per channel"),
        _field(
            "intensity_integrated", pa.list_(pa.float64()), "sum of raw values over the mask, per channel"
        ),
        _field("height", pa.int32(), "RLE size: image (or window) height, px"),
        _field("width", pa.int32(), "RLE size: image (or window) width, px"),
        _field("rle", pa.string(), "COCO compressed RLE counts (ASCII), column-major over height x width"),
        _field(
            "polygon",
            pa.binary(),
            "WKB Polygon/MultiPolygon along pixel edges, image coordinates (level-0 px of a slide); "
            "holds exactly the mask's pixel centres; its area is `area` plus 1/8 px^2 per corner cut "
            "diagonally (times tile_downsample^2 for a slide)",
        ),
        *WINDOW_FIELDS,
    ],
)
"""``DEST/instances/shard-NNNNN.parquet``: one row per instance.

Rows are ordered by image_id, then score descending (``instance_id``). To decode a
mask: ``pycocotools.mask.decode({"size": [height, width], "counts": rle})``
(a slide's: in its window's frame, see the module docstring). Pixel-unit
measurements (area, perimeter, axis lengths) are in image or window pixels;
their ``_um`` versions are comparable across slides and levels.
The file carries GeoParquet metadata (see :func:`geo_metadata`) so GeoPandas
reads ``polygon`` as geometry.
"""


SLIDES = _schema(
    "slides",
    [
        _field("uri", pa.string(), "slide file URI (redacted of credentials)"),
        _field("slide_id", pa.string(), "the file's stem (the slide_id of its windows and instances)"),
        _field("status", pa.string(), f"one of {', '.join(SLIDE_STATUSES)}"),
        _field("error", pa.string(), "one-line reason when status is not ok", nullable=True),
        _field("width", pa.int64(), "level-0 width, px", nullable=True),
        _field("height", pa.int64(), "level-0 height, px", nullable=True),
        _field("levels", pa.int16(), "pyramid levels", nullable=True),
        _field("level_downsamples", pa.list_(pa.float64()), "level-0 px per level px", nullable=True),
        _field("vendor", pa.string(), "aperio, ome, generic, ... (the reader's)", nullable=True),
        _field(
            "mpp",
            pa.float64(),
            "µm per level-0 pixel used (--mpp-override, else the slide's own); null when unknown",
            nullable=True,
        ),
        _field(
            "mpp_note",
            pa.string(),
            "why mpp is missing or where it came from when not the slide's own metadata",
            nullable=True,
        ),
        _field(
            "bounds_x",
            pa.int64(),
            "level-0 x of the scanned area that viewers crop to (QuPath; 0 when the vendor gives none)",
            nullable=True,
        ),
        _field("bounds_y", pa.int64(), "level-0 y of that area", nullable=True),
        _field("level", pa.int16(), "level the windows are read from", nullable=True),
        _field("tile_downsample", pa.float64(), "level-0 px per window px", nullable=True),
        _field("tiles_planned", pa.int64(), "windows in the manifest (only where they touch tissue)"),
        _field("intensity_offset", pa.float64(), "see manifest.intensity_offset", nullable=True),
        _field("intensity_scale", pa.float64(), "see manifest.intensity_scale", nullable=True),
        _field("tiles_total", pa.int64(), "windows a grid over the whole slide would have"),
        _field(
            "tissue_area_mm2",
            pa.float64(),
            "tissue area found on the low-resolution level, mm²; null when mpp is unknown",
            nullable=True,
        ),
        _field("tissue_fraction", pa.float64(), "tissue area / slide area", nullable=True),
    ],
)
"""``DEST/slides.parquet``: one row per slide file, written when the plan is complete (runs
without slides have none). A slide in error has no windows and the run goes on."""


def geo_metadata() -> dict[bytes, bytes]:
    """GeoParquet 1.1 file metadata for ``instances``: ``polygon`` is WKB, no CRS (pixel space)."""
    geo = {
        "version": "1.1.0",
        "primary_column": "polygon",
        "columns": {
            "polygon": {
                "encoding": "WKB",
                "geometry_types": ["Polygon", "MultiPolygon"],
                "crs": None,
            }
        },
    }
    return {b"geo": json.dumps(geo).encode()}


ADDED_IN_VERSION_3 = frozenset(
    {"tile_x0", "tile_y0", "tile_downsample", "level", "tile_size", "n_cut"}
    | {"core_x0", "core_y0", "core_x1", "core_y1", "intensity_offset", "intensity_scale"}
)
"""Columns of ``manifest``, ``images`` and ``instances`` that version 2 did not have."""

ADDED_IN_VERSION_4 = frozenset({"scale"})
"""Columns of ``images`` that version 3 did not have."""

ADDED_IN_VERSION_2 = frozenset(
    {
        "axis_major_length",
        "axis_minor_length",
        "eccentricity",
        "orientation",
        "solidity",
        "circularity",
        "area_um2",
        "perimeter_um",
        "axis_major_length_um",
        "axis_minor_length_um",
        "intensity_mean",
        "intensity_std",
        "intensity_min",
        "intensity_max",
        "intensity_integrated",
        "channels",
        "pixel_size_um",
    }
)
"""Columns of ``instances`` and ``images`` that version 1 did not have."""


def at_version(schema: pa.Schema, version: str) -> pa.Schema:
    """``schema`` as an older version wrote it (its fields only, its version number).

    A run keeps the version it started with: shards redone by ``--resume``
    match the others (the writer drops what the older version lacked).
    """
    if version == SCHEMA_VERSION:
        return schema
    if version not in READABLE_VERSIONS:
        raise ValueError(f"unknown schema version {version!r}; known: {', '.join(READABLE_VERSIONS)}")
    added = {"2": ADDED_IN_VERSION_2, "3": ADDED_IN_VERSION_3, "4": ADDED_IN_VERSION_4}
    later = frozenset().union(*(columns for since, columns in added.items() if int(since) > int(version)))
    kept = [f for f in schema if f.name not in later]
    return pa.schema(kept, metadata={**schema.metadata, b"segpipe.schema_version": version.encode()})


def instances_schema(version: str = SCHEMA_VERSION) -> pa.Schema:
    """:data:`INSTANCES` (at ``version``) with the GeoParquet metadata added."""
    schema = at_version(INSTANCES, version)
    return schema.with_metadata({**schema.metadata, **geo_metadata()})


def check_version(schema: pa.Schema, name: str, accept: tuple[str, ...] = (SCHEMA_VERSION,)) -> str:
    """The schema version of table ``name``; ValueError unless it is one of ``accept``."""
    meta = schema.metadata or {}
    got = (meta.get(b"segpipe.schema", b"?").decode(), meta.get(b"segpipe.schema_version", b"?").decode())
    if got[0] != name or got[1] not in accept:
        raise ValueError(
            f"expected {name} schema version {' or '.join(accept)}, got {got[0]} version {got[1]}"
        )
    return got[1]
