"""Per-instance shape and intensity measurements, from the masks' column runs, all instances at once.

Definitions follow scikit-image ``regionprops`` (tested against it):

* ``axis_major_length``, ``axis_minor_length``: 4 x the square root of the
  eigenvalues of the pixel coordinates' covariance (the ellipse with the same
  second moments), px;
* ``eccentricity``: ``sqrt(1 - minor_eigenvalue / major_eigenvalue)``, 0 for a
  circle (and a single pixel), towards 1 for a line;
* ``orientation``: angle in radians in [-pi/2, pi/2] between the image's row
  axis (y, down) and the major axis, counter-clockwise as seen with rows
  down, as ``regionprops`` gives it;
* ``solidity``: area / convex area, the convex area counting the pixels whose
  centres lie in or on the convex hull of the mid-points of the mask's pixel
  edges (``regionprops.area_convex``);
* ``circularity``: ``4 pi area / perimeter ** 2`` with regionprops'
  ``perimeter`` (4-connected boundary pixels weighted by their neighbours:
  about 0.9 for a digital disc, less for anything rougher or longer; tiny
  objects can exceed 1). The stored ``perimeter`` column is the
  polygon's, which follows pixel edges and is longer (a disc would score 0.7);
* ``intensity_mean``, ``intensity_std`` (population), ``intensity_min``,
  ``intensity_max``, ``intensity_integrated`` (sum): per channel, over the
  mask's pixels, on the raw image values (native bit depth, never the model's
  normalised input).

Everything works from :class:`pipeline.masks.ColumnRuns` (the runs the RLE is
made of) with whole-array NumPy and Shapely calls: the cost is O(mask area +
hull size) for all instances of an image together, no per-instance loop.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import cv2
import numpy as np
import shapely

if TYPE_CHECKING:
    from pipeline.masks import ColumnRuns, CropAtlas

_CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], np.uint8)
_NEIGHBOUR_CODE = np.array([[10, 2, 10], [2, 1, 2], [10, 2, 10]], np.float32)
_CODE_WEIGHT = np.zeros(50)
_CODE_WEIGHT[[5, 7, 15, 17, 25, 27]] = 1
_CODE_WEIGHT[[21, 33]] = math.sqrt(2)
_CODE_WEIGHT[[13, 23]] = (1 + math.sqrt(2)) / 2
"""skimage.measure.perimeter (4-neighbourhood): a boundary pixel's weight by its neighbours' code."""

SHAPE_FEATURES = (
    "axis_major_length",
    "axis_minor_length",
    "eccentricity",
    "orientation",
    "solidity",
    "circularity",
)
INTENSITY_FEATURES = (
    "intensity_mean",
    "intensity_std",
    "intensity_min",
    "intensity_max",
    "intensity_integrated",
)


def _run_moments(runs: ColumnRuns, n: int, origin: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per instance (n,): pixel count and sums of r, c, r^2, c^2, r*c (rows r, columns c from ``origin``).

    ``origin`` int64 (n, 2): (x, y) subtracted per instance, so sums stay small.
    """
    length = runs.length.astype(np.float64)
    c = (runs.column - origin[runs.owner, 0]).astype(np.float64)
    r = (runs.row - origin[runs.owner, 1]).astype(np.float64)
    # A run covers rows r .. r + L - 1 of column c.
    sum_r = length * r + length * (length - 1) / 2
    sum_r2 = length * r * r + r * length * (length - 1) + (length - 1) * length * (2 * length - 1) / 6

    def total(weights):
        return np.bincount(runs.owner, weights=weights, minlength=n)

    return (
        total(length),
        total(sum_r),
        total(length * c),
        total(sum_r2),
        total(length * c * c),
        total(c * sum_r),
    )


