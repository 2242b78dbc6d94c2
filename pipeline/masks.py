"""Box-local instance masks: COCO RLE, polygons and measurements.

Mask R-CNN predicts each instance's mask as an M x M (M = 28) grid of
probabilities inside its box. torchvision's post-processing pastes every
grid into a full H x W canvas (``paste_masks_in_image``), and encoding those
canvases costs O(instances x image area). Here every step works inside the
instance's own (expanded, integer) box, so the cost is O(box area):

1. paste (:mod:`pipeline.paste`, on the model's device): torchvision's
   arithmetic exactly, inside the box, then threshold; each instance becomes a
   :class:`Crop` that equals ``paste_masks_in_image(...)[i, 0] >= threshold``
   pixel for pixel;
2. pack: all crops of the image go, transposed, into one small zero-separated
   canvas (:class:`CropAtlas`), so that what follows is a few whole-array
   calls per image, not a few calls per instance;
3. RLE: the canvas's row-major runs are the crops' column-major runs; offset
   into the full image's run sequence, ``pycocotools`` compresses the counts;
4. polygon: one OpenCV trace (``RETR_CCOMP``, so holes survive) of the
   canvas's pixel edges (:func:`pixel_edge_grid`), so outlines follow pixel
   edges; WKB bytes;
5. measurements from the runs: area, centroid, and the shape and raw
   intensity features of :mod:`pipeline.features`.

Conventions: pixel (row i, column j) covers [j, j + 1) x [i, i + 1) in image
coordinates (x right, y down), so its centre is (j + 0.5, i + 0.5). Boxes are
x0, y0, x1, y1 in those coordinates.

Steps 2-5 (:func:`encode_crops`) need no torch, so evaluation and export do
not import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import shapely
from pycocotools import mask as mask_utils
from shapely.geometry import Polygon

from pipeline import features
from pipeline.columns import InstanceColumns


@dataclass(frozen=True)
class Crop:
    """One instance's thresholded mask inside the image: ``mask[r, c]`` is pixel (y0 + r, x0 + c).

    ``mask`` is bool (h, w), possibly (0, 0) when the box lies outside the image.
    """

    mask: np.ndarray
    x0: int
    y0: int


@dataclass(frozen=True)
class CropAtlas:
    """The crops of one image packed, transposed, into one uint8 canvas.

    Crop k's mask, transposed to (w, h), sits at ``canvas[top[k] : top[k] + w,
    left[k] : left[k] + h]`` with zero pixels all around it. Transposed, an
    atlas row is an image column, so the canvas's row-major runs are the
    crops' column-major (COCO) runs, and one ``cv2.findContours`` over the
    canvas traces every crop exactly as it would trace the crop alone.
    Crops are placed on shelves, tallest first, so the canvas is about the
    summed crop area (a crop much longer than the rest adds its length x the
    canvas width), never the image's.

    Fields: canvas uint8 (rows, width); top, left, x0, y0 int64 (N,), the
    crop's place in the canvas and in the image; shelf_top int64 (S,), first
    canvas row of each shelf; placed_key int64 (P,) and placed int64 (P,), the
    placed (non-empty) crops in placement order with key shelf * width + left,
    increasing.
    """

    canvas: np.ndarray
    top: np.ndarray
    left: np.ndarray
    x0: np.ndarray
    y0: np.ndarray
    shelf_top: np.ndarray
    placed_key: np.ndarray
    placed: np.ndarray

    @classmethod
    def pack(cls, crops: list[Crop]) -> CropAtlas:
        """Pack ``crops`` (empty ones take no space) into a new atlas."""
        # Transposed, a crop's image columns are canvas rows and its image rows canvas columns.
        rows = [c.mask.shape[1] for c in crops]
        cols = [c.mask.shape[0] for c in crops]
        cells = sum((r + 1) * (c + 1) for r, c in zip(rows, cols, strict=True))
        # The widest crop plus a zero column on each side, and at least about
        # square so that shelves stay few.
        width = max(max(cols, default=0) + 2, math.isqrt(cells) + 2)
        n = len(crops)
        top, left = np.zeros(n, np.int64), np.zeros(n, np.int64)
        shelf_top, placed, placed_key = [1], [], []
        row, col, shelf_rows = 1, 1, 0
        for k in sorted(range(n), key=lambda i: -rows[i]):
            if rows[k] == 0 or cols[k] == 0:
                continue
            if col + cols[k] + 1 > width:
                row, col, shelf_rows = row + shelf_rows + 1, 1, 0
                shelf_top.append(row)
            top[k], left[k] = row, col
            placed.append(k)
            placed_key.append((len(shelf_top) - 1) * width + col)
            col += cols[k] + 1
            shelf_rows = max(shelf_rows, rows[k])
        canvas = np.zeros((row + shelf_rows + 1, width), np.uint8)
        for k in placed:
            canvas[top[k] : top[k] + rows[k], left[k] : left[k] + cols[k]] = crops[k].mask.T
        return cls(
            canvas,
            top,
            left,
            np.array([c.x0 for c in crops], np.int64),
            np.array([c.y0 for c in crops], np.int64),
            np.array(shelf_top, np.int64),
            np.array(placed_key, np.int64),
            np.array(placed, np.int64),
        )

    def owner(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Index of the crop holding each canvas pixel (rows[i], cols[i]), ints; each must lie in a crop."""
        shelf = np.searchsorted(self.shelf_top, rows, side="right") - 1
        key = shelf * self.canvas.shape[1] + cols
        return self.placed[np.searchsorted(self.placed_key, key, side="right") - 1]

    def to_image(
        self, rows: np.ndarray, cols: np.ndarray, owner: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Image (x, y) of canvas positions (rows, cols) inside crops ``owner``; float or int arrays."""
        return self.x0[owner] + rows - self.top[owner], self.y0[owner] + cols - self.left[owner]


@dataclass(frozen=True)
class ColumnRuns:
    """Runs of foreground pixels, one image column each, sorted by crop then column then row.

    Fields (R,) int64: owner (crop index), column (image x), row (image y of the
    run's first pixel), length (pixels).
    """

    owner: np.ndarray
    column: np.ndarray
    row: np.ndarray
    length: np.ndarray

    @classmethod
    def of(cls, atlas: CropAtlas) -> ColumnRuns:
        """The foreground runs of every crop in ``atlas``."""
        flat = atlas.canvas.ravel()
        # The canvas starts and ends with zeros, so changes pair up: run start, run end.
        changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts, ends = changes[0::2], changes[1::2]
        rows, cols = np.divmod(starts, atlas.canvas.shape[1])
        owner = atlas.owner(rows, cols)
        column, row = atlas.to_image(rows, cols, owner)
        order = np.argsort(owner, kind="stable")
        return cls(owner[order], column[order], row[order], (ends - starts)[order])


def rle_strings(runs: ColumnRuns, n: int, image_size: tuple[int, int]) -> list[str]:
    """COCO compressed RLE (ASCII) over the whole image of each of ``n`` crops' runs."""
    height, width = image_size
    total = height * width
    start = runs.column * height + runs.row
    end = start + runs.length
    # A crop spanning the full height continues a run from the bottom of one
    # column into the top of the next: join runs that touch in the image.
    joined = np.zeros(len(start), bool)
    joined[1:] = (runs.owner[1:] == runs.owner[:-1]) & (start[1:] == end[:-1])
    first, last = ~joined, np.ones_like(joined)
    last[:-1] = first[1:]
    owner, start, end = runs.owner[first], start[first], end[last]

    # Crop k's run boundaries [0, s1, e1, ..., sm, em, total] are slots
    # offsets[k] .. offsets[k + 1] - 1; their differences are its counts.
    per_crop = np.bincount(owner, minlength=n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(2 * per_crop + 2, out=offsets[1:])
    boundaries = np.empty(offsets[-1], np.int64)
    boundaries[offsets[:-1]] = 0
    boundaries[offsets[1:] - 1] = total
    rank = np.arange(len(owner)) - (np.cumsum(per_crop) - per_crop)[owner]
    slot = offsets[owner] + 1 + 2 * rank
    boundaries[slot], boundaries[slot + 1] = start, end
    counts = np.diff(boundaries)
    # The last count is dropped when it is zero (a run ends at the last pixel), as pycocotools does.
    stop = offsets[1:] - 1 - (counts[offsets[1:] - 2] == 0)
    uncompressed = [
        {"counts": counts[a:b], "size": [height, width]}
        for a, b in zip(offsets[:-1].tolist(), stop.tolist(), strict=True)
    ]
    compressed = mask_utils.frPyObjects(uncompressed, height, width) if n else []
    return [r["counts"].decode("ascii") for r in compressed]


def measure(runs: ColumnRuns, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area int64 (n,), tight box int32 (n, 4) x0, y0, x1, y1 (exclusive) and centroid float64 (n, 2).

    Empty crops get area 0, box zeros and centroid NaN.
    """
    area = np.bincount(runs.owner, weights=runs.length, minlength=n)
    mask_box = np.zeros((n, 4), np.int32)
    centroid = np.full((n, 2), np.nan)
    if len(runs.owner):
        owners, first = np.unique(runs.owner, return_index=True)
        mask_box[owners, 0] = np.minimum.reduceat(runs.column, first)
        mask_box[owners, 1] = np.minimum.reduceat(runs.row, first)
        mask_box[owners, 2] = np.maximum.reduceat(runs.column, first) + 1
        mask_box[owners, 3] = np.maximum.reduceat(runs.row + runs.length, first)
        # Pixel centres: a run's rows r .. r + length - 1 have mean r + (length - 1) / 2.
        sum_x = np.bincount(runs.owner, weights=runs.length * (runs.column + 0.5), minlength=n)
        sum_y = np.bincount(runs.owner, weights=runs.length * (runs.row + runs.length / 2), minlength=n)
        centroid[owners, 0] = sum_x[owners] / area[owners]
        centroid[owners, 1] = sum_y[owners] / area[owners]
    return area.astype(np.int64), mask_box, centroid


def pixel_edge_grid(canvas: np.ndarray) -> np.ndarray:
    """The closed pixel squares of a uint8 (R, C) mask on a half-pixel grid, uint8 (2R + 1, 2C + 1).

    Cell (2r + 1, 2c + 1) is pixel (r, c); the cells between (even row or
    column) are the pixels' edges and corners, set where any pixel they bound
    is set. Cell (a, b) sits at (b / 2, a / 2) in the mask's coordinates, so
    contours traced through cell centres run along pixel edges.
    """
    rows, cols = canvas.shape
    padded = np.zeros((rows + 2, cols + 2), np.uint8)
    padded[1:-1, 1:-1] = canvas
    vertical_edges = padded[:, :-1] | padded[:, 1:]
    grid = np.empty((2 * rows + 1, 2 * cols + 1), np.uint8)
    grid[1::2, 1::2] = canvas
    grid[1::2, 0::2] = vertical_edges[1:-1]
    grid[0::2, 1::2] = padded[:-1, 1:-1] | padded[1:, 1:-1]
    grid[0::2, 0::2] = vertical_edges[:-1] | vertical_edges[1:]
    return grid


def polygons(atlas: CropAtlas) -> np.ndarray:
    """A valid Polygon or MultiPolygon per crop (object (N,)), in image coordinates.

    OpenCV traces (``RETR_CCOMP``: outer boundaries and their holes) the
    :func:`pixel_edge_grid` of the atlas, so outlines run along pixel edges: a
    pixel becomes a unit square, thin structures keep their width, the polygon
    contains exactly the mask's pixel centres, and its area is the pixel count
    plus 1/8 px^2 per corner that the tracer cuts diagonally (concave corners
    of an outline, convex corners of a hole; pixels that touch only at a
    corner join through a 0.7 px neck). An empty crop gets an empty Polygon.
    """
    n = len(atlas.x0)
    result = np.full(n, Polygon(), object)
    grid = pixel_edge_grid(atlas.canvas)
    contours, hierarchy = cv2.findContours(grid, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return result
    lengths = np.array([len(c) for c in contours])
    points = np.concatenate(contours)[:, 0, :]
    first = np.cumsum(lengths) - lengths
    contour_owner = atlas.owner(points[first, 1] // 2, points[first, 0] // 2)
    image_x, image_y = atlas.to_image(points[:, 1] / 2, points[:, 0] / 2, np.repeat(contour_owner, lengths))
    rings = shapely.linearrings(
        np.stack([image_x, image_y], axis=1), indices=np.repeat(np.arange(len(contours)), lengths)
    )
    # One polygon per outer boundary: its ring as the shell, then its holes' rings.
    parent = hierarchy[0, :, 3]
    outer = parent == -1
    shell = np.where(outer, np.arange(len(contours)), parent)
    order = np.lexsort((~outer, shell))
    shells, polygon_index = np.unique(shell[order], return_inverse=True)
    shapes = shapely.polygons(rings[order], indices=polygon_index)

    # Group each crop's polygons (one per outer boundary) into one geometry.
    shape_owner = contour_owner[shells]
    order = np.argsort(shape_owner, kind="stable")
    shapes, shape_owner = shapes[order], shape_owner[order]
    single = np.bincount(shape_owner, minlength=n)[shape_owner] == 1
    result[shape_owner[single]] = shapes[single]
    if not single.all():
        owners, dense = np.unique(shape_owner[~single], return_inverse=True)
        result[owners] = shapely.multipolygons(shapes[~single], indices=dense)
    return repaired(result)


def repaired(geometries: np.ndarray) -> np.ndarray:
    """``geometries`` (object (N,)) with each invalid one replaced by its polygonal ``make_valid``.

    Outlines traced on the pixel-edge grid come out valid: the grid has no
    one-cell-wide necks, so rings never touch themselves, holes lie strictly
    inside their shell and separate parts are half a pixel apart (no invalid
    case in 40,000 random noisy crops). This guard keeps the output contract
    (valid Polygon or MultiPolygon) should a case ever slip through.
    """
    invalid = ~shapely.is_valid(geometries)
    if invalid.any():
        geometries = geometries.copy()
        broken = geometries[invalid]
        geometries[invalid] = shapely.make_valid(broken, method="structure", keep_collapsed=False)
    return geometries


def encode_crops(
    crops: list[Crop], image_size: tuple[int, int], pixels: np.ndarray | None = None
) -> InstanceColumns:
    """The stored fields of already pasted and thresholded crops, all at once.

    Args:
        crops: N crops of one image.
        image_size: (height, width) of the image.
        pixels: the image's raw values (H, W, C); None leaves the intensity features out.

    Returns:
        :class:`InstanceColumns` of length N with ``rle`` (COCO compressed
        counts, ASCII, over the whole image), ``area`` int64 (pixel count),
        ``centroid_x``/``centroid_y`` float64 (mean pixel centre), ``perimeter``
        float64 (polygon boundary incl. holes, px), ``polygon`` (WKB of a valid
        Polygon or MultiPolygon in image coordinates), the shape features of
        :data:`pipeline.features.SHAPE_FEATURES` (float64), with ``pixels`` the
        intensity features (float64 (N, C) each, as lists per instance), and
        ``_mask_box`` int32 (N, 4), the tight box x0, y0, x1, y1 (exclusive),
        not written. An empty crop gets area 0, an empty polygon and NaN
        centroid and features; the caller decides what to do with it.
    """
    n = len(crops)
    atlas = CropAtlas.pack(crops)
    runs = ColumnRuns.of(atlas)
    area, mask_box, centroid = measure(runs, n)
    geometries = polygons(atlas)
    perimeter = shapely.length(geometries).astype(np.float64)
    columns = InstanceColumns(
        length=n,
        rle=rle_strings(runs, n, image_size),
        area=area,
        centroid_x=centroid[:, 0],
        centroid_y=centroid[:, 1],
        perimeter=perimeter,
        polygon=list(shapely.to_wkb(geometries)),
        _mask_box=mask_box,
    )
    origin = np.stack([atlas.x0, atlas.y0], axis=1)
    for name, values in features.shape_features(runs, atlas, n, origin, area).items():
        columns[name] = values
    if pixels is not None:
        if pixels.shape[:2] != tuple(image_size):
            raise ValueError(f"pixels have shape {pixels.shape}, expected image size {image_size}")
        for name, values in features.intensity_features(runs, n, pixels).items():
            columns[name] = list(values)
    return columns


def compile_kernels() -> None:
    """Compile, or load from Numba's on-disk cache, the feature kernels for the usual pixel types.

    Encodes one small mask with 8-bit, 16-bit and float32 pixels, so that a
    replica pays the compilation (seconds the first time on a machine, about
    0.2 s from the cache) at start-up rather than in its first image.
    """
    crop = Crop(np.ones((3, 3), bool), 1, 1)
    for dtype in (np.uint8, np.uint16, np.float32):
        encode_crops([crop], (5, 5), np.zeros((5, 5, 1), dtype))
