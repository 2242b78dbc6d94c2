"""Arrow schemas of everything a run writes, with units and conventions.

Coordinates: image pixels, x to the right, y down; pixel (row i, column j)
covers [j, j + 1) x [i, i + 1), so its centre is (j + 0.5, i + 0.5). Boxes are
x0, y0, x1, y1 in those coordinates (x1, y1 are the far edges).

Every file carries its schema name and version in the Arrow metadata
(``segpipe.schema``, ``segpipe.schema_version``); readers check the version.
"""

from __future__ import annotations

import json

import pyarrow as pa

SCHEMA_VERSION = "1"

IMAGE_STATUSES = ("ok", "unreadable", "decode", "too_large", "unsupported", "inference")
"""``images.status`` values: ``ok`` or the kind of error that kept the image from being segmented.

* ``unreadable``: the bytes could not be read (I/O error, missing object);
* ``decode``: not a decodable image (corrupt, truncated, another format);
* ``too_large``: more pixels than ``--max-pixels`` (checked from the header);
* ``unsupported``: an image file by its magic bytes that the decoder cannot open
  (zero-sized, unusual compression or layout);
* ``inference``: the model raised on this image.
"""


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"description": doc})


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={"segpipe.schema": name, "segpipe.schema_version": SCHEMA_VERSION})


MANIFEST = _schema(
    "manifest",
    [
        _field("uri", pa.string(), "source image URI (redacted of credentials)"),
        _field("image_id", pa.int64(), "0-based position of the image in the sorted listing"),
        _field("slide_id", pa.string(), "slide (group) the image belongs to"),
        _field("shard_id", pa.int32(), "shard that processes the image: image_id // shard_size"),
    ],
)
"""``DEST/manifest.parquet``: the plan, one row per input image, written once per run."""

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
    ],
)
"""``DEST/images/shard-NNNNN.parquet``: one row per input image of the shard, ok or not."""

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
        _field("x0", pa.float32(), "box left edge, px of the original image"),
        _field("y0", pa.float32(), "box top edge, px"),
        _field("x1", pa.float32(), "box right edge, px"),
        _field("y1", pa.float32(), "box bottom edge, px"),
        _field("area", pa.int64(), "mask pixel count (the truth for area; px^2)"),
        _field("centroid_x", pa.float64(), "mean x of mask pixel centres, px"),
        _field("centroid_y", pa.float64(), "mean y of mask pixel centres, px"),
        _field("perimeter", pa.float64(), "polygon boundary length incl. holes, px"),
        _field("height", pa.int32(), "RLE size: image height, px"),
        _field("width", pa.int32(), "RLE size: image width, px"),
        _field("rle", pa.string(), "COCO compressed RLE counts (ASCII), column-major over height x width"),
        _field(
            "polygon",
            pa.binary(),
            "WKB Polygon/MultiPolygon along pixel edges, image coordinates; holds exactly the mask's "
            "pixel centres; its area is `area` plus 1/8 px^2 per corner cut diagonally",
        ),
    ],
)
"""``DEST/instances/shard-NNNNN.parquet``: one row per instance.

Rows are ordered by uri, then score descending (``instance_id``). To decode a
mask: ``pycocotools.mask.decode({"size": [height, width], "counts": rle})``.
The file carries GeoParquet metadata (see :func:`geo_metadata`) so GeoPandas
reads ``polygon`` as geometry.
"""


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


def instances_schema() -> pa.Schema:
    """:data:`INSTANCES` with the GeoParquet metadata added."""
    return INSTANCES.with_metadata({**INSTANCES.metadata, **geo_metadata()})


def check_version(schema: pa.Schema, name: str) -> None:
    """Raise ValueError unless ``schema`` is table ``name`` at :data:`SCHEMA_VERSION`."""
    meta = schema.metadata or {}
    got = (meta.get(b"segpipe.schema", b"?").decode(), meta.get(b"segpipe.schema_version", b"?").decode())
    if got != (name, SCHEMA_VERSION):
        raise ValueError(f"expected {name} schema version {SCHEMA_VERSION}, got {got[0]} version {got[1]}")
