"""Reading stored COCO RLE masks back inside a box.

``pycocotools.mask.decode`` fills the whole H x W canvas for every mask; on a
whole slide that is megabytes per nucleus. :func:`decode_box` decodes only the
pixels of a box, at the cost of the mask's area and run count. NumPy only, so
light modules (QC pictures) can use it without loading torch.
"""

from __future__ import annotations

import numpy as np


def _counts_from_string(counts: str | bytes) -> np.ndarray:
    """The run lengths (int64) of a COCO compressed RLE string (pycocotools' ``rleFrString``)."""
    data = counts.encode("ascii") if isinstance(counts, str) else counts
    values: list[int] = []
    position = 0
    while position < len(data):
        value, shift, more = 0, 0, True
        while more:
            chunk = data[position] - 48
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            position += 1
            shift += 5
            if not more and chunk & 0x10:
                value |= -1 << shift
        if len(values) > 2:
            value += values[-2]
        values.append(value)
    return np.asarray(values, np.int64)


def _mask_pixels(rle: dict) -> tuple[np.ndarray, np.ndarray]:
    """Row and column (int64, column-major order) of every pixel inside the mask."""
    height = int(rle["size"][0])
    counts = rle["counts"]
    lengths = np.asarray(counts, np.int64) if isinstance(counts, list) else _counts_from_string(counts)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    starts, lengths = starts[1::2], lengths[1::2]  # runs alternate background, mask
    flat = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    column, row = np.divmod(flat, height)
    return row, column


def decode_box(rle: dict, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """``pycocotools.mask.decode(rle)[y0:y1, x0:x1]`` without the full-size canvas.

    Args:
        rle: COCO RLE of an H x W mask, ``counts`` compressed (str or bytes) or a list of run lengths.
        x0, y0, x1, y1: the box, 0 <= x0 <= x1 <= W and 0 <= y0 <= y1 <= H (exclusive ends).

    Returns:
        uint8 (y1 - y0, x1 - x0), 1 inside the mask. Costs O(the mask's area + its runs), not O(H x W).
    """
    row, column = _mask_pixels(rle)
    inside = (column >= x0) & (column < x1) & (row >= y0) & (row < y1)
    crop = np.zeros((y1 - y0, x1 - x0), np.uint8)
    crop[row[inside] - y0, column[inside] - x0] = 1
    return crop


def decode_in_own_box(rle: dict) -> tuple[np.ndarray, int, int]:
    """The mask inside its own bounding box: uint8 (h, w), 1 inside, and the box's x0, y0 in the
    RLE's frame (pycocotools' ``toBbox`` box). An empty mask gives a (0, 0) array at 0, 0."""
    row, column = _mask_pixels(rle)
    if not len(row):
        return np.zeros((0, 0), np.uint8), 0, 0
    x0, y0 = int(column.min()), int(row.min())
    crop = np.zeros((int(row.max()) + 1 - y0, int(column.max()) + 1 - x0), np.uint8)
    crop[row - y0, column - x0] = 1
    return crop, x0, y0
