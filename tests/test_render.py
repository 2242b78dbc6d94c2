"""QC pictures: a tile of its own size with instance colours; a contact sheet; a histogram."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from pipeline.decode import read_and_decode
from pipeline.render import FILL_ALPHA, contact_sheet, for_display, instance_colour
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
