"""Evaluation: AP 1.0 on the ground truth itself, lower when instances are missing; the sweep; misses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline import commit, masks
from pipeline.decode import read_and_decode
from pipeline.evaluate import (
    CONTRAST_EDGES,
    RELATIVE_CONTRAST_EDGES,
    agnostic_mask_ap,
    ap50_of,
    coco_ap,
    compare_ap50,
    detections_from_instances,
    equivalent_diameters,
    evaluate,
    image_matches_at_50,
    label_image_annotations,
    label_images_for_run,
    label_images_to_coco,
    labelled_images,
    match_masks,
    misses,
    object_contrast,
    per_image_evaluation,
    read_label_image,
    sweep,
    touching_objects,
)
from pipeline.windows import window_mask_to_slide
from schemas import IMAGES, instances_schema
from tests.conftest import REPO
from tests.helpers import run_job


def write_run_from_ground_truth(
    archive, dest, drop_every: int | None = None, score_threshold: float = 0.0, keep=None
):
    """A run whose instances are the COCO ground truth of ``archive`` (score 1), one shard; ``keep``:
    a predicate on the COCO annotation (default: all, or every ``drop_every``-th)."""
    coco = json.loads((archive / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    image_rows, columns = [], {f.name: [] for f in instances_schema()}
    for image_id, info in enumerate(coco["images"]):
        uri = str(archive / info["file_name"])
        anns = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
        if drop_every:
            anns = anns[::drop_every]
        if keep:
            anns = [a for a in anns if keep(a)]
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
    assert [scores[f"match.{k}"] for k in ("precision", "recall", "f1")] == [1.0, 1.0, 1.0]
    assert scores["agnostic.segm.AP50.se"] == 0  # every draw of images scores 1

    write_run_from_ground_truth(archive, tmp_path / "half", drop_every=2)
    half, _ = evaluate(str(tmp_path / "half"), str(archive / "annotations.json"))
    assert half["segm.AP"] < 0.8 and half["count.mae"] > 0 and half["count.bias"] < 0
    assert 0 < half["agnostic.segm.AP50.se"] < 0.2
    swept = sweep(str(tmp_path / "half"), str(archive / "annotations.json"), [0.0]).iloc[0]
    assert half["match.precision"] == 1.0 and 0.4 < half["match.recall"] < 0.6
    assert half["match.recall"] == swept["recall"] and half["match.f1"] == swept["f1"]


def test_two_runs_compared_on_the_same_draws_of_images(archive, tmp_path):
    annotations = str(archive / "annotations.json")
    write_run_from_ground_truth(archive, tmp_path / "perfect")
    write_run_from_ground_truth(archive, tmp_path / "half", drop_every=2)
    half, _ = evaluate(str(tmp_path / "half"), annotations)
    compared = compare_ap50(str(tmp_path / "perfect"), str(tmp_path / "half"), annotations)
    assert compared["images"] == 6 and compared["AP50"] == pytest.approx(1.0) and compared["AP50.se"] < 1e-9
    assert compared["other.AP50"] == pytest.approx(half["agnostic.segm.AP50"], abs=1e-12)
    assert compared["other.AP50.se"] == pytest.approx(half["agnostic.segm.AP50.se"], abs=1e-12)
    assert compared["difference"] == pytest.approx(compared["other.AP50"] - 1.0)
    # Against a run that scores 1 on every draw, the difference moves exactly as the other run does.
    assert compared["difference.se"] == pytest.approx(compared["other.AP50.se"], abs=1e-9)
    assert compared["difference.se"] > 0
    itself = compare_ap50(str(tmp_path / "half"), str(tmp_path / "half"), annotations)
    assert itself["difference"] == 0 and itself["difference.se"] == 0 and itself["AP50.se"] > 0
    shutil.copytree(tmp_path / "perfect", tmp_path / "none")
    for shard in (tmp_path / "none" / "instances").iterdir():
        pq.write_table(pq.read_table(shard).slice(0, 0), shard)  # a run that found nothing
    nothing = compare_ap50(str(tmp_path / "none"), str(tmp_path / "perfect"), annotations)
    assert (
        nothing["AP50"] == 0
        and nothing["difference"] == pytest.approx(1.0)
        and nothing["difference.se"] < 1e-9
    )
    above_all = compare_ap50(
        str(tmp_path / "perfect"), str(tmp_path / "half"), annotations, score_threshold=1.01
    )
    assert above_all["AP50"] == above_all["other.AP50"] == 0  # every instance scores 1.0
    write_run_from_ground_truth(archive, tmp_path / "at-half", score_threshold=0.5)
    with pytest.raises(ValueError, match=r"--score-threshold 0\.3 or lower"):
        compare_ap50(str(tmp_path / "perfect"), str(tmp_path / "at-half"), annotations, score_threshold=0.3)
    # Each run at its own threshold: the other run's instances all score under 1.01, the first's not.
    each_own = compare_ap50(
        str(tmp_path / "perfect"),
        str(tmp_path / "at-half"),
        annotations,
        score_threshold=0.3,
        other_score_threshold=1.01,
    )
    assert each_own["AP50"] == pytest.approx(1.0) and each_own["other.AP50"] == 0
    result = run_job(
        "jobs.evaluate",
        str(tmp_path / "half"),
        "--annotations",
        annotations,
        "--compare",
        str(tmp_path / "perfect"),
        "--json",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["difference"] == pytest.approx(1.0 - compared["other.AP50"])
    missing = run_job(
        "jobs.evaluate",
        str(tmp_path / "half"),
        "--annotations",
        annotations,
        "--compare",
        str(tmp_path / "nothing"),
        timeout=300,
    )
    assert missing.returncode == 2 and "no run at" in missing.stderr


def test_report_prints_counts_as_whole_numbers_and_scores_to_fixed_decimals():
    from jobs.evaluate import value_table

    text = value_table(
        {"images": np.int64(256), "AP50": 0.948934, "difference.se": np.float64(0.0041)}, digits=4
    )
    assert text.splitlines() == ["images         256", "AP50           0.9489", "difference.se  0.0041"]


def test_sweep_counts_and_matches(archive, tmp_path):
    coco = write_run_from_ground_truth(archive, tmp_path / "perfect")
    table = sweep(str(tmp_path / "perfect"), str(archive / "annotations.json"), [0.5, 1.0])
    assert table["instances"].tolist() == [len(coco["annotations"])] * 2
    assert table["precision"].tolist() == [1.0, 1.0] and table["recall"].tolist() == [1.0, 1.0]
    assert table["f1"].tolist() == [1.0, 1.0]

    write_run_from_ground_truth(archive, tmp_path / "half", drop_every=2)
    half = sweep(str(tmp_path / "half"), str(archive / "annotations.json"), [0.5]).iloc[0]
    assert half["precision"] == 1.0 and 0.4 < half["recall"] < 0.6
    assert half["f1"] == pytest.approx(2 * half["recall"] / (1 + half["recall"]))


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


def _rle(x0: int, y0: int, x1: int, y1: int, size: int = 40) -> dict:
    """COCO RLE of the rectangle [x0, x1) x [y0, y1) in a size x size image."""
    mask = np.zeros((size, size), np.uint8, order="F")
    mask[y0:y1, x0:x1] = 1
    return mask_utils.encode(mask)


def _scattered_rectangles(seed: int, images: int, copies: int = 1) -> tuple[COCO, list[dict]]:
    """``images`` 40 x 40 images of 0-5 rectangles each, and detections of them: shifted by 0-7 px
    (IoU above or below 0.5), a few missing, a few false, scores with ties; the whole set ``copies``
    times under new image ids."""
    rng = np.random.default_rng(seed)
    annotations, detections = [], []
    for image in range(images):
        objects = [(x, y) for x, y in rng.integers(0, 28, size=(rng.integers(0, 6), 2))]
        found = [
            (x + rng.integers(0, 8), y, rng.choice([0.3, 0.6, 0.9])) for x, y in objects if rng.random() > 0.2
        ]
        found += [
            (rng.integers(0, 28), rng.integers(0, 28), rng.uniform(0, 1)) for _ in range(rng.integers(0, 3))
        ]
        for copy in range(copies):
            image_id = 1 + image + copy * images
            for x, y in objects:
                rle = _rle(x, y, x + 12, y + 12)
                area = float(mask_utils.area(rle))
                bbox = [float(v) for v in mask_utils.toBbox(rle)]
                annotations.append(
                    {
                        "image_id": image_id,
                        "category_id": 1,
                        "segmentation": rle,
                        "area": area,
                        "bbox": bbox,
                        "iscrowd": 0,
                        "id": len(annotations) + 1,
                    }
                )
            for x, y, score in found:
                detections.append(
                    {
                        "image_id": image_id,
                        "category_id": 1,
                        "segmentation": _rle(x, y, x + 12, y + 12),
                        "score": float(score),
                    }
                )
    dataset = {
        "images": [
            {"id": i, "width": 40, "height": 40, "file_name": f"{i}.png"}
            for i in range(1, images * copies + 1)
        ],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "nucleus"}],
    }
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco, detections


def test_ap50_from_per_image_matches_equals_cocoeval_on_any_subset():
    """The bootstrap's AP50 is COCOeval's: on the whole set and on a subset (COCOeval run on it alone)."""
    coco, detections = _scattered_rectangles(seed=3, images=30)
    image_ids = sorted(coco.getImgIds())
    evaluator = per_image_evaluation(coco, detections, image_ids, "segm", use_cats=False)
    matches = image_matches_at_50(evaluator)
    whole = coco_ap(coco, detections, image_ids, "segm", use_cats=False)["AP50"]
    assert 0.2 < whole < 0.9
    assert ap50_of(matches, evaluator.params.recThrs) == pytest.approx(whole, abs=1e-12)
    subset = image_ids[::3]
    kept = [d for d in detections if d["image_id"] in set(subset)]
    alone = coco_ap(coco, kept, subset, "segm", use_cats=False)["AP50"]
    picked = [matches[image_ids.index(i)] for i in subset]
    assert ap50_of(picked, evaluator.params.recThrs) == pytest.approx(alone, abs=1e-12)


def test_ap50_standard_error_halves_with_four_times_the_images_and_is_zero_for_one_look():
    def standard_error(coco, detections):
        return agnostic_mask_ap(coco, detections, sorted(coco.getImgIds()))["AP50.se"]

    one = standard_error(*_scattered_rectangles(seed=5, images=40))
    four = standard_error(*_scattered_rectangles(seed=5, images=40, copies=4))
    assert 0.02 < one < 0.2
    assert four == pytest.approx(one / 2, rel=0.25)
    assert standard_error(*_scattered_rectangles(seed=5, images=1, copies=40)) == 0.0
    coco, _ = _scattered_rectangles(seed=5, images=40)
    assert standard_error(coco, []) == 0.0


def test_matching_takes_each_object_once_by_score_and_reports_the_best_overlap():
    isolated, left, right = _rle(2, 2, 8, 8), _rle(20, 20, 28, 28), _rle(28, 20, 36, 28)
    below = _rle(20, 32, 28, 38)
    predicted = [left, left, _rle(28, 20, 31, 28), _rle(2, 30, 6, 34), below]
    match, best = match_masks(predicted, [isolated, left, right, below])
    assert match.tolist() == [1, -1, -1, -1, 3]
    assert best[1] == 1.0 and best[2] == pytest.approx(3 / 8) and best[3] == 0.0
    assert match_masks([], [left])[0].size == 0 and match_masks([left], [])[0].tolist() == [-1]


def test_touching_means_overlapping_or_within_one_pixel_diagonals_included():
    truth = [_rle(2, 2, 8, 8), _rle(20, 20, 28, 28), _rle(28, 20, 36, 28), _rle(20, 30, 28, 36)]
    assert touching_objects(truth).tolist() == [False, True, True, False]
    assert touching_objects([_rle(0, 0, 5, 5), _rle(5, 5, 9, 9)]).tolist() == [True, True]
    assert touching_objects([_rle(0, 0, 5, 5), _rle(3, 3, 9, 9)]).tolist() == [True, True]
    assert touching_objects([_rle(0, 0, 5, 5), _rle(6, 6, 9, 9)]).tolist() == [False, False]
    assert touching_objects([_rle(0, 0, 5, 5)]).tolist() == [False]
    spots = [_rle(x, y, x + 1, y + 1, size=60) for x in range(0, 60, 3) for y in range(0, 45, 3)]
    assert len(spots) == 300 and not touching_objects(spots).any()  # more than a uint8 counts
    assert equivalent_diameters(spots) == pytest.approx(np.full(300, 2 / np.sqrt(np.pi)))
    assert equivalent_diameters([_rle(0, 0, 10, 10)]) == pytest.approx([2 * np.sqrt(100 / np.pi)])


def test_window_masks_decoded_in_their_boxes_land_on_the_slide_as_decoded_whole():
    """Slide rows' masks, decoded only inside their boxes, equal the whole-window decode moved onto
    the slide (the reference), at downsample 1, 2 and 2.5, windows hanging over the slide's edge,
    masks on the window's edges, an empty mask."""
    rng = np.random.default_rng(3)
    slide_size, window = 300, 64
    rows = []
    for k in range(40):
        mask = np.zeros((window, window), np.uint8, order="F")
        if k % 10:
            x, y = rng.integers(-8, window, 2)
            w, h = rng.integers(1, 30, 2)
            mask[max(y, 0) : y + h, max(x, 0) : x + w] = 1
            mask[rng.random((window, window)) < 0.02] = 1  # scattered pixels: many runs, holes
        rle = mask_utils.encode(mask)
        rows.append(
            dict(
                gt_id=1,
                label=1,
                score=1.0 - k / 100,
                height=window,
                width=window,
                rle=rle["counts"].decode("ascii"),
                x0=0.0,
                y0=0.0,
                x1=1.0,
                y1=1.0,
                tile_x0=float(rng.integers(-32, slide_size)),
                tile_y0=float(rng.integers(-32, slide_size)),
                tile_downsample=(1.0, 2.0, 2.5)[k % 3],
            )
        )
    instances = pd.DataFrame(rows)
    coco = COCO()
    coco.dataset = {"images": [{"id": 1, "height": slide_size, "width": slide_size}], "annotations": []}
    coco.createIndex()
    got = [d["segmentation"]["counts"] for d in detections_from_instances(instances, coco)]
    reference = [
        window_mask_to_slide(
            mask_utils.decode({"size": [window, window], "counts": r.rle}).astype(bool),
            r.tile_x0,
            r.tile_y0,
            r.tile_downsample,
        )
        for r in instances.itertuples()
    ]
    want = list(masks.encode_crops(reference, (slide_size, slide_size))["rle"])
    assert len(got) == 40 and got == want
    assert sum(mask_utils.area({"size": [slide_size, slide_size], "counts": c}) > 0 for c in got) > 20


