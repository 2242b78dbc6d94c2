"""Whole slides end to end: seams, tile-size invariance, slide coordinates, S3, a killed driver, bad slides.

The seam tests use the bundled model on painted nuclei (without Ray: one
replica's :class:`ShardProcessor` on the plan's rows); the job tests use the
random model on a real local Ray and a real S3 server.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import shapely
from pycocotools import mask as mask_utils

from jobs import render as segment_render
from jobs import segment as segment_job
from pipeline import storage
from pipeline.card import InferenceSettings
from pipeline.evaluate import evaluate, misses, sweep
from pipeline.export import write_geojson
from pipeline.model import resolve_model
from pipeline.plan import Plan
from pipeline.slides import Slide, SlideSettings
from pipeline.stats import per_slide
from pipeline.synth import slide_annotations
from pipeline.windows import window_mask_to_slide
from pipeline.worker import ShardProcessor
from tests.helpers import painted_slide, process_group, start_segment_driver, wait_for_first_commit

SEAM, CORNER = (192, 500, 15), (384, 384, 15)
"""With 256 px windows overlapping by 64 (pitch 192): a nucleus across a seam, one on a four-window corner."""


def _discs(
    seed: int, count: int, fixed: list[tuple[float, float, float]]
) -> list[tuple[float, float, float]]:
    rng = np.random.default_rng(seed)
    discs = list(fixed)
    while len(discs) < count:
        x, y, r = rng.uniform(30, 738), rng.uniform(30, 738), rng.uniform(9, 16)
        if all((x - a) ** 2 + (y - b) ** 2 > (r + c + 12) ** 2 for a, b, c in discs):
            discs.append((x, y, r))
    return discs


DISCS = _discs(3, 40, [SEAM, CORNER, (288, 100, 14), (576, 576, 14)])


@pytest.fixture(scope="module")
def seam_source(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("seam-slides")
    painted_slide(source / "seam.svs", DISCS)
    return source


@pytest.fixture(scope="module")
def bundled_processor():
    loaded = resolve_model(None)
    card = loaded.card
    settings = InferenceSettings(
        score_threshold=card.score_threshold,
        mask_threshold=card.mask_threshold,
        max_detections=card.max_detections,
        batch_size=4,
        max_pixels=10**8,
        preprocessing=card.preprocessing,
        overlap_threshold=0.7,
    )
    processor = ShardProcessor(card, loaded.module.state_dict(), settings, threads=2)
    yield processor
    processor.close()


def segment_slides(processor: ShardProcessor, source: Path, tile: int, overlap: int) -> pd.DataFrame:
    """The instances of the slides under ``source`` in windows of ``tile`` px overlapping by ``overlap``."""
    settings = SlideSettings(tile, overlap, preprocessing=processor.settings.preprocessing, tissue="all")
    rows = [
        row
        for shard in Plan(str(source), shard_size=10**6, slide_settings=settings)
        for row in shard.rows.to_pylist()
    ]
    return processor.process(rows).instances.to_pandas()


def slide_mask(row, shape=(768, 768)) -> np.ndarray:
    """An instance's mask (decoded in its window, moved onto the slide) as a bool slide-sized array."""
    window = mask_utils.decode({"size": [int(row.height), int(row.width)], "counts": row.rle}).astype(bool)
    crop = window_mask_to_slide(window, row.tile_x0, row.tile_y0, row.tile_downsample)
    canvas = np.zeros((shape[0] + 2048, shape[1] + 2048), bool)  # room for padding beyond the slide
    h, w = crop.mask.shape
    canvas[crop.y0 + 1024 : crop.y0 + 1024 + h, crop.x0 + 1024 : crop.x0 + 1024 + w] = crop.mask
    return canvas[1024 : 1024 + shape[0], 1024 : 1024 + shape[1]]


