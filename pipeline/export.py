"""Exports of a run's instances: COCO results JSON and QuPath-compatible GeoJSON.

* COCO results: the list ``pycocotools.coco.COCO.loadRes`` takes (``image_id``,
  ``category_id``, ``segmentation`` as compressed RLE, ``bbox`` as x, y, w, h,
  ``score``). With the ground truth's annotations file, image ids are the
  ground truth's (matched by path relative to the run's source); without it,
  they are the run's ``image_id`` and an images list (id, file_name, height,
  width) is returned to go with them. ``category_id`` is the model's label
  (1-based index into the card's classes).
* GeoJSON: a FeatureCollection with one Feature per instance: its polygon in
  the tile's pixel coordinates, ``objectType: detection``, a
  ``classification`` (name and RGB colour) and ``measurements`` (area and
  perimeter in px, score, the shape features, µm sizes where the pixel size is
  known, mean raw intensity per channel), as QuPath imports them. Tiles are separate images,
  so the export is per tile (``image``) or per slide with each feature's
  ``image`` property naming its tile.
"""

from __future__ import annotations

import math

import pandas as pd
import shapely

from pipeline import commit, features, storage
from pipeline.evaluate import detections_from_instances, load
from pipeline.stats import read_table

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


def _select(instances: pd.DataFrame, slide: str | None, image: str | None) -> pd.DataFrame:
    if slide is not None:
        instances = instances[instances["slide_id"] == slide]
    if image is not None:
        instances = instances[instances["uri"] == image]
    return instances


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


def _measurements(row) -> dict[str, float]:
    """A QuPath ``measurements`` dict: the scalar columns, and intensity means per channel (index)."""
    values = {name: float(getattr(row, name)) for name in MEASUREMENTS if hasattr(row, name)}
    means = getattr(row, "intensity_mean", None)
    for index, value in enumerate([] if means is None else means):
        values[f"intensity_mean[{index}]"] = float(value)
    return {name: value for name, value in values.items() if math.isfinite(value)}


def geojson(dest: str, *, slide: str | None = None, image: str | None = None) -> dict:
    """A GeoJSON FeatureCollection of the run's instances on ``slide`` and/or ``image`` (a tile URI).

    Raises:
        ValueError: neither is given, or nothing of the run matches them.
    """
    if slide is None and image is None:
        raise ValueError("give a slide or an image to export")
    instances = _select(read_table(dest, "instances"), slide, image)
    if instances.empty:
        images = _select(read_table(dest, "images", columns=["uri", "slide_id"]), slide, image)
        if images.empty:
            raise ValueError(
                f"the run at {storage.redact(dest)} has no "
                + (f"slide {slide!r}" if slide is not None else f"image {image!r}")
            )
    geometries = shapely.from_wkb(instances["polygon"].to_numpy())
    features = []
    for row, geometry in zip(instances.itertuples(), geometries, strict=True):
        features.append(
            {
                "type": "Feature",
                "geometry": shapely.geometry.mapping(geometry),
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": row.class_name, "color": list(class_colour(row.label))},
                    "measurements": _measurements(row),
                    "image": storage.redact(row.uri),
                    "instance_id": int(row.instance_id),
                },
            }
        )
    run = commit.read_json(storage.join(dest, "run.json"))
    return {
        "type": "FeatureCollection",
        "features": features,
        "properties": {"model": run["model"]["card"]["name"], "slide": slide, "image": image},
    }