def test_misses_split_recall_by_size_and_contact_and_name_the_false_instances(archive, tmp_path):
    coco = write_run_from_ground_truth(archive, tmp_path / "perfect")
    perfect = misses(str(tmp_path / "perfect"), str(archive / "annotations.json"))
    total = perfect["recall"].iloc[-1]
    assert total["diameter_px"] == "all" and total["objects"] == len(coco["annotations"])
    assert (perfect["recall"]["recall"] == 1.0).all()
    assert perfect["recall"]["objects"].iloc[:-1].sum() == total["objects"]
    assert 0 < total["touching_objects"] < total["objects"]
    assert perfect["false_instances"]["instances"].tolist() == [0, 0, 0]

    without_crowd_flags = tmp_path / "no-iscrowd.json"  # COCO files written by other tools often omit it
    coco_as_written = json.loads((archive / "annotations.json").read_text())
    for ann in coco_as_written["annotations"]:
        ann.pop("iscrowd", None)
    without_crowd_flags.write_text(json.dumps(coco_as_written))
    assert misses(str(tmp_path / "perfect"), str(without_crowd_flags))["recall"].equals(perfect["recall"])

    write_run_from_ground_truth(archive, tmp_path / "half", drop_every=2)
    half = misses(str(tmp_path / "half"), str(archive / "annotations.json"))["recall"].iloc[-1]
    kept = sum(len(range(0, n, 2)) for n in _objects_per_image(coco))
    assert half["recall"] == pytest.approx(kept / len(coco["annotations"]))