def at(instances: pd.DataFrame, disc) -> pd.DataFrame:
    x, y, r = disc
    return instances[(instances["centroid_x"] - x) ** 2 + (instances["centroid_y"] - y) ** 2 < r**2]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_objects_across_a_seam_and_a_corner_are_counted_once_with_their_unseamed_mask(
    bundled_processor, seam_source
):
    unseamed = segment_slides(bundled_processor, seam_source, 1024, 0)  # one window holds the slide
    tiled = segment_slides(bundled_processor, seam_source, 256, 64)
    assert tiled["image_id"].nunique() > 9  # 16 windows, most with instances
    for disc in (SEAM, CORNER):
        found, reference = at(tiled, disc), at(unseamed, disc)
        assert len(found) == 1 and len(reference) == 1, disc
        (row,), (ref,) = found.itertuples(), reference.itertuples()
        assert iou(slide_mask(row), slide_mask(ref)) > 0.9
        assert row.area == pytest.approx(ref.area, rel=0.1)
    assert [len(at(tiled, d)) for d in DISCS] == [1] * len(DISCS)  # every nucleus once, none twice
    assert len(tiled) == len(unseamed) == len(DISCS)


def test_another_tile_size_and_overlap_finds_the_same_instances(bundled_processor, seam_source):
    small = segment_slides(bundled_processor, seam_source, 256, 64)
    large = segment_slides(bundled_processor, seam_source, 384, 96)
    assert len(small) == len(large)
    by_disc = [(at(small, d), at(large, d)) for d in DISCS]
    for a, b in by_disc:
        assert len(a) == len(b) == 1
        assert abs(a["centroid_x"].item() - b["centroid_x"].item()) < 1.0
        assert abs(a["centroid_y"].item() - b["centroid_y"].item()) < 1.0


def test_coordinates_are_level_0_slide_pixels_and_masks_sit_in_their_window(bundled_processor, seam_source):
    found = segment_slides(bundled_processor, seam_source, 256, 64)
    for row in found.itertuples():
        mask = slide_mask(row)
        assert mask.sum() == row.area
        ys, xs = np.nonzero(mask)
        assert row.centroid_x == pytest.approx(xs.mean() + 0.5) and row.centroid_y == pytest.approx(
            ys.mean() + 0.5
        )
        assert row.x0 <= row.centroid_x <= row.x1 and row.y0 <= row.centroid_y <= row.y1  # same frame
        polygon = shapely.from_wkb(row.polygon)
        assert polygon.is_valid and polygon.contains(shapely.points(xs + 0.5, ys + 0.5)).all()
        assert row.area_um2 == pytest.approx(row.area * 0.25)  # 0.5 µm/px


# The job: a folder of slides on a local Ray and on S3, a killed driver, bad slides.

SETTINGS = ["--tile-size", 256, "--tile-overlap", 64, "--shard-size", 4, "--batch-size", 2, "--tissue", "all"]


def run(*args) -> int:
    return segment_job.main([str(a) for a in args] + ["--no-progress"])


