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
made of), for all instances of an image together: the moments with
whole-array NumPy, the convex areas, perimeters and intensities with small
Numba kernels (one pass over the runs, O(mask area); ``jobs.bench masks``
measured the NumPy/Shapely versions of these three at 0.7x the rest of the
encoding; with the kernels all features together are 0.10-0.13x). The kernels are compiled on first
use and cached on disk (see :func:`compiled`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numba
import numpy as np

if TYPE_CHECKING:
    from pipeline.masks import ColumnRuns, CropAtlas

_CODE_WEIGHT = np.zeros(50)
_CODE_WEIGHT[[5, 7, 15, 17, 25, 27]] = 1
_CODE_WEIGHT[[21, 33]] = math.sqrt(2)
_CODE_WEIGHT[[13, 23]] = (1 + math.sqrt(2)) / 2
"""skimage.measure.perimeter (4-neighbourhood): a boundary pixel's weight by its neighbours' code."""


def compiled(function):
    """``function`` compiled by Numba (``nogil``), cached on disk where a cache location is writable.

    Numba caches beside the module or in the user's cache folder
    (``NUMBA_CACHE_DIR`` overrides); where neither can be written (a
    read-only install without a home folder) it refuses to cache, and the
    kernel is then compiled once per process instead.
    """
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(function)


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


@compiled
def _hull_chain(xs, ys, count, sign, chain):  # pragma: no cover - compiled
    """Andrew's monotone chain over points (xs, ys)[:count], x increasing: writes the point indices
    of the chain of least (sign 1) or greatest (sign -1) y into ``chain``, from the first point to
    the last."""
    size = 0
    for p in range(count):
        while size >= 2:
            o, a = chain[size - 2], chain[size - 1]
            cross = (xs[a] - xs[o]) * (ys[p] - ys[o]) - (ys[a] - ys[o]) * (xs[p] - xs[o])
            if cross * sign > 0:
                break
            size -= 1
        chain[size] = p
        size += 1


@compiled
def _convex_areas_kernel(owner, column, row, length, n):  # pragma: no cover - compiled
    area_convex = np.zeros(n, np.int64)
    slots = 3 * len(owner) + 3
    xs, lowest, highest = np.empty(slots, np.int64), np.empty(slots, np.int64), np.empty(slots, np.int64)
    low_chain, high_chain = np.empty(slots, np.int64), np.empty(slots, np.int64)
    start = 0
    while start < len(owner):
        k = owner[start]
        end = start
        while end < len(owner) and owner[end] == k:
            end += 1
        # The hull's candidate points in doubled coordinates (pixel centre (2c, 2r), its edges'
        # mid-points one unit away), one x at a time, x increasing: the least and greatest y.
        count = 0
        i = start
        while i < end:
            c, top = column[i], row[i]
            while i + 1 < end and column[i + 1] == c:
                i += 1
            bottom = row[i] + length[i] - 1
            i += 1
            if count > 0 and xs[count - 1] == 2 * c - 1:
                lowest[count - 1] = min(lowest[count - 1], 2 * top)
                highest[count - 1] = max(highest[count - 1], 2 * bottom)
            else:
                xs[count], lowest[count], highest[count] = 2 * c - 1, 2 * top, 2 * bottom
                count += 1
            xs[count], lowest[count], highest[count] = 2 * c, 2 * top - 1, 2 * bottom + 1
            xs[count + 1], lowest[count + 1], highest[count + 1] = 2 * c + 1, 2 * top, 2 * bottom
            count += 2
        _hull_chain(xs, lowest, count, 1, low_chain)
        _hull_chain(xs, highest, count, -1, high_chain)
        # Pixel centres (even x) between the chains, counted per column with exact integer arithmetic.
        a = b = 0
        total = 0
        for x in range(xs[0] + 1, xs[count - 1], 2):
            while xs[low_chain[a + 1]] < x:
                a += 1
            while xs[high_chain[b + 1]] < x:
                b += 1
            p, q = low_chain[a], low_chain[a + 1]
            span = xs[q] - xs[p]
            first_row = -((-(lowest[p] * span + (lowest[q] - lowest[p]) * (x - xs[p]))) // (2 * span))
            p, q = high_chain[b], high_chain[b + 1]
            span = xs[q] - xs[p]
            last_row = (highest[p] * span + (highest[q] - highest[p]) * (x - xs[p])) // (2 * span)
            total += max(last_row - first_row + 1, 0)
        area_convex[k] = total
        start = end
    return area_convex


def convex_areas(runs: ColumnRuns, n: int) -> np.ndarray:
    """``regionprops.area_convex`` of every instance: int64 (n,), 0 for an empty one.

    The hull is that of the mid-points of the pixels' edges (only the top and
    bottom pixel of each column can contribute), built per instance by a
    monotone chain in doubled integer coordinates; the pixel centres in or on
    it are counted per column with exact integer arithmetic. Compiled: O(runs)
    for all instances together.
    """
    return _convex_areas_kernel(runs.owner, runs.column, runs.row, runs.length, n)


@compiled
def _perimeters_kernel(canvas, owner, canvas_row, canvas_col, length, n, code_weight):  # pragma: no cover
    # Pass 1: boundary pixels (a 4-neighbour is outside). Pass 2: weight each by its boundary neighbours.
    border = np.zeros_like(canvas)
    for i in range(len(owner)):
        r = canvas_row[i]
        for c in range(canvas_col[i], canvas_col[i] + length[i]):
            inner = canvas[r - 1, c] and canvas[r + 1, c] and canvas[r, c - 1] and canvas[r, c + 1]
            border[r, c] = not inner
    perimeter = np.zeros(n)
    for i in range(len(owner)):
        r = canvas_row[i]
        for c in range(canvas_col[i], canvas_col[i] + length[i]):
            if border[r, c]:
                sides = border[r - 1, c] + border[r + 1, c] + border[r, c - 1] + border[r, c + 1]
                up, down = border[r - 1], border[r + 1]
                corners = up[c - 1] + up[c + 1] + down[c - 1] + down[c + 1]
                perimeter[owner[i]] += code_weight[1 + 2 * sides + 10 * corners]
    return perimeter


def boundary_perimeters(runs: ColumnRuns, atlas: CropAtlas, n: int) -> np.ndarray:
    """``regionprops.perimeter`` (4-neighbourhood) of every crop in ``atlas``: float64 (n,).

    A boundary pixel (a mask pixel with a 4-neighbour outside) is weighted by
    which of its neighbours are boundary pixels too, as skimage does. The
    crops lie in the atlas with zeros all around, so each is seen exactly as
    it would be alone; only the runs' pixels are visited.
    """
    canvas_row = atlas.top[runs.owner] + runs.column - atlas.x0[runs.owner]
    canvas_col = atlas.left[runs.owner] + runs.row - atlas.y0[runs.owner]
    return _perimeters_kernel(atlas.canvas, runs.owner, canvas_row, canvas_col, runs.length, n, _CODE_WEIGHT)


def shape_features(
    runs: ColumnRuns, atlas: CropAtlas, n: int, origin: np.ndarray, area: np.ndarray
) -> dict[str, np.ndarray]:
    """Every name in :data:`SHAPE_FEATURES` -> float64 (n,); NaN for empty instances."""
    out = moment_features(runs, n, origin)
    perimeter = boundary_perimeters(runs, atlas, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["solidity"] = np.where(area > 0, area / convex_areas(runs, n), np.nan)
        out["circularity"] = np.where(perimeter > 0, 4 * math.pi * area / perimeter**2, np.nan)
    return out


@compiled
def _intensity_kernel(owner, column, row, length, n, pixels):  # pragma: no cover - compiled
    channels = pixels.shape[2]
    area = np.zeros(n)
    integrated = np.zeros((n, channels))
    minimum = np.full((n, channels), np.inf)
    maximum = np.full((n, channels), -np.inf)
    for i in range(len(owner)):
        k, c = owner[i], column[i]
        area[k] += length[i]
        for r in range(row[i], row[i] + length[i]):
            for ch in range(channels):
                value = np.float64(pixels[r, c, ch])
                integrated[k, ch] += value
                minimum[k, ch] = min(minimum[k, ch], value)
                maximum[k, ch] = max(maximum[k, ch], value)
    mean = np.full((n, channels), np.nan)
    for k in range(n):
        if area[k] > 0:
            mean[k] = integrated[k] / area[k]
    squared = np.zeros((n, channels))
    for i in range(len(owner)):
        k, c = owner[i], column[i]
        for r in range(row[i], row[i] + length[i]):
            for ch in range(channels):
                squared[k, ch] += (np.float64(pixels[r, c, ch]) - mean[k, ch]) ** 2
    std = np.full((n, channels), np.nan)
    for k in range(n):
        if area[k] > 0:
            std[k] = np.sqrt(squared[k] / area[k])
        else:
            minimum[k] = np.nan
            maximum[k] = np.nan
    return mean, std, minimum, maximum, integrated


def intensity_features(runs: ColumnRuns, n: int, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Every name in :data:`INTENSITY_FEATURES` -> float64 (n, C) over each mask's pixels of ``pixels``.

    ``pixels`` (H, W, C) are the raw image values in image coordinates (the
    runs' frame), any numeric dtype. Empty instances get NaN (integrated: 0).
    Compiled: two passes over the mask pixels, the standard deviation about
    the mean (population), all in float64.
    """
    values = _intensity_kernel(runs.owner, runs.column, runs.row, runs.length, n, pixels)
    return dict(zip(INTENSITY_FEATURES, values, strict=True))