def _disk(center: tuple[int, int], radius: float, size: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def _rles(*object_masks: np.ndarray) -> list[dict]:
    return [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in object_masks]


def test_object_contrast_is_the_step_over_its_surroundings_in_units_of_pixel_noise():
    rng = np.random.default_rng(3)
    bright, faint = _disk((24, 24), 8), _disk((24, 70), 8)
    # A nucleus walled in by a ring-shaped neighbour has no background ring of its own.
    walled = _disk((70, 48), 6)
    wall = _disk((70, 48), 18) & ~walled
    signal = 100 + 50.0 * bright + 5.0 * faint + 30.0 * wall
    image = np.clip(signal + rng.normal(0, 5.0, signal.shape), 0, None).astype(np.uint16)
    contrast = object_contrast(image, _rles(bright, faint, walled, wall))
    assert contrast[0] == pytest.approx(10.0, rel=0.15)
    assert contrast[1] == pytest.approx(1.0, abs=0.25)
    assert np.isnan(contrast[2])
    assert contrast[3] == pytest.approx(6.0, rel=0.15)
    assert object_contrast(image, []).shape == (0,)


def test_misses_split_recall_by_contrast_in_fixed_bands(archive, tmp_path):
    """A run that keeps only the objects above the median contrast: each band's recall is the share
    of its objects above it, with the bands fixed whatever the archive."""
    coco = COCO(str(archive / "annotations.json"))
    contrast, relative = {}, {}
    for image in coco.dataset["images"]:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        raw = read_and_decode(str(archive / image["file_name"]), max_pixels=10**6)
        values = object_contrast(raw.pixels.max(axis=2), [a["segmentation"] for a in anns])
        for ann, value in zip(anns, values, strict=True):
            contrast[ann["id"]] = value
            relative[ann["id"]] = value / np.nanmedian(values)
    median = float(np.nanmedian(list(contrast.values())))
    write_run_from_ground_truth(archive, tmp_path / "bright", keep=lambda a: contrast[a["id"]] >= median)
    tables = misses(str(tmp_path / "bright"), str(archive / "annotations.json"))
    table = tables["recall_by_contrast"]
    values = pd.Series(contrast)
    band = pd.cut(values, [-np.inf, *CONTRAST_EDGES, np.inf], right=False, labels=False)
    expected = (values >= median).groupby(band).mean()
    banded = table[~table["contrast_to_noise"].isin(["unmeasured", "all"])]
    assert len(banded) >= 3 and banded["recall"].tolist() == pytest.approx(expected.tolist())
    assert banded["objects"].tolist() == band.value_counts().sort_index().tolist()
    walled_in = table.loc[table["contrast_to_noise"] == "unmeasured", "objects"].sum()
    assert walled_in == values.isna().sum()
    assert table["contrast_to_noise"].iloc[-1] == "all" and table["objects"].iloc[-1] == len(contrast)
    assert 0 < table["recall"].iloc[-1] < 1
    # The same objects by their contrast over the median of their image's objects.
    by_relative = tables["recall_by_relative_contrast"]
    ratios = pd.Series(relative)
    band = pd.cut(ratios, [-np.inf, *RELATIVE_CONTRAST_EDGES, np.inf], right=False, labels=False)
    banded = by_relative[~by_relative["contrast_relative_to_median"].isin(["unmeasured", "all"])]
    assert len(banded) >= 3 and banded["objects"].tolist() == band.value_counts().sort_index().tolist()
    assert banded["recall"].tolist() == pytest.approx((values >= median).groupby(band).mean().tolist())


def test_objects_of_an_image_that_is_gone_are_unmeasured_not_an_error(archive, tmp_path):
    copy = tmp_path / "archive"
    shutil.copytree(archive, copy)
    coco = write_run_from_ground_truth(copy, tmp_path / "run")
    gone = coco["images"][0]
    (copy / gone["file_name"]).unlink()
    table = misses(str(tmp_path / "run"), str(copy / "annotations.json"))["recall_by_contrast"]
    unmeasured = table.set_index("contrast_to_noise").loc["unmeasured", "objects"]
    assert unmeasured == sum(a["image_id"] == gone["id"] for a in coco["annotations"]) > 0


def test_faint_recall_splits_the_measured_objects_at_a_contrast():
    from pipeline.evaluate import faint_recall

    objects = pd.DataFrame(
        {"contrast": [0.5, 1.5, 2.0, 9.0, np.nan], "found": [False, True, True, True, False]}
    )
    assert faint_recall(objects) == {"faint_share": 0.5, "recall_faint": 0.5, "recall_rest": 1.0}
    assert faint_recall(objects, below=10)["recall_rest"] is None
    assert faint_recall(objects.iloc[4:])["faint_share"] is None


def test_relative_contrast_is_over_the_median_of_the_image_and_undefined_without_one():
    from pipeline.evaluate import _relative_to_median

    assert _relative_to_median(np.array([2.0, 4.0, np.nan, 8.0])).tolist()[::3] == [0.5, 2.0]
    assert np.isnan(_relative_to_median(np.array([np.nan, np.nan]))).all()
    assert np.isnan(_relative_to_median(np.array([-1.0, 0.0, 0.5]))).all()
    assert _relative_to_median(np.zeros(0)).shape == (0,)


def test_contrast_is_read_on_the_channel_the_runs_model_saw():
    from pipeline.evaluate import _channel_the_model_saw

    card = {"card": {"preprocessing": {"channel": "rgb"}}}
    assert _channel_the_model_saw({"settings": {"channel": 0}, "model": card}) == 0  # --channel 0
    assert _channel_the_model_saw({"settings": {"channel": None}, "model": card}) == "rgb"
    assert _channel_the_model_saw({"settings": {}, "model": {"card": {"classes": ["nucleus"]}}}) == "max"


def test_size_bands_of_narrowly_spread_objects_keep_distinct_names():
    from pipeline.evaluate import _recall_by_size

    objects = pd.DataFrame(
        {"diameter": np.linspace(6.4, 7.8, 50), "touching": np.arange(50) % 2 == 0, "found": True}
    )
    names = _recall_by_size(objects, bands=5)["diameter_px"].tolist()
    assert names == ["6.4-6.7", "6.7-7.0", "7.0-7.2", "7.2-7.5", "7.5-7.8", "all"]
    wide = pd.DataFrame({"diameter": np.linspace(8, 48, 50), "touching": False, "found": True})
    assert _recall_by_size(wide, bands=2)["diameter_px"].tolist() == ["8-28", "28-48", "all"]


def _objects_per_image(coco: dict) -> list[int]:
    counts: dict[int, int] = {}
    for ann in coco["annotations"]:
        counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
    return list(counts.values())


def test_misses_job_prints_json_and_refuses_scores_the_run_never_kept(archive, tmp_path, capsys):
    from jobs import evaluate as evaluate_job

    write_run_from_ground_truth(archive, tmp_path / "run", score_threshold=0.5)
    base = [str(tmp_path / "run"), "--annotations", str(archive / "annotations.json"), "--misses"]
    assert evaluate_job.main([*base, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["recall"][-1]["recall"] == 1.0 and len(report["false_instances"]) == 3
    assert report["recall_by_contrast"][-1]["contrast_to_noise"] == "all"
    assert report["recall_by_contrast"][-1]["recall"] == 1.0
    assert evaluate_job.main([*base, "--score-threshold", "0.3"]) == 2
    assert "--score-threshold 0.3 or lower" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        evaluate_job.main([*base[:3], "--score-threshold", "0.6"])
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as usage:
        evaluate_job.main([*base, "--other-score-threshold", "0.6"])
    assert usage.value.code == 2 and "--other-score-threshold needs --compare" in capsys.readouterr().err


@pytest.mark.parametrize("report", [[], ["--misses"]])
def test_a_reader_that_stops_early_ends_the_report_quietly(archive, tmp_path, report):
    """``jobs.evaluate RUN --annotations A | head``: exit 141 (128 + SIGPIPE, as a shell reports a
    tool the signal ended), nothing on stderr, where a BrokenPipeError traceback was (and, for the
    reports printed while the truth file is open, a usage error)."""
    write_run_from_ground_truth(archive, tmp_path / "run")
    command = [sys.executable, "-m", "jobs.evaluate", str(tmp_path / "run")]
    command += ["--annotations", str(archive / "annotations.json"), *report]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line
    job = subprocess.Popen(command, cwd=REPO, stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 141 and stderr == ""


def test_the_analysis_jobs_do_not_import_torch():
    """Evaluation, export, statistics and pictures read Parquet and masks: they start in about a second,
    without torch (seconds to import, about 0.7 GB resident), which only pasting on the device needs."""
    code = "import sys, jobs.evaluate, jobs.export, jobs.stats, jobs.render; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def _discs(*discs: tuple[tuple[int, int], int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A 32 x 32 uint8 image and its uint16 label image with a disc per ``(centre, radius, brightness,
    id)``."""
    import cv2

    image = np.zeros((32, 32), np.uint8)
    labels = np.zeros((32, 32), np.uint16)
    for centre, radius, brightness, object_id in discs:
        cv2.circle(image, centre, radius, brightness, -1)
        cv2.circle(labels, centre, radius, object_id, -1)
    return image, labels


def _write_images(root, files: dict[str, np.ndarray]) -> None:
    """Each array written (OpenCV, by the name's format) at its path under ``root``."""
    import cv2

    for name, pixels in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / name), pixels)


def test_label_images_pair_with_their_image_in_the_same_or_another_format(tmp_path):
    """Real annotated sets store masks as TIFF beside PNG or JPEG images; ``_labels`` inside a name is
    part of the name; a label image that could belong to two images is left out, not guessed."""
    image, labels = _discs(((10, 10), 5, 200, 1), ((22, 22), 4, 120, 7))
    files = {
        "same/a.tif": image,
        "same/a_labels.tif": labels,
        "other/b.png": image,
        "other/b_labels.tif": labels,
        "other/my_labels_x.png": image,
        "other/my_labels_x_labels.tif": labels,
        "two/c.png": image,
        "two/c.jpg": image,
        "two/c_labels.tif": labels,
        "alone/d_labels.tif": labels,
    }
    _write_images(tmp_path, files)
    pairs = {(i.relative_to(tmp_path).as_posix(), m.name) for i, m in labelled_images(tmp_path)}
    assert pairs == {
        ("same/a.tif", "a_labels.tif"),
        ("other/b.png", "b_labels.tif"),
        ("other/my_labels_x.png", "my_labels_x_labels.tif"),
    }
    coco = json.loads(label_images_to_coco(tmp_path, tmp_path / "archive").read_text())
    assert sorted(im["file_name"] for im in coco["images"]) == [
        "other/b.png",
        "other/my_labels_x.png",
        "same/a.tif",
    ]
    assert len(coco["annotations"]) == 6  # two objects per labelled image
    assert (tmp_path / "archive/other/b.png").exists() and not (
        tmp_path / "archive/other/b_labels.tif"
    ).exists()


def test_label_images_pair_from_images_and_masks_folders(tmp_path):
    """StarDist's and the Cell Tracking Challenge's layout: ``masks/a/NAME.*`` annotates
    ``images/a/NAME.*``, in another format too; an image without a mask is not annotated; the
    archive keeps the images' paths under ``images/`` and leaves the masks out."""
    image, labels = _discs(((10, 10), 5, 200, 3))
    files = {
        "images/set/t01.tif": image,
        "masks/set/t01.png": labels,
        "images/set/t02.png": image,
        "images/t03.png": image,
        "masks/t03.png": labels,
        "masks/t04.png": labels,  # no image
    }
    _write_images(tmp_path, files)
    pairs = {
        (i.relative_to(tmp_path).as_posix(), m.relative_to(tmp_path).as_posix())
        for i, m in labelled_images(tmp_path)
    }
    assert pairs == {("images/set/t01.tif", "masks/set/t01.png"), ("images/t03.png", "masks/t03.png")}
    coco = json.loads(label_images_to_coco(tmp_path, tmp_path / "archive").read_text())
    assert sorted(im["file_name"] for im in coco["images"]) == ["images/set/t01.tif", "images/t03.png"]
    assert len(coco["annotations"]) == 2 and not (tmp_path / "archive" / "masks").exists()


def test_label_image_annotations_equal_pycocotools_of_each_whole_mask():
    """Each object encoded in its box gives the RLE, area and box that pycocotools gives for its
    whole-image mask: ids out of order and far apart, an object in two pieces, one spanning the
    full height (its runs continue from one column into the next) and ones on the borders."""
    rng = np.random.default_rng(5)
    label_map = np.zeros((37, 53), np.int64)
    for value in (9, 3, 40000, 12, 700):
        x, y = rng.integers(0, 48), rng.integers(0, 32)
        label_map[y : y + rng.integers(2, 9), x : x + rng.integers(2, 9)] = value
    label_map[:, 20:22] = 5  # the full height
    label_map[0:3, 50:53] = 77
    label_map[34:37, 0:4] = 77  # the same id again, elsewhere
    ours = label_image_annotations(label_map)
    values = [v for v in np.unique(label_map) if v]
    assert len(ours) == len(values) == 7
    for value, annotation in zip(values, ours, strict=True):
        reference = mask_utils.encode(np.asfortranarray((label_map == value).astype(np.uint8)))
        assert annotation["segmentation"]["counts"] == reference["counts"].decode("ascii")
        assert annotation["segmentation"]["size"] == [37, 53]
        assert annotation["area"] == float(mask_utils.area(reference))
        assert annotation["bbox"] == [float(v) for v in mask_utils.toBbox(reference)]
    assert label_image_annotations(np.zeros((8, 8), np.int64)) == []


def test_a_label_image_is_one_channel_of_whole_non_negative_ids(tmp_path):
    """Float TIFFs of whole numbers read as ids; a colour rendering of labels, fractions and
    negative values are refused with the reason."""
    import cv2
    import tifffile

    ids = np.zeros((16, 16), np.uint16)
    ids[2:6, 2:6], ids[8:12, 9:14] = 3, 1000
    tifffile.imwrite(tmp_path / "float.tif", ids.astype(np.float32))
    assert np.array_equal(read_label_image(str(tmp_path / "float.tif")), ids)
    cv2.imwrite(str(tmp_path / "ids16.png"), ids)
    assert np.array_equal(read_label_image(str(tmp_path / "ids16.png")), ids)
    cv2.imwrite(str(tmp_path / "colour.png"), np.dstack([ids.astype(np.uint8)] * 3))
    tifffile.imwrite(tmp_path / "half.tif", ids.astype(np.float32) / 2)
    tifffile.imwrite(tmp_path / "negative.tif", -ids.astype(np.int32))
    refusals = (("colour.png", "3 channels"), ("half.tif", "fractional"), ("negative.tif", "negative"))
    for name, reason in refusals:
        with pytest.raises(ValueError, match=reason):
            read_label_image(str(tmp_path / name))


def _paint_labels(coco: dict, image_id: int) -> np.ndarray:
    """The label image of one image's objects: ids 1.. in annotation order, later objects on top."""
    info = next(im for im in coco["images"] if im["id"] == image_id)
    label_map = np.zeros((info["height"], info["width"]), np.uint16)
    objects = [a for a in coco["annotations"] if a["image_id"] == image_id]
    for k, annotation in enumerate(objects, start=1):
        label_map[mask_utils.decode(annotation["segmentation"]).astype(bool)] = k
    return label_map


def test_evaluate_with_label_images_in_another_folder_scores_as_a_coco_file_of_them(
    archive, tmp_path, capsys
):
    """``--labels masks/``: each image's label image at its relative path (another format will do),
    an image without one left out; the report equals the one from a COCO file written from the same
    label images with pycocotools."""
    import cv2
    import tifffile

    from jobs import evaluate as evaluate_job

    coco = write_run_from_ground_truth(archive, tmp_path / "run")
    masks_dir, expected = tmp_path / "masks", {"images": [], "annotations": [], "categories": []}
    expected["categories"] = [{"id": 1, "name": "nucleus"}]
    for info in coco["images"][1:]:  # the first image has no label image
        label_map = _paint_labels(coco, info["id"])
        stem = masks_dir / os.path.splitext(info["file_name"])[0]
        stem.parent.mkdir(parents=True, exist_ok=True)
        if info["id"] % 2:
            tifffile.imwrite(f"{stem}.tif", label_map)
        else:
            assert cv2.imwrite(f"{stem}.png", label_map)
        image_id = len(expected["images"]) + 1
        expected["images"].append({**info, "id": image_id})
        for value in np.unique(label_map[label_map > 0]):
            rle = mask_utils.encode(np.asfortranarray((label_map == value).astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            expected["annotations"].append(
                {
                    "id": len(expected["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    run = str(tmp_path / "run")
    assert evaluate_job.main([run, "--annotations", str(tmp_path / "expected.json"), "--json"]) == 0
    from_coco = json.loads(capsys.readouterr().out)
    assert evaluate_job.main([run, "--labels", str(masks_dir), "--json"]) == 0
    from_labels = json.loads(capsys.readouterr().out)
    assert from_labels == from_coco and from_labels["images"] == len(coco["images"]) - 1
    assert from_labels["segm.AP50"] > 0.9  # the run's instances are the objects the labels paint

    first = coco["images"][0]["file_name"]
    renamed = masks_dir / f"{os.path.splitext(first)[0]}_m.tif"
    tifffile.imwrite(renamed, _paint_labels(coco, coco["images"][0]["id"]))
    only = label_images_for_run(run, str(masks_dir), suffix="_m")
    assert [im["file_name"] for im in only["images"]] == [first]


def test_label_images_that_do_not_fit_their_run_are_refused_in_one_line(archive, tmp_path, capsys):
    """A label image of another size, two that could annotate one image, none at all, a slide run,
    and flags that do not go together: a one-line error each, exit 2."""
    import tifffile

    from jobs import evaluate as evaluate_job

    coco = write_run_from_ground_truth(archive, tmp_path / "run")
    run, masks_dir = str(tmp_path / "run"), tmp_path / "masks"
    stem = masks_dir / os.path.splitext(coco["images"][0]["file_name"])[0]
    stem.parent.mkdir(parents=True)
    tifffile.imwrite(f"{stem}.tif", np.ones((10, 10), np.uint16))

    def refused(*args: str) -> str:
        assert evaluate_job.main([run, *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        return err

    assert "10 x 10 px" in refused("--labels", str(masks_dir))
    tifffile.imwrite(f"{stem}.tiff", np.ones((10, 10), np.uint16))
    assert "2 label images" in refused("--labels", str(masks_dir))
    assert "no label image" in refused("--labels", str(masks_dir), "--label-suffix", "_none")
    exclusive = (["--label-suffix", "_m", "--annotations", "a.json"], ["--labels", "m", "--annotations", "a"])
    for flags in exclusive:
        with pytest.raises(SystemExit) as usage:
            evaluate_job.main([run, *flags])
        assert usage.value.code == 2
    capsys.readouterr()
    commit.write_json(str(tmp_path / "slides" / "run.json"), {"slides": 2, "settings": {"source": "x"}})
    with pytest.raises(ValueError, match="slide run"):
        label_images_for_run(str(tmp_path / "slides"), str(masks_dir))