@pytest.fixture(scope="module")
def slide_folder(tmp_path_factory) -> Path:
    """Two good slides (16 windows each) and two bad ones."""
    source = tmp_path_factory.mktemp("slide-folder")
    painted_slide(source / "A.svs", DISCS)
    painted_slide(source / "B.svs", _discs(4, 30, []), seed=1)
    whole = (source / "A.svs").read_bytes()
    (source / "cut.svs").write_bytes(whole[: len(whole) // 3])
    (source / "junk.svs").write_text("not a slide")
    return source


@pytest.fixture(scope="module")
def local_slide_run(ray_local, slide_folder, random_model_path, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("slide-run") / "run"
    assert run(slide_folder, "--output", dest, "--model", random_model_path, *SETTINGS) == 0
    return dest


def rows_of(dest: str, table: str) -> pd.DataFrame:
    fs, path = storage.resolve(storage.join(dest, table))
    found = pq.read_table(path, filesystem=fs).to_pandas()
    return found.sort_values([c for c in ("image_id", "instance_id") if c in found]).reset_index(drop=True)


def test_a_slide_folder_runs_with_its_bad_slides_in_the_slides_table(local_slide_run):
    slides = rows_of(str(local_slide_run), "slides.parquet").set_index("slide_id")
    assert slides.loc[["A", "B"], "status"].tolist() == ["ok", "ok"]
    assert slides.loc[["A", "B"], "tiles_planned"].tolist() == [16, 16]
    assert slides.loc["cut", "status"] != "ok" and slides.loc["cut", "error"]
    assert slides.loc["junk", "status"] == "unsupported"
    images = rows_of(str(local_slide_run), "images")
    assert len(images) == 32 and (images["status"] == "ok").all() and set(images["slide_id"]) == {"A", "B"}
    assert images["height"].eq(256).all() and images["pixel_size_um"].eq(0.5).all()
    manifest = rows_of(str(local_slide_run), "manifest.parquet")
    assert (manifest["core_x1"] - manifest["core_x0"]).eq(192).all()
    table = (
        per_slide(str(local_slide_run))
        .groupby("slide_id")
        .agg(
            count=("count", "sum"), tissue_mm2=("tissue_mm2", "first"), slide_status=("slide_status", "first")
        )
    )
    assert table.loc["A", "count"] == (rows_of(str(local_slide_run), "instances")["slide_id"] == "A").sum()
    assert table.loc["A", "tissue_mm2"] == pytest.approx(768 * 768 * 0.25 / 1e6)
    assert table.loc["cut", "slide_status"] != "ok" and table.loc["cut", "count"] == 0


def test_geojson_is_in_qupaths_frame_for_the_slide(local_slide_run, tmp_path):
    stream = io.StringIO()
    count = write_geojson(str(local_slide_run), stream, slide="A")
    features = json.loads(stream.getvalue())["features"]
    instances = rows_of(str(local_slide_run), "instances")
    assert count == len(features) == (instances["slide_id"] == "A").sum() > 0
    first = shapely.geometry.shape(features[0]["geometry"])
    (expected,) = instances[(instances["slide_id"] == "A")].head(1)["polygon"]
    assert first.equals(shapely.from_wkb(expected))
    # A vendor with a bounds offset (QuPath crops the slide to it): features move by exactly that.
    shifted = tmp_path / "run"
    shutil.copytree(local_slide_run, shifted)
    slides = pq.read_table(shifted / "slides.parquet")
    bounds = pa.array([100] * slides.num_rows, pa.int64())
    slides = slides.set_column(slides.schema.get_field_index("bounds_x"), "bounds_x", bounds)
    pq.write_table(slides, shifted / "slides.parquet")
    stream = io.StringIO()
    write_geojson(str(shifted), stream, slide="A")
    moved = shapely.geometry.shape(json.loads(stream.getvalue())["features"][0]["geometry"])
    assert moved.equals(shapely.affinity.translate(first, -100, 0))


def test_a_slide_run_on_s3_killed_mid_slide_and_resumed_equals_the_local_run(
    ray_local, slide_folder, random_model_path, local_slide_run, s3_bucket
):
    for path in sorted(slide_folder.iterdir()):
        storage.write_bytes_atomic(f"s3://{s3_bucket}/slides/{path.name}", path.read_bytes())
    dest = f"s3://{s3_bucket}/runs/r1"
    driver = start_segment_driver(f"s3://{s3_bucket}/slides", dest, random_model_path, SETTINGS)
    fs, prefix = storage.resolve(dest)
    try:

        def committed():
            try:
                listed = fs.get_file_info(pafs.FileSelector(prefix + "/_commits"))
            except FileNotFoundError:
                return []
            return [i for i in listed if i.base_name.endswith(".committed.json")]

        wait_for_first_commit(list_markers=committed)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
    finally:
        for proc in process_group(driver.pid):
            proc.kill()
    done = len(committed())
    assert 0 < done < 8  # killed in the middle: 8 shards of 4 windows
    assert storage.exists(storage.join(dest, "run.json")), "killed before the plan was written"
    assert run("--resume", dest) == 0
    got, want = rows_of(dest, "instances"), rows_of(str(local_slide_run), "instances")
    assert got["uri"].str.startswith(f"s3://{s3_bucket}/slides/").all()
    pd.testing.assert_frame_equal(got.drop(columns="uri"), want.drop(columns="uri"), check_exact=True)
    got_slides, want_slides = rows_of(dest, "slides.parquet"), rows_of(str(local_slide_run), "slides.parquet")
    pd.testing.assert_frame_equal(got_slides.drop(columns="uri"), want_slides.drop(columns="uri"))


def test_a_slide_run_is_scored_against_truth_in_slide_coordinates(ray_local, seam_source, tmp_path):
    """The bundled model on the painted slide, through the job: jobs.evaluate moves each window's
    masks onto the slide and scores them against the slide's own COCO truth."""
    labels = painted_slide(tmp_path / "seam.svs", DISCS)  # the same slide, and its label map
    truth = {
        "images": [{"id": 1, "file_name": "seam.svs", "width": 768, "height": 768}],
        "annotations": [dict(a, id=k, image_id=1) for k, a in enumerate(slide_annotations(labels), start=1)],
        "categories": [{"id": 1, "name": "nucleus"}],
    }
    (tmp_path / "truth.json").write_text(json.dumps(truth))
    dest = tmp_path / "run"
    assert run(seam_source, "--output", dest, *SETTINGS) == 0
    scores, tables = evaluate(str(dest), str(tmp_path / "truth.json"))
    assert scores["segm.AP50"] > 0.9 and scores["count.mae"] <= 1
    assert tables["counts"]["gt_count"].tolist() == [len(DISCS)]
    kept = json.loads((dest / "run.json").read_text())["settings"]["score_threshold"]  # the card's
    swept = sweep(str(dest), str(tmp_path / "truth.json"), [kept, 1.01]).set_index("score_threshold")
    assert swept.loc[kept, "recall"] > 0.9 and swept.loc[kept, "precision"] > 0.9
    assert swept.loc[1.01, "instances"] == 0 and swept.loc[1.01, "ground_truth"] == len(DISCS)
    tables = misses(str(dest), str(tmp_path / "truth.json"), score_threshold=kept)
    recall = tables["recall"].set_index("diameter_px")
    assert recall.loc["all", "recall"] == pytest.approx(swept.loc[kept, "recall"])
    # Contrast is read on the slide's level 0: the painted nuclei (110-190 grey levels over glass
    # with noise sigma 2) all stand more than 32 sigmas out.
    by_contrast = tables["recall_by_contrast"].set_index("contrast_to_noise")
    assert set(by_contrast.index) <= {"32-64", "64-128", "128 and over", "all"}
    assert by_contrast.loc["all", "objects"] == len(DISCS)


def test_render_draws_a_density_heatmap_and_a_full_resolution_region(local_slide_run, slide_folder, tmp_path):
    heatmap, region = tmp_path / "A.png", tmp_path / "region.png"
    assert segment_render.main([str(local_slide_run), "--slide", "A", "--output", str(heatmap)]) == 0
    assert cv2.imread(str(heatmap)).shape[:2] == (768, 768)  # the finest level of at most 2048 px
    args = [str(local_slide_run), "--slide", "A", "--region", "100,200,300,150", "--output", str(region)]
    assert segment_render.main(args) == 0
    drawn = cv2.cvtColor(cv2.imread(str(region)), cv2.COLOR_BGR2RGB)
    slide = Slide(str(slide_folder / "A.svs"))
    raw = slide.read_region(100, 200, 0, 300, 150)
    slide.close()
    outlined = (drawn != raw).any(axis=2)
    assert drawn.shape == raw.shape and 0.005 < outlined.mean() < 0.5  # outlines on the slide's own pixels
    bad = [str(local_slide_run), "--slide", "A", "--region", "700,700,300,300", "--output", str(region)]
    assert segment_render.main(bad) == 2
