"""QC pictures for people: a tile with its instances, a slide's contact sheet, an area histogram;
for a whole-slide file, its thumbnail with a cell-density heatmap or a full-resolution region with outlines.

Each instance is filled in its own colour (half transparent, so the tissue
shows through) and outlined in white; with ``labels``, its class initial and
score are written at its centroid. Masks come from the stored RLE, so the
picture shows exactly what the tables hold.
"""

from __future__ import annotations

import colorsys

import cv2
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import shapely

from pipeline import stats
from pipeline.decode import DecodeError, RawImage, read_and_decode
from pipeline.preprocess import Preprocessing, model_input
from pipeline.rle import decode_in_own_box
from pipeline.slides import Slide
from pipeline.stats import read_table

FILL_ALPHA = 0.45
DISPLAY = Preprocessing(channel="rgb", normalize="percentile", floor_snr=20.0)
"""How a raw image is shown: its colour channels (grey repeated), percentiles 1 / 99.8 stretched."""
GOLDEN_RATIO = 0.618033988749895


def instance_colour(index: int) -> tuple[int, int, int]:
    """A bright RGB colour for instance ``index``; neighbours in index differ strongly in hue."""
    hue = (index * GOLDEN_RATIO) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_instances(image: np.ndarray, instances: pd.DataFrame, *, labels: bool = False) -> np.ndarray:
    """``image`` (H, W, 3) uint8 RGB with ``instances`` (rows of the instances table) drawn on it."""
    canvas = image.astype(np.float32)
    outlines = np.zeros(image.shape[:2], np.uint8)
    height, width = image.shape[:2]
    for index, row in enumerate(instances.itertuples()):
        mask, x0, y0 = decode_in_own_box({"size": [height, width], "counts": row.rle})
        inside, covered = canvas[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]], mask.astype(bool)
        colour = np.array(instance_colour(index), np.float32)
        inside[covered] = (1 - FILL_ALPHA) * inside[covered] + FILL_ALPHA * colour
        contours, _ = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE, offset=(x0, y0))
        cv2.drawContours(outlines, contours, -1, 255, 1)
    out = canvas.round().astype(np.uint8)
    out[outlines > 0] = 255
    if labels:
        for row in instances.itertuples():
            text = f"{row.class_name[:1]} {row.score:.2f}"
            origin = (int(row.centroid_x) - 10, int(row.centroid_y) + 3)
            cv2.putText(out, text, origin, cv2.FONT_HERSHEY_PLAIN, 0.7, (0, 0, 0), 2, cv2.LINE_AA)
            cv2.putText(out, text, origin, cv2.FONT_HERSHEY_PLAIN, 0.7, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def for_display(raw: RawImage) -> np.ndarray:
    """A raw image (any bit depth, any channels) as uint8 RGB (H, W, 3) for people.

    8-bit RGB is shown as stored; anything else (grey, 16-bit, float, more
    channels) has its first three channels (grey repeated) stretched between
    the 1st and 99.8th percentiles, so a 12-bit camera image is not black.
    """
    if raw.pixels.dtype == np.uint8 and raw.pixels.shape[2] == 3:
        return raw.pixels
    stretched = model_input(raw.pixels, DISPLAY, channel_names=raw.channel_names)
    return np.ascontiguousarray((stretched.transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8))


def _tile(uri: str, instances: pd.DataFrame, labels: bool) -> np.ndarray:
    image = read_and_decode(uri, max_pixels=10**9)
    if isinstance(image, DecodeError):
        raise ValueError(f"cannot render {uri}: {image.kind}: {image.message}")
    return draw_instances(for_display(image), instances[instances["uri"] == uri], labels=labels)


def render_image(dest: str, uri: str, *, labels: bool = False) -> np.ndarray:
    """The tile at ``uri`` (H, W, 3 RGB uint8, its own size) with the run's instances on it.

    Raises:
        ValueError: the run has no image ``uri``, or it cannot be decoded.
    """
    images = read_table(dest, "images", columns=["uri"])
    if uri not in set(images["uri"]):
        raise ValueError(f"the run has no image {uri!r}")
    return _tile(uri, read_table(dest, "instances"), labels)


def contact_sheet(
    dest: str, slide: str, *, labels: bool = False, max_tiles: int = 64, cell_px: int = 256
) -> np.ndarray:
    """A grid of the slide's first ``max_tiles`` ok tiles (each fitted into ``cell_px``), rendered.

    Each cell is captioned with the tile's file name and instance count.

    Raises:
        ValueError: the slide has no tile that was segmented.
    """
    images = read_table(dest, "images", columns=["uri", "slide_id", "status", "n_instances"])
    tiles = images[(images["slide_id"] == slide) & (images["status"] == "ok")].sort_values("uri")
    if tiles.empty:
        raise ValueError(f"the run has no segmented tile on slide {slide!r}")
    tiles = tiles.head(max_tiles)
    instances = read_table(dest, "instances")
    instances = instances[instances["slide_id"] == slide]
    columns = int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / columns))
    caption_px = 16
    sheet = np.full((rows * (cell_px + caption_px), columns * cell_px, 3), 32, np.uint8)
    for k, tile in enumerate(tiles.itertuples()):
        rendered = _tile(tile.uri, instances, labels)
        scale = cell_px / max(rendered.shape[:2])
        fitted = cv2.resize(rendered, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        top, left = (k // columns) * (cell_px + caption_px), (k % columns) * cell_px
        sheet[top : top + fitted.shape[0], left : left + fitted.shape[1]] = fitted
        caption = f"{tile.uri.rsplit('/', 1)[-1]}  n={tile.n_instances}"
        cv2.putText(
            sheet, caption, (left + 3, top + cell_px + 12), cv2.FONT_HERSHEY_PLAIN, 0.8, (230, 230, 230), 1
        )
    return sheet


def feature_histogram(dest: str, slide: str, path: str, *, feature: str = "area", bins: int = 40) -> None:
    """Write a PNG histogram of one instance feature per class on ``slide``.

    ``feature`` is any spec :func:`pipeline.stats.feature_columns` takes that
    names one column: ``area``, ``solidity``, ``intensity_mean[DAPI]``... (a
    per-channel feature of a one-channel run needs no channel).

    Raises:
        ValueError: no instance on ``slide``, or ``feature`` is unknown or names several columns.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column = stats.FEATURE_PATTERN.match(feature)
    if not column or column["column"] not in stats.numeric_features():
        raise ValueError(f"unknown feature {feature!r}; numeric columns: {stats.numeric_features()}")
    instances = read_table(dest, "instances", columns=["slide_id", "class_name", column["column"]])
    instances = instances[instances["slide_id"] == slide]
    if instances.empty:
        raise ValueError(f"the run has no instance on slide {slide!r}")
    images = read_table(dest, "images", columns=["slide_id", "channels"])
    values = stats.feature_columns(instances, images[images["slide_id"] == slide], [feature])
    if values.shape[1] != 1:
        raise ValueError(f"{feature!r} has one value per channel: name one, e.g. {values.columns[0]}")
    label = values.columns[0]
    figure, axis = plt.subplots(figsize=(7, 4))
    finite = values[label][np.isfinite(values[label])]
    edges = np.histogram_bin_edges(finite, bins=bins)
    for name, group in values[label].groupby(instances["class_name"]):
        axis.hist(group.dropna(), bins=edges, alpha=0.6, label=f"{name} (n={len(group)})")
    axis.set_xlabel(f"{label} (units: schemas/tables.py)")
    axis.set_ylabel("instances")
    axis.set_title(f"{label} on {slide}")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


HEATMAP_CELL_PX = 16
"""Side of a heatmap cell in thumbnail pixels."""
MAX_REGION_PX = 4096
"""Longest side of a full-resolution ``--region`` picture, level-0 px."""


def is_slide_file(dest: str, slide: str) -> bool:
    """Whether ``slide`` is a whole-slide file of the run (not a folder of tiles)."""
    return stats.slide_row(dest, slide) is not None


def slide_heatmap(dest: str, slide: str) -> np.ndarray:
    """The slide's thumbnail (RGB uint8) with a heatmap of cell density (cells per mm², or per cell of
    the grid when the pixel size is unknown) over it, and the scale written in a corner."""
    row = stats.slide_row(dest, slide)
    opened = Slide(row["uri"])
    try:
        thumbnail, scale = opened.thumbnail
        picture = for_display(RawImage(thumbnail, opened.info.channels)).copy()
    finally:
        opened.close()
    found = stats.dataset(dest, "instances").to_table(
        columns=["centroid_x", "centroid_y"], filter=pc.field("slide_id") == slide
    )
    height, width = picture.shape[:2]
    rows, columns = -(-height // HEATMAP_CELL_PX), -(-width // HEATMAP_CELL_PX)
    cell = scale * HEATMAP_CELL_PX  # level-0 px per heatmap cell
    counts, _, _ = np.histogram2d(
        found["centroid_y"].to_numpy(),
        found["centroid_x"].to_numpy(),
        bins=(rows, columns),
        range=((0, rows * cell), (0, columns * cell)),
    )
    mpp = row["mpp"] if pd.notna(row["mpp"]) else None
    density = counts / ((cell * mpp / 1000) ** 2) if mpp else counts
    top = float(density.max()) or 1.0
    colours = cv2.applyColorMap((density / top * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)[..., ::-1]
    colours = cv2.resize(
        colours, (columns * HEATMAP_CELL_PX, rows * HEATMAP_CELL_PX), interpolation=cv2.INTER_NEAREST
    )
    colours = colours[:height, :width]
    filled = cv2.resize(
        (counts > 0).astype(np.uint8),
        (columns * HEATMAP_CELL_PX, rows * HEATMAP_CELL_PX),
        interpolation=cv2.INTER_NEAREST,
    )[:height, :width].astype(bool)
    picture[filled] = (0.4 * picture[filled] + 0.6 * colours[filled]).astype(np.uint8)
    unit = "cells/mm2" if mpp else f"cells per {cell:.0f}px cell"
    caption = f"{slide}: {len(found)} cells, max {top:.0f} {unit}"
    cv2.putText(picture, caption, (6, 18), cv2.FONT_HERSHEY_PLAIN, 1.0, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(picture, caption, (6, 18), cv2.FONT_HERSHEY_PLAIN, 1.0, (255, 255, 255), 1, cv2.LINE_AA)
    return picture


def slide_region(dest: str, slide: str, x: int, y: int, width: int, height: int) -> np.ndarray:
    """Level-0 pixels [x, x + width) x [y, y + height) of the slide (RGB uint8) with the outlines of
    the instances there (their polygons, as the tables hold them).

    Raises:
        ValueError: a region larger than :data:`MAX_REGION_PX` on a side, or outside the slide.
    """
    if not (0 < width <= MAX_REGION_PX and 0 < height <= MAX_REGION_PX):
        raise ValueError(f"--region sides must be 1 to {MAX_REGION_PX} px, got {width} x {height}")
    row = stats.slide_row(dest, slide)
    if x < 0 or y < 0 or x + width > row["width"] or y + height > row["height"]:
        raise ValueError(
            f"--region {x},{y},{width},{height} is not inside the slide ({row['width']} x {row['height']})"
        )
    opened = Slide(row["uri"])
    try:
        picture = for_display(
            RawImage(opened.read_region(x, y, 0, width, height), opened.info.channels)
        ).copy()
    finally:
        opened.close()
    inside = (
        (pc.field("slide_id") == slide)
        & (pc.field("x1") >= x)
        & (pc.field("x0") <= x + width)
        & (pc.field("y1") >= y)
        & (pc.field("y0") <= y + height)
    )
    found = stats.dataset(dest, "instances").to_table(columns=["polygon"], filter=inside)
    for index, geometry in enumerate(shapely.from_wkb(found["polygon"].to_numpy(zero_copy_only=False))):
        for polygon in getattr(geometry, "geoms", [geometry]):
            for ring in [polygon.exterior, *polygon.interiors]:
                points = (np.asarray(ring.coords) - (x, y)).round().astype(np.int32)
                cv2.polylines(picture, [points], True, instance_colour(index), 1, cv2.LINE_AA)
    return picture
