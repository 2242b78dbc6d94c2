"""Exports: COCO results that loadRes takes and that score AP 1.0 against themselves; QuPath GeoJSON."""

from __future__ import annotations

import contextlib
import io
import json

import pandas as pd
import pytest
import shapely
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.export import coco_results, write_geojson
from tests.helpers import run_job


def as_ground_truth(dest, images: list[dict]) -> COCO:
    """The run's own instances as a COCO ground truth (the image ids the export used)."""
    instances = pd.read_parquet(dest / "instances")
    annotations = []
    for k, row in enumerate(instances.itertuples(), start=1):
        rle = {"size": [int(row.height), int(row.width)], "counts": row.rle}
        annotations.append(
            {
                "id": k,
                "image_id": int(row.image_id),
                "category_id": int(row.label),
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "nucleus"}, {"id": 2, "name": "mitotic"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def test_coco_export_loads_and_scores_one_against_itself(segmented_run, tmp_path):
    output = tmp_path / "results.json"
    result = run_job(
        "jobs.export", str(segmented_run), "--format", "coco", "--output", str(output), timeout=120
    )
    assert result.returncode == 0, result.stderr
    results = json.loads(output.read_text())
    images = json.loads((tmp_path / "results.images.json").read_text())
    assert len(results) == len(pd.read_parquet(segmented_run / "instances")) > 0
    assert len(images) == 6
    truth = as_ground_truth(segmented_run, images)
    with contextlib.redirect_stdout(io.StringIO()):
        detections = truth.loadRes(str(output))
        evaluation = COCOeval(truth, detections, "segm")
        evaluation.params.maxDets = [1, 10, 100]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_coco_export_uses_ground_truth_ids_when_given(segmented_run, archive):
    results, images = coco_results(str(segmented_run), str(archive / "annotations.json"))
    truth_ids = {im["id"] for im in json.loads((archive / "annotations.json").read_text())["images"]}
    assert images is None and results and {r["image_id"] for r in results} <= truth_ids


def test_geojson_is_qupath_shaped_and_every_geometry_valid(segmented_run, tmp_path):
    instances = pd.read_parquet(segmented_run / "instances")
    slide = instances["slide_id"].iloc[0]
    output = tmp_path / "slide.geojson"
    result = run_job(
        "jobs.export",
        str(segmented_run),
        "--format",
        "geojson",
        "--slide",
        slide,
        "--output",
        str(output),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    collection = json.loads(output.read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == (instances["slide_id"] == slide).sum() > 0
    for feature in features:
        geometry = shapely.geometry.shape(feature["geometry"])
        assert geometry.is_valid and geometry.geom_type in ("Polygon", "MultiPolygon")
        props = feature["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] in ("nucleus", "mitotic")
        assert len(props["classification"]["color"]) == 3
        measured = props["measurements"]
        assert {"area", "perimeter", "score", "solidity", "eccentricity", "intensity_mean[0]"} <= set(
            measured
        )
        row = instances[
            (instances["uri"] == props["image"]) & (instances["instance_id"] == props["instance_id"])
        ]
        assert measured["solidity"] == pytest.approx(row["solidity"].item())
        assert measured["intensity_mean[0]"] == pytest.approx(row["intensity_mean"].item()[0])


def test_geojson_of_an_unknown_slide_is_a_clear_error(segmented_run):
    with pytest.raises(ValueError, match="no slide 'nope'"):
        write_geojson(str(segmented_run), io.StringIO(), slide="nope")
    result = run_job(
        "jobs.export", str(segmented_run), "--format", "geojson", "--output", "x.geojson", timeout=120
    )
    assert result.returncode == 2 and "--slide or --image" in result.stderr
