"""Dense-scene post-processing of one image's instances, box-locally.

Mask R-CNN's box NMS lets through duplicates and fragments of one object (a
half-nucleus inside a whole one), and its masks may overlap. Two remedies, both
comparing only pairs of instances whose crops overlap, and only inside the
overlap window (no full canvases):

* :func:`suppress_overlaps`: drop an instance whose mask overlaps a
  higher-scoring kept instance's mask, holes filled, by more than
  ``threshold`` of the smaller mask (intersection over the smaller area): a
  fragment inside a whole object, or lying in a hole of its mask (a dark
  nucleolus inside a nucleus), is part of it;
* :func:`exclusive_pixels`: give each pixel to the highest-scoring instance
  only (the label-map convention of cell-segmentation tools).

Crops must be in descending score order.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.masks import Crop


def _windows(crops: list[Crop]) -> np.ndarray:
    """(N, 4) int x0, y0, x1, y1 of each crop's window in image pixels."""
    return np.array(
        [(c.x0, c.y0, c.x0 + c.mask.shape[1], c.y0 + c.mask.shape[0]) for c in crops], dtype=np.int64
    ).reshape(-1, 4)


def overlapping_pairs(crops: list[Crop]) -> list[np.ndarray]:
    """For each crop j, the indices i < j of earlier crops whose windows intersect j's."""
    w = _windows(crops)
    intersects = (
        (w[:, None, 0] < w[None, :, 2])
        & (w[None, :, 0] < w[:, None, 2])
        & (w[:, None, 1] < w[None, :, 3])
        & (w[None, :, 1] < w[:, None, 3])
    )
    earlier = np.tril(intersects, k=-1)
    return [np.flatnonzero(row) for row in earlier]


def _overlap(a: Crop, b: Crop) -> tuple[np.ndarray, np.ndarray]:
    """The parts of ``a.mask`` and ``b.mask`` over their common window (possibly empty)."""
    x0, y0 = max(a.x0, b.x0), max(a.y0, b.y0)
    x1 = min(a.x0 + a.mask.shape[1], b.x0 + b.mask.shape[1])
    y1 = min(a.y0 + a.mask.shape[0], b.y0 + b.mask.shape[0])
    if x1 <= x0 or y1 <= y0:
        empty = np.zeros((0, 0), bool)
        return empty, empty
    return (
        a.mask[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0],
        b.mask[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0],
    )


def filled(mask: np.ndarray) -> np.ndarray:
    """``mask`` (bool, H x W) with its holes filled: every background pixel that no path of
    4-connected background pixels joins to the crop's edge becomes foreground."""
    padded = np.pad(mask.astype(np.uint8), 1)
    outside = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(padded, outside, (0, 0), 1, flags=4)
    return mask | (padded[1:-1, 1:-1] == 0)


def suppress_overlaps(crops: list[Crop], threshold: float) -> np.ndarray:
    """Bool (N,) keep: False where a mask overlaps a kept higher-scoring one by > ``threshold``.

    The overlap is the intersection with the higher-scoring mask, its holes filled (:func:`filled`),
    over the smaller of the two masks' areas, so an instance lying in a hole of a higher-scoring one
    counts as inside it. ``threshold >= 1`` keeps everything. Empty masks are kept here (the caller
    drops them as empty).
    """
    keep = np.ones(len(crops), bool)
    if threshold >= 1 or len(crops) < 2:
        return keep
    areas = np.array([int(c.mask.sum()) for c in crops])
    regions: dict[int, Crop] = {}
    for j, earlier in enumerate(overlapping_pairs(crops)):
        if areas[j] == 0:
            continue
        for i in earlier:
            if not keep[i] or areas[i] == 0:
                continue
            if i not in regions:
                regions[i] = Crop(filled(crops[i].mask), crops[i].x0, crops[i].y0)
            a, b = _overlap(regions[i], crops[j])
            intersection = int(np.count_nonzero(a & b))
            if intersection > threshold * min(areas[i], areas[j]):
                keep[j] = False
                break
    return keep


def exclusive_pixels(crops: list[Crop]) -> list[Crop]:
    """Crops where each pixel belongs only to the first (highest-scoring) crop that had it."""
    out = [Crop(c.mask.copy(), c.x0, c.y0) for c in crops]
    for j, earlier in enumerate(overlapping_pairs(out)):
        for i in earlier:
            taken, mine = _overlap(out[i], out[j])
            if mine.size:
                mine &= ~taken
    return out
