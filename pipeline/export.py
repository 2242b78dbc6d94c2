"""Exports of a run's instances: COCO results JSON and QuPath-compatible GeoJSON.

* COCO results: the list ``pycocotools.coco.COCO.loadRes`` takes (``image_id``,
  ``category_id``, ``segmentation`` as compressed RLE, ``bbox`` as x, y, w, h,
  ``score``). With the ground truth's annotations file, image ids are the
  ground truth's (matched by path relative to the run's source); without it,
  they are the run's ``image_id`` and an images list (id, file_name, height,
  width) is returned to go with them. ``category_id`` is the model's label
  (1-based index into the card's classes).
* GeoJSON: a FeatureCollection with one Feature per instance, streamed to
  disk: its polygon in the tile's pixel coordinates (a whole slide's: in
  QuPath's frame for the slide, level-0 pixels less the bounds offset), ``objectType: detection``, a
  ``classification`` (name and RGB colour) and ``measurements`` (area and
  perimeter in px, score, the shape features, µm sizes where the pixel size is
  known, mean raw intensity per channel), as QuPath imports them. Tiles are separate images,
  so the export is per tile (``image``) or per slide with each feature's
  ``image`` property naming its tile.
"""

from __future__ import annotations

import json
from typing import TextIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import shapely

from pipeline import commit, features, storage
from pipeline.evaluate import detections_from_instances, load
from pipeline.stats import dataset, read_table, slide_row

CLASS_COLOURS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
"""RGB colour of class k (label k + 1), cycling: matplotlib's tab10."""


def class_colour(label: int) -> tuple[int, int, int]:
    """RGB colour of a 1-based label."""
    return CLASS_COLOURS[(label - 1) % len(CLASS_COLOURS)]


def coco_results(dest: str, annotations: str | None = None) -> tuple[list[dict], list[dict] | None]:
    """(COCO results list, images list or None) of the run at ``dest``.

    With ``annotations``, image ids are the ground truth's and the images list
    is None; instances of images not in the ground truth are left out.

    Raises:
        ValueError: ``annotations`` matches no image of the run.
    """
    if annotations:
        matched = load(dest, annotations)
        return detections_from_instances(matched.instances), None
    instances = read_table(dest, "instances").assign(gt_id=lambda t: t["image_id"])
    images = read_table(dest, "images")
    images = images[images["status"] == "ok"].sort_values("image_id")
    listed = [
        {"id": int(r.image_id), "file_name": r.uri, "height": int(r.height), "width": int(r.width)}
        for r in images.itertuples()
    ]
    return detections_from_instances(instances), listed


MEASUREMENTS = (
    "area",
    "perimeter",
    "score",
    *features.SHAPE_FEATURES,
    "area_um2",
    "perimeter_um",
    "axis_major_length_um",
    "axis_minor_length_um",
)
"""Scalar instance columns exported as QuPath measurements (those the run has; nulls left out)."""


def write_geojson(dest: str, stream: TextIO, *, slide: str | None = None, image: str | None = None) -> int:
    """Write a GeoJSON FeatureCollection of the run's instances on ``slide`` and/or ``image`` (a tile
    URI) to the text ``stream``, a batch of rows at a time; return the number of features.

    A whole slide's features are in the frame QuPath shows the slide in:
    level-0 pixels less the slide's bounds offset (``slides.bounds_x/y``,
    non-zero for vendors whose viewers crop to the scanned area).

    Raises:
        ValueError: neither is given, or nothing of the run matches them.
    """
    if slide is None and image is None:
        raise ValueError("give a slide or an image to export")
    wanted = [
        pc.field(name) == value for name, value in (("slide_id", slide), ("uri", image)) if value is not None
    ]
    where = wanted[0] if len(wanted) == 1 else wanted[0] & wanted[1]
    if dataset(dest, "images").count_rows(filter=where) == 0:
        raise ValueError(
            f"the run at {storage.redact(dest)} has no "
            + (f"slide {slide!r}" if slide is not None else f"image {image!r}")
        )
    offset = _bounds_offset(dest, slide)
    instances = dataset(dest, "instances")
    names = set(instances.schema.names)
    measured = [name for name in MEASUREMENTS if name in names]
    columns = ["uri", "instance_id", "label", "class_name", "polygon", *measured]
    columns += ["intensity_mean"] if "intensity_mean" in names else []
    run = commit.read_json(storage.join(dest, "run.json"))
    header = {"model": run["model"]["card"]["name"], "slide": slide, "image": image}
    stream.write('{"type": "FeatureCollection", "properties": ' + json.dumps(header) + ', "features": [')
    count = 0
    for batch in instances.to_batches(columns=columns, filter=where):
        if not batch.num_rows:
            continue
        stream.write((", " if count else "") + _features_json(batch, measured, offset))
        count += batch.num_rows
    stream.write("]}")
    return count


