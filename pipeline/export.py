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
import math
from typing import TextIO

import pyarrow as pa
import pyarrow.compute as pc
import shapely

from pipeline import commit, features, storage
from pipeline.evaluate import detections_from_instances, load
from pipeline.stats import dataset, read_slides, read_table

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
        geometries = shapely.from_wkb(batch.column("polygon").to_numpy(zero_copy_only=False))
        if offset != (0, 0):
            geometries = shapely.transform(geometries, lambda xy: xy - offset)
        shapes = shapely.to_geojson(geometries)
        values = _measurements(batch, measured)
        for k, (uri, instance_id, label, class_name) in enumerate(
            zip(
                *(batch.column(c).to_pylist() for c in ("uri", "instance_id", "label", "class_name")),
                strict=True,
            )
        ):
            properties = {
                "objectType": "detection",
                "classification": {"name": class_name, "color": list(class_colour(label))},
                "measurements": values[k],
                "image": storage.redact(uri),
                "instance_id": instance_id,
            }
            separator = ", " if count else ""
            feature = (
                f'{{"type": "Feature", "geometry": {shapes[k]}, "properties": {json.dumps(properties)}}}'
            )
            stream.write(separator + feature)
            count += 1
    stream.write("]}")
    return count


def _bounds_offset(dest: str, slide: str | None) -> tuple[int, int]:
    """(bounds_x, bounds_y) of ``slide`` in the run's slides table; (0, 0) for tiles."""
    slides = read_slides(dest)
    if slide is None or slides is None:
        return (0, 0)
    row = slides[slides["slide_id"] == slide]
    if row.empty:
        return (0, 0)
    return int(row["bounds_x"].fillna(0).iloc[0]), int(row["bounds_y"].fillna(0).iloc[0])


def _measurements(batch: pa.RecordBatch, measured: list[str]) -> list[dict[str, float]]:
    """QuPath ``measurements`` dicts of a batch: the scalar columns and intensity means per channel
    (index); nulls and non-finite values left out."""
    columns = {name: batch.column(name).to_pylist() for name in measured}
    if "intensity_mean" in batch.schema.names:
        means = batch.column("intensity_mean").to_pylist()
        width = max((len(m) for m in means if m), default=0)
        for index in range(width):
            columns[f"intensity_mean[{index}]"] = [m[index] if m and index < len(m) else None for m in means]
    out = []
    for k in range(batch.num_rows):
        row = {}
        for name, values in columns.items():
            value = values[k]
            if value is not None and math.isfinite(value):
                row[name] = float(value)
        out.append(row)
    return out