def moment_features(runs: ColumnRuns, n: int, origin: np.ndarray) -> dict[str, np.ndarray]:
    """``axis_major_length``, ``axis_minor_length``, ``eccentricity``, ``orientation``: float64 (n,).

    The central second moments are formed in exact integer arithmetic (count^2
    times each variance), so a symmetric shape has exactly equal variances and
    zero covariance, as regionprops finds. Empty instances get NaN.
    """
    sums = _run_moments(runs, n, origin)
    count, s_r, s_c, s_rr, s_cc, s_rc = (np.rint(v).astype(np.int64).astype(object) for v in sums)
    m_rr = count * s_rr - s_r * s_r  # count^2 * var(rows), exact
    m_cc = count * s_cc - s_c * s_c
    m_rc = count * s_rc - s_r * s_c
    empty = count == 0
    scale = np.where(empty, 1, count * count)
    half_sum = ((m_rr + m_cc) / (2 * scale)).astype(np.float64)
    half_diff = ((m_rr - m_cc) / (2 * scale)).astype(np.float64)
    cov = (m_rc / scale).astype(np.float64)
    root = np.hypot(half_diff, cov)
    major, minor = half_sum + root, np.maximum(half_sum - root, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        eccentricity = np.where(major > 0, np.sqrt(np.clip(1 - minor / major, 0, 1)), 0.0)
    # regionprops: 0.5 atan2(-2 b, c - a) with inertia tensor [[var_c, -cov], [-cov, var_r]].
    tilted = np.where(cov > 0, math.pi / 4, -math.pi / 4)
    orientation = np.where(m_rr == m_cc, tilted, 0.5 * np.arctan2(2 * cov, 2 * half_diff)).astype(np.float64)
    out = {
        "axis_major_length": 4 * np.sqrt(major),
        "axis_minor_length": 4 * np.sqrt(minor),
        "eccentricity": eccentricity,
        "orientation": orientation,
    }
    for values in out.values():
        values[empty.astype(bool)] = np.nan
    return out


def convex_areas(runs: ColumnRuns, n: int) -> np.ndarray:
    """``regionprops.area_convex`` of every instance: int64 (n,), 0 for an empty one.

    The hull is that of the mid-points of the pixels' edges; only the top and
    bottom pixel of each column can contribute. Coordinates are doubled so the
    mid-points are integers, and the pixel centres in or on each hull are
    counted per column with exact integer arithmetic.
    """
    area_convex = np.zeros(n, np.int64)
    if not len(runs.owner):
        return area_convex
    # Top and bottom pixel of each (instance, column): runs are sorted by owner, column, row.
    starts = np.flatnonzero(
        np.r_[True, (runs.owner[1:] != runs.owner[:-1]) | (runs.column[1:] != runs.column[:-1])]
    )
    ends = np.r_[starts[1:], len(runs.owner)] - 1
    owner, column = runs.owner[starts], runs.column[starts]
    top, bottom = runs.row[starts], runs.row[ends] + runs.length[ends] - 1
    x, y_top, y_bottom = 2 * column, 2 * top, 2 * bottom
    # Candidates: the top and bottom edge mid-points of each column, and the side mid-points of its
    # top and bottom pixel unless a neighbouring column of the instance covers them: a side point
    # lies inside or on the segment between two neighbouring columns' top (bottom) mid-points
    # unless the neighbour's top (bottom) pixel is at least two rows further out.
    has_next = np.r_[(owner[1:] == owner[:-1]) & (column[1:] == column[:-1] + 1), False]
    has_previous = np.r_[False, has_next[:-1]]
    next_top, next_bottom = np.r_[top[1:], 0], np.r_[bottom[1:], 0]
    previous_top, previous_bottom = np.r_[0, top[:-1]], np.r_[0, bottom[:-1]]
    candidates = [
        (x, y_top - 1, np.ones_like(has_next)),
        (x, y_bottom + 1, np.ones_like(has_next)),
        (x + 1, y_top, ~has_next | (next_top >= top + 2)),
        (x - 1, y_top, ~has_previous | (previous_top >= top + 2)),
        (x + 1, y_bottom, ~has_next | (next_bottom <= bottom - 2)),
        (x - 1, y_bottom, ~has_previous | (previous_bottom <= bottom - 2)),
    ]
    keep = np.stack([k for _, _, k in candidates], 1).ravel()
    points = np.stack([np.stack([px, py], 1) for px, py, _ in candidates], 1).reshape(-1, 2)[keep]
    owners_with_hull, dense = np.unique(np.repeat(owner, len(candidates))[keep], return_inverse=True)
    # A line string through the points has their hull, and costs one coordinate sequence instead of a
    # geometry per point (10x faster than multipoints here).
    hulls = shapely.convex_hull(shapely.linestrings(points, indices=dense))
    vertices, ring = shapely.get_coordinates(hulls, return_index=True)
    vertices = np.rint(vertices).astype(np.int64)
    # Edges join consecutive vertices of the same (closed) ring.
    same = ring[1:] == ring[:-1]
    x1, y1 = vertices[:-1][same, 0], vertices[:-1][same, 1]
    x2, y2 = vertices[1:][same, 0], vertices[1:][same, 1]
    edge_owner = owners_with_hull[ring[:-1][same]]
    sloped = x1 != x2
    x1, y1, x2, y2, edge_owner = x1[sloped], y1[sloped], x2[sloped], y2[sloped], edge_owner[sloped]
    low, high = np.minimum(x1, x2), np.maximum(x1, x2)
    first_even = low + (low % 2)
    columns_per_edge = np.maximum((high - first_even) // 2 + 1, 0)
    edge = np.repeat(np.arange(len(x1)), columns_per_edge)
    step = np.arange(len(edge)) - np.repeat(np.cumsum(columns_per_edge) - columns_per_edge, columns_per_edge)
    at_x = first_even[edge] + 2 * step
    # y at at_x is numerator / denominator (denominator > 0), in doubled units.
    sign = np.sign(x2 - x1)[edge]
    numerator = (y1[edge] * (x2 - x1)[edge] + (y2 - y1)[edge] * (at_x - x1[edge])) * sign
    denominator = np.abs(x2 - x1)[edge] * 2  # halve: back to pixel rows
    lowest_row = -((-numerator) // denominator)  # ceil
    highest_row = numerator // denominator  # floor
    key_owner, key_x = edge_owner[edge], at_x
    order = np.lexsort((key_x, key_owner))
    key_owner, key_x = key_owner[order], key_x[order]
    group = np.flatnonzero(np.r_[True, (key_owner[1:] != key_owner[:-1]) | (key_x[1:] != key_x[:-1])])
    top_row = np.minimum.reduceat(lowest_row[order], group)
    bottom_row = np.maximum.reduceat(highest_row[order], group)
    counts = np.maximum(bottom_row - top_row + 1, 0)
    np.add.at(area_convex, key_owner[group], counts)
    return area_convex


def boundary_perimeters(atlas: CropAtlas, n: int) -> np.ndarray:
    """``regionprops.perimeter`` (4-neighbourhood) of every crop in ``atlas``: float64 (n,).

    The crops lie in the atlas with zeros all around, so one erosion and one
    3 x 3 filter over the canvas see each crop exactly as it would be seen alone.
    """
    canvas = atlas.canvas
    border = canvas - cv2.erode(canvas, _CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    code = cv2.filter2D(border.astype(np.float32), -1, _NEIGHBOUR_CODE, borderType=cv2.BORDER_CONSTANT)
    rows, cols = np.nonzero(border)
    weights = _CODE_WEIGHT[np.rint(code[rows, cols]).astype(np.int64)]
    return np.bincount(atlas.owner(rows, cols), weights=weights, minlength=n)


def shape_features(
    runs: ColumnRuns, atlas: CropAtlas, n: int, origin: np.ndarray, area: np.ndarray
) -> dict[str, np.ndarray]:
    """Every name in :data:`SHAPE_FEATURES` -> float64 (n,); NaN for empty instances."""
    out = moment_features(runs, n, origin)
    perimeter = boundary_perimeters(atlas, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["solidity"] = np.where(area > 0, area / convex_areas(runs, n), np.nan)
        out["circularity"] = np.where(perimeter > 0, 4 * math.pi * area / perimeter**2, np.nan)
    return out


def intensity_features(runs: ColumnRuns, n: int, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Every name in :data:`INTENSITY_FEATURES` -> float64 (n, C) over each mask's pixels of ``pixels``.

    ``pixels`` (H, W, C) are the raw image values in image coordinates (the
    runs' frame). Empty instances get NaN (integrated: 0).
    """
    channels = pixels.shape[2]
    length = runs.length
    total = int(length.sum())
    owner = np.repeat(runs.owner, length)
    offset = np.arange(total) - np.repeat(np.cumsum(length) - length, length)
    flat = np.repeat(runs.row * pixels.shape[1] + runs.column, length) + offset * pixels.shape[1]
    values = pixels.reshape(-1, channels)[flat].astype(np.float64)  # (P, C), grouped by owner
    area = np.bincount(owner, minlength=n).astype(np.float64)
    integrated = np.stack([np.bincount(owner, weights=values[:, k], minlength=n) for k in range(channels)], 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = integrated / area[:, None]
    squared = (values - mean[owner]) ** 2
    variance = np.stack([np.bincount(owner, weights=squared[:, k], minlength=n) for k in range(channels)], 1)
    minimum = np.full((n, channels), np.nan)
    maximum = np.full((n, channels), np.nan)
    if total:
        first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])  # owner is sorted
        present = owner[first]
        minimum[present] = np.minimum.reduceat(values, first, axis=0)
        maximum[present] = np.maximum.reduceat(values, first, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(variance / area[:, None])
    return {
        "intensity_mean": mean,
        "intensity_std": std,
        "intensity_min": minimum,
        "intensity_max": maximum,
        "intensity_integrated": integrated,
    }