def _features_json(batch: pa.RecordBatch, measured: list[str], offset: tuple[int, int]) -> str:
    """The GeoJSON Features of a batch of instance rows, comma-separated, built column by column
    (geometries by GEOS, measurements by pandas' JSON writer, joined by Arrow)."""
    keys = list(zip(batch.column("label").to_pylist(), batch.column("class_name").to_pylist(), strict=True))
    texts = {key: json.dumps({"name": key[1], "color": list(class_colour(int(key[0])))}) for key in set(keys)}
    classification = [texts[key] for key in keys]
    images = {uri: json.dumps(storage.redact(uri)) for uri in set(batch.column("uri").to_pylist())}
    parts = [
        '{"type": "Feature", "geometry": ',
        pa.array(_geometries_json(batch.column("polygon"), offset), pa.string()),
        ', "properties": {"objectType": "detection", "classification": ',
        pa.array(classification, pa.string()),
        ', "measurements": ',
        pa.array(_measurements_json(batch, measured), pa.string()),
        ', "image": ',
        pa.array([images[uri] for uri in batch.column("uri").to_pylist()], pa.string()),
        ', "instance_id": ',
        pc.cast(batch.column("instance_id"), pa.string()),
        "}}",
    ]
    features = pc.binary_join_element_wise(*parts, "")
    return ", ".join(features.to_pylist())


def _bounds_offset(dest: str, slide: str | None) -> tuple[int, int]:
    """(bounds_x, bounds_y) of ``slide`` in the run's slides table; (0, 0) for tiles."""
    row = slide_row(dest, slide) if slide is not None else None
    if row is None:
        return (0, 0)
    return tuple(int(row[name]) if pd.notna(row[name]) else 0 for name in ("bounds_x", "bounds_y"))


def _geometries_json(polygons: pa.Array, offset: tuple[int, int]) -> np.ndarray:
    """GeoJSON geometry texts of WKB polygons less ``offset`` (GEOS: about 15 µs a polygon, over half
    of the export's time; it holds the GIL, so threads do not help)."""
    geometries = shapely.from_wkb(polygons.to_numpy(zero_copy_only=False))
    if offset != (0, 0):
        geometries = shapely.transform(geometries, lambda xy: xy - offset)
    return shapely.to_geojson(geometries)


def _measurements_json(batch: pa.RecordBatch, measured: list[str]) -> list[str]:
    """QuPath ``measurements`` objects of a batch as JSON texts: the scalar columns and intensity
    means per channel (index); columns null in every row left out, non-finite values null."""
    table = pd.DataFrame({name: batch.column(name).to_numpy(zero_copy_only=False) for name in measured})
    if "intensity_mean" in batch.schema.names:
        means = batch.column("intensity_mean").to_pylist()  # images of one run may differ in channels
        width = max((len(m) for m in means if m), default=0)
        for index in range(width):
            table[f"intensity_mean[{index}]"] = [m[index] if m and index < len(m) else None for m in means]
    table = table.astype(float).replace([np.inf, -np.inf], np.nan).dropna(axis=1, how="all")
    return table.to_json(orient="records", lines=True, double_precision=15).splitlines()
