"""Evaluation: AP 1.0 on the ground truth itself, lower when instances are missing; the sweep."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipeline import commit
from pipeline.evaluate import evaluate, sweep
from schemas import IMAGES, instances_schema
from tests.helpers import run_job


def write_run_from_ground_truth(archive, dest, drop_every: int | None = None, score_threshold: float = 0.0):
    """A run whose instances are the COCO ground truth of ``archive`` (score 1), one shard."""
    coco = json.loads((archive / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    image_rows, columns = [], {f.name: [] for f in instances_schema()}
    for image_id, info in enumerate(coco["images"]):
        uri = str(archive / info["file_name"])
        anns = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
        if drop_every:
            anns = anns[::drop_every]
        for k, ann in enumerate(anns):
            x, y, w, h = ann["bbox"]
            values = dict(
                image_id=image_id,
                uri=uri,
                slide_id=info["file_name"].split("/")[0],
                shard_id=0,
                instance_id=k,
                label=ann["category_id"],
                class_name=names[ann["category_id"]],
                score=1.0,
                x0=x,
                y0=y,
                x1=x + w,
                y1=y + h,
                area=int(ann["area"]),
                centroid_x=0.0,
                centroid_y=0.0,
                perimeter=0.0,
                height=info["height"],
                width=info["width"],
                rle=ann["segmentation"]["counts"],
                polygon=b"",
                tile_x0=0.0,
                tile_y0=0.0,
                tile_downsample=1.0,
            )
            for key, value in values.items():
                columns[key].append(value)
        image_rows.append(
            dict(
                image_id=image_id,
                uri=uri,
                slide_id=info["file_name"].split("/")[0],
                shard_id=0,
                status="ok",
                error=None,
                height=info["height"],
                width=info["width"],
                n_instances=len(anns),
                n_empty_masks=0,
                n_suppressed=0,
            )
        )
    # Measurements the scores never read: zeros, empty channel lists, nulls.
    rows = len(columns["rle"])
    for field in instances_schema():
        if not columns[field.name]:
            filler = None if field.nullable else [] if pa.types.is_list(field.type) else 0.0
            columns[field.name] = [filler] * rows
    instances = pa.table(columns, schema=instances_schema())
    commit.commit_shard(str(dest), 0, instances, pa.Table.from_pylist(image_rows, schema=IMAGES), {})
    commit.write_json(
        str(dest / "run.json"),
        {
            "settings": {"source": str(archive), "score_threshold": score_threshold},
            "model": {"card": {"classes": list(names.values())}},
        },
    )
    return coco


def test_ground_truth_scores_one_and_missing_instances_score_lower(archive, tmp_path):
    coco = write_run_from_ground_truth(archive, tmp_path / "perfect")
    scores, tables = evaluate(str(tmp_path / "perfect"), str(archive / "annotations.json"))
    for key in ("segm.AP", "segm.AP50", "bbox.AP", "agnostic.segm.AP"):
        assert scores[key] == pytest.approx(1.0), key
    assert scores["count.mae"] == 0 and scores["count.relative_error"] == 0
    assert (tables["counts"]["error"] == 0).all()
    assert tables["counts"]["gt_count"].sum() == len(coco["annotations"])
    assert 0 <= scores["baseline.segm.AP"] < 1 and scores["baseline.count.mae"] > 0

    write_run_from_ground_truth(archive, tmp_path / "half", drop_every=2)
    half, _ = evaluate(str(tmp_path / "half"), str(archive / "annotations.json"))
    assert half["segm.AP"] < 0.8 and half["count.mae"] > 0 and half["count.bias"] < 0


def test_sweep_counts_and_matches(archive, tmp_path):
    coco = write_run_from_ground_truth(archive, tmp_path / "perfect")
    table = sweep(str(tmp_path / "perfect"), str(archive / "annotations.json"), [0.5, 1.0])
    assert table["instances"].tolist() == [len(coco["annotations"])] * 2
    assert table["precision"].tolist() == [1.0, 1.0] and table["recall"].tolist() == [1.0, 1.0]


def test_sweep_below_the_runs_own_score_threshold_is_refused(archive, tmp_path):
    write_run_from_ground_truth(archive, tmp_path / "run", score_threshold=0.5)
    with pytest.raises(ValueError, match=r"--score-threshold 0\.3 or lower"):
        sweep(str(tmp_path / "run"), str(archive / "annotations.json"), [0.3, 0.6])


def test_evaluate_job_json_and_sweep_plot(archive, tmp_path):
    write_run_from_ground_truth(archive, tmp_path / "perfect")
    base = ["jobs.evaluate", str(tmp_path / "perfect"), "--annotations", str(archive / "annotations.json")]
    result = run_job(*base, "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["segm.AP50"] == pytest.approx(1.0) and "baseline.count.mae" in scores
    plot = tmp_path / "sweep.png"
    result = run_job(*base, "--sweep", "0.3:0.9:0.3", "--plot", str(plot), timeout=300)
    assert result.returncode == 0, result.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "precision" in result.stdout
