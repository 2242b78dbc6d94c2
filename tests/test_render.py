"""QC pictures: a tile of its own size with instance colours; a contact sheet; a histogram."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from pipeline.decode import read_and_decode
from pipeline.render import FILL_ALPHA, contact_sheet, draw_instances, for_display, instance_colour
from tests.helpers import run_job


def test_render_writes_the_tile_with_instance_colours(segmented_run, tmp_path):
    instances = pd.read_parquet(segmented_run / "instances")
    uri = instances["uri"].iloc[0]
    output = tmp_path / "qc.png"
    result = run_job("jobs.render", str(segmented_run), "--image", uri, "--output", str(output), timeout=120)
    assert result.returncode == 0, result.stderr
    picture = cv2.cvtColor(cv2.imread(str(output)), cv2.COLOR_BGR2RGB)
    original = for_display(read_and_decode(uri, max_pixels=10**8))
    assert picture.shape == original.shape
    assert not np.array_equal(picture, original)
    # White outlines are drawn; pixels outside every instance keep the original.
    assert (picture == 255).all(axis=2).any()
    height, width = original.shape[:2]
    masks = [
        mask_utils.decode({"size": [height, width], "counts": rle}).astype(bool)
        for rle in instances.loc[instances["uri"] == uri, "rle"]
    ]
    cover = np.sum(masks, axis=0)
    assert np.array_equal(picture[cover == 0], original[cover == 0])
    # A pixel inside one instance only, off its outline, is the original blended once with its colour.
    checked = 0
    for index, mask in enumerate(masks):
        off_outline = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), borderValue=0)
        inner = off_outline.astype(bool) & (cover == 1)
        expected = (1 - FILL_ALPHA) * original[inner] + FILL_ALPHA * np.array(instance_colour(index), float)
        assert np.abs(picture[inner] - expected).max(initial=0) <= 1, index
        checked += int(inner.sum())
    assert checked > 0


def _drawn_on_the_whole_canvas(image: np.ndarray, rles: list[str]) -> np.ndarray:
    """The reference drawing: every mask decoded and traced on the whole image."""
    canvas = image.astype(np.float32)
    outlines = np.zeros(image.shape[:2], np.uint8)
    for index, rle in enumerate(rles):
        mask = mask_utils.decode({"size": list(image.shape[:2]), "counts": rle})
        colour = np.array(instance_colour(index), np.float32)
        canvas[mask > 0] = (1 - FILL_ALPHA) * canvas[mask > 0] + FILL_ALPHA * colour
        contours, _ = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(outlines, contours, -1, 255, 1)
    out = canvas.round().astype(np.uint8)
    out[outlines > 0] = 255
    return out


def test_instances_drawn_inside_their_boxes_equal_the_whole_canvas_drawing():
    """Fill and outlines pixel for pixel as when each mask is decoded and traced on the whole
    image: overlapping masks, masks cut by every edge, a ring with its hole, a single pixel."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    shapes = []
    for cx, cy, r in [(20, 20, 9), (27, 24, 8), (0, 35, 7), (89, 10, 6), (45, 0, 5), (60, 69, 10)]:
        shapes.append(cv2.circle(np.zeros((70, 90), np.uint8), (cx, cy), r, 1, -1))
    ring = cv2.circle(np.zeros((70, 90), np.uint8), (60, 35), 11, 1, -1)
    shapes.append(cv2.circle(ring, (60, 35), 4, 0, -1))
    dot = np.zeros((70, 90), np.uint8)
    dot[50, 10] = 1
    shapes.append(dot)
    rles = [mask_utils.encode(np.asfortranarray(m))["counts"].decode("ascii") for m in shapes]
    drawn = draw_instances(image, pd.DataFrame({"rle": rles}))
    np.testing.assert_array_equal(drawn, _drawn_on_the_whole_canvas(image, rles))


def test_contact_sheet_and_histogram(segmented_run, tmp_path):
    slide = pd.read_parquet(segmented_run / "images")["slide_id"].iloc[0]
    sheet = contact_sheet(str(segmented_run), slide, cell_px=64)
    assert sheet.shape == (2 * (64 + 16), 2 * 64, 3)
    histogram = tmp_path / "hist.png"
    output = tmp_path / "sheet.png"
    result = run_job(
        "jobs.render",
        str(segmented_run),
        "--slide",
        slide,
        "--output",
        str(output),
        "--labels",
        "--histogram",
        str(histogram),
        "--feature",
        "intensity_mean[0]",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert output.read_bytes()[:4] == histogram.read_bytes()[:4] == b"\x89PNG"
