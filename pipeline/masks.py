"""Box-local instance masks: COCO RLE, polygons and measurements.

Mask R-CNN predicts each instance's mask as an M x M (M = 28) grid of
probabilities inside its box. torchvision's post-processing pastes every
grid into a full H x W canvas (``paste_masks_in_image``), and encoding those
canvases costs O(instances x image area). Here every step works inside the
instance's own (expanded, integer) box, so the cost is O(box area):

1. paste: torchvision's arithmetic exactly (``expand_masks`` pads the grid by
   one cell, ``expand_boxes`` scales the box by (M + 2) / M and truncates it
   to integers, bilinear ``F.interpolate`` to the box's size, clipping at the
   image border), then threshold (``probability >= mask_threshold``). Placed in
   a full canvas, the crop equals ``paste_masks_in_image(...)[i, 0] >=
   threshold`` pixel for pixel;
2. RLE: the crop's runs, read in column-major order, are offset into the full
   image's run sequence; ``pycocotools`` compresses the counts;
3. polygon: OpenCV contours of the crop (``RETR_CCOMP``, so holes survive),
   through the centres of boundary pixels, grown by half a pixel (square caps,
   mitred joins) so the outline follows pixel edges; WKB bytes;
4. measurements from the crop's pixels.

Conventions: pixel (row i, column j) covers [j, j + 1) x [i, i + 1) in image
coordinates (x right, y down), so its centre is (j + 0.5, i + 0.5). Boxes are
x0, y0, x1, y1 in those coordinates.

On CUDA, :func:`paste_batched` pastes and thresholds all instances of an
image in one batched gather on the device and copies only the box-sized
crops to the host.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import cv2
import numpy as np
import shapely
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from shapely.geometry import LineString, MultiPolygon, Point, Polygon
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

PASTE_PADDING = 1
"""Cells of zero padding torchvision adds around each mask grid before pasting."""

_EMPTY = np.zeros((0, 0), bool)


@dataclass(frozen=True)
class Crop:
    """One instance's thresholded mask inside the image: ``mask[r, c]`` is pixel (y0 + r, x0 + c).

    ``mask`` is bool (h, w), possibly (0, 0) when the box lies outside the image.
    """

    mask: np.ndarray
    x0: int
    y0: int


@dataclass
class InstanceMasks:
    """Per-instance encodings of one image; every field has length N.

    Fields:
        rle: COCO compressed RLE counts (ASCII str) over the whole image; size is (height, width).
        area: int64, mask pixel count (the truth for area; polygons approximate it).
        mask_box: int32 (N, 4), the mask's tight box x0, y0, x1, y1 (x1, y1 exclusive);
            zeros for an empty mask.
        centroid: float64 (N, 2), mean pixel centre (x, y); NaN for an empty mask.
        perimeter: float64, length in px of the polygon's boundary (exterior and holes).
        polygon: WKB bytes of a valid Polygon or MultiPolygon in image coordinates;
            an empty polygon for an empty mask.
    """

    rle: list[str]
    area: np.ndarray
    mask_box: np.ndarray
    centroid: np.ndarray
    perimeter: np.ndarray
    polygon: list[bytes]

    def __len__(self) -> int:
        return len(self.rle)

    def filter(self, keep: np.ndarray) -> InstanceMasks:
        """The instances where the bool (N,) ``keep`` is true, in order."""
        keep = np.asarray(keep, bool)
        if keep.shape != (len(self),):
            raise ValueError(f"keep has shape {keep.shape}, expected ({len(self)},)")
        index = np.flatnonzero(keep)
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = [value[i] for i in index] if isinstance(value, list) else value[index]
        return InstanceMasks(**out)


def integer_paste_boxes(boxes: torch.Tensor, mask_size: int) -> torch.Tensor:
    """torchvision's pasting boxes: ``boxes`` (N, 4) float scaled by (M+2)/M, truncated to int64."""
    scale = float(mask_size + 2 * PASTE_PADDING) / mask_size
    return expand_boxes(boxes, scale).to(dtype=torch.int64)


def paste(
    probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], threshold: float
) -> list[Crop]:
    """Paste and threshold each instance's mask inside its own box (exact, any device).

    Args:
        probs: (N, M, M) mask probabilities.
        boxes: (N, 4) float boxes x0, y0, x1, y1 in original-image pixels.
        image_size: (height, width) of the original image.
        threshold: a pixel belongs to the instance when its probability is >= this.

    Returns:
        N crops; each is exactly the corresponding window of
        ``paste_masks_in_image(probs[:, None], boxes, image_size)[i, 0] >= threshold``.
    """
    if probs.ndim != 3 or probs.shape[1] != probs.shape[2] or boxes.shape != (len(probs), 4):
        raise ValueError(
            f"expected probs (N, M, M) and boxes (N, 4), got {tuple(probs.shape)} and {tuple(boxes.shape)}"
        )
    height, width = image_size
    padded, _ = expand_masks(probs[:, None], padding=PASTE_PADDING)
    int_boxes = integer_paste_boxes(boxes, probs.shape[-1]).tolist()
    crops = []
    for grid, (bx0, by0, bx1, by1) in zip(padded, int_boxes, strict=True):
        x0, x1 = max(bx0, 0), min(bx1 + 1, width)
        y0, y1 = max(by0, 0), min(by1 + 1, height)
        if x1 <= x0 or y1 <= y0:
            crops.append(Crop(_EMPTY, max(min(x0, width), 0), max(min(y0, height), 0)))
            continue
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        local = F.interpolate(grid[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        window = local[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] >= threshold
        crops.append(Crop(window.cpu().numpy(), x0, y0))
    return crops


def _source_index(out_size: torch.Tensor, in_size: int, length: int) -> tuple[torch.Tensor, ...]:
    """Bilinear (align_corners=False) source rows for outputs 0..length-1 of each size.

    Returns (lower index, upper index, upper weight), each (N, length), as
    ``F.interpolate`` computes them: src = max((dst + 0.5) * in / out - 0.5, 0).
    """
    dst = torch.arange(length, device=out_size.device, dtype=torch.float32)
    # A true division, as F.interpolate does; ``in_size / tensor`` would multiply
    # by a reciprocal and differ in the last bit.
    scale = torch.full_like(out_size, in_size, dtype=torch.float32) / out_size.to(torch.float32)
    src = ((dst[None] + 0.5) * scale[:, None] - 0.5).clamp(min=0)
    lower = src.to(torch.int64).clamp(max=in_size - 1)
    upper = (lower + 1).clamp(max=in_size - 1)
    return lower, upper, (src - lower).clamp(0, 1)


def paste_batched(
    probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], threshold: float
) -> list[Crop]:
    """:func:`paste` for all instances at once on the tensors' device (meant for CUDA).

    The N masks are resampled on one (N, Hmax, Wmax) grid padded to the largest
    box, thresholded, and only the in-image box pixels (sum of crop areas,
    uint8) are copied to the host. Bilinear weights follow ``F.interpolate``'s
    formula; where a probability lies within float rounding of ``threshold``
    a pixel may differ from :func:`paste` (tested to be the only difference).
    """
    n, m = probs.shape[0], probs.shape[-1]
    height, width = image_size
    if n == 0:
        return []
    padded, _ = expand_masks(probs[:, None], padding=PASTE_PADDING)
    padded = padded[:, 0].float()
    int_boxes = integer_paste_boxes(boxes, m)
    sizes_w = (int_boxes[:, 2] - int_boxes[:, 0] + 1).clamp(min=1)
    sizes_h = (int_boxes[:, 3] - int_boxes[:, 1] + 1).clamp(min=1)
    x0 = int_boxes[:, 0].clamp(min=0, max=width)
    y0 = int_boxes[:, 1].clamp(min=0, max=height)
    x1 = torch.maximum((int_boxes[:, 2] + 1).clamp(max=width), x0)
    y1 = torch.maximum((int_boxes[:, 3] + 1).clamp(max=height), y0)
    crop_w, crop_h = x1 - x0, y1 - y0
    max_w, max_h = int(crop_w.max()), int(crop_h.max())

    # Output pixel (r, c) of crop i is pixel (y0 + r - by0, x0 + c - bx0) of the pasted box.
    offset_y, offset_x = y0 - int_boxes[:, 1], x0 - int_boxes[:, 0]
    full_h = int((offset_y + max_h).max().clamp(min=1))
    full_w = int((offset_x + max_w).max().clamp(min=1))
    ry0, ry1, wy = _source_index(sizes_h, m + 2 * PASTE_PADDING, max(full_h, 1))
    rx0, rx1, wx = _source_index(sizes_w, m + 2 * PASTE_PADDING, max(full_w, 1))
    rows = offset_y[:, None] + torch.arange(max_h, device=probs.device)[None]
    cols = offset_x[:, None] + torch.arange(max_w, device=probs.device)[None]
    rows = rows.clamp(min=0, max=max(full_h - 1, 0))
    cols = cols.clamp(min=0, max=max(full_w - 1, 0))

    def gather(r_index, c_index):
        r = torch.gather(r_index, 1, rows)[:, :, None].expand(-1, -1, max_w)
        c = torch.gather(c_index, 1, cols)[:, None, :].expand(-1, max_h, -1)
        return padded[torch.arange(n, device=probs.device)[:, None, None], r, c]

    wy_c = torch.gather(wy, 1, rows)[:, :, None]
    wx_c = torch.gather(wx, 1, cols)[:, None, :]
    top = gather(ry0, rx0) * (1 - wx_c) + gather(ry0, rx1) * wx_c
    bottom = gather(ry1, rx0) * (1 - wx_c) + gather(ry1, rx1) * wx_c
    values = top * (1 - wy_c) + bottom * wy_c
    inside = (torch.arange(max_h, device=probs.device)[None, :, None] < crop_h[:, None, None]) & (
        torch.arange(max_w, device=probs.device)[None, None, :] < crop_w[:, None, None]
    )
    flat = (values >= threshold)[inside].to(torch.uint8).cpu().numpy()
    sizes = (crop_h * crop_w).tolist()
    crops, start = [], 0
    for i, (h, w) in enumerate(zip(crop_h.tolist(), crop_w.tolist(), strict=True)):
        mask = flat[start : start + sizes[i]].reshape(h, w).astype(bool) if h and w else _EMPTY
        crops.append(Crop(mask, int(x0[i]), int(y0[i])))
        start += sizes[i]
    return crops


def rle_counts(crop: Crop, image_size: tuple[int, int]) -> list[int]:
    """Uncompressed COCO RLE counts of ``crop`` over the whole image (column-major, zeros first)."""
    height, width = image_size
    h, w = crop.mask.shape
    if h == 0 or w == 0 or not crop.mask.any():
        return [height * width]
    # Column-major walk over the crop with one zero appended per column, so that
    # runs never join across columns unless the crop spans the full height
    # (then consecutive columns are adjacent in the full image too).
    spans_height = h == height
    stride = h if spans_height else h + 1
    walk = np.zeros((w, stride), np.int8)
    walk[:, :h] = crop.mask.T
    walk = walk.ravel()
    edges = np.diff(walk, prepend=0, append=0)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)

    def to_image_index(pos: np.ndarray) -> np.ndarray:
        column, row = np.divmod(pos, stride)
        return (crop.x0 + column) * height + crop.y0 + row

    if spans_height:
        run_starts = to_image_index(starts)
        run_ends = run_starts + (ends - starts)
    else:
        run_starts, run_ends = to_image_index(starts), to_image_index(ends - 1) + 1
    boundaries = np.empty(2 * len(run_starts) + 2, np.int64)
    boundaries[0], boundaries[-1] = 0, height * width
    boundaries[1:-1:2], boundaries[2:-1:2] = run_starts, run_ends
    counts = np.diff(boundaries)
    if counts[-1] == 0:
        counts = counts[:-1]
    return counts.tolist()


def _ring_geometry(points: np.ndarray):
    """A contour (K, 2) of pixel centres as a Polygon, LineString or Point."""
    if len(points) >= 3:
        return Polygon(points)
    if len(points) == 2:
        return LineString(points)
    return Point(points[0])


def polygon_from_crop(crop: Crop):
    """Polygon or MultiPolygon (valid) of the crop's pixels, in image coordinates.

    Contours (OpenCV ``RETR_CCOMP``: outer boundaries and their holes) pass
    through boundary pixel centres; growing them by 0.5 px with square caps and
    mitred joins puts the outline on pixel edges, so one pixel becomes a unit
    square and thin structures keep their width.
    """
    if crop.mask.size == 0 or not crop.mask.any():
        return Polygon()
    padded = np.pad(crop.mask.astype(np.uint8), 1)
    contours, hierarchy = cv2.findContours(padded, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    offset = np.array([crop.x0 - 1 + 0.5, crop.y0 - 1 + 0.5])
    parts = []
    for index, contour in enumerate(contours):
        if hierarchy[0, index, 3] != -1:
            continue
        outer = _ring_geometry(contour[:, 0, :] + offset)
        holes = []
        child = hierarchy[0, index, 2]
        while child != -1:
            ring = contours[child][:, 0, :] + offset
            if len(ring) >= 3:
                holes.append(Polygon(ring))
            child = hierarchy[0, child, 0]
        if isinstance(outer, Polygon) and not outer.is_valid:
            outer = shapely.make_valid(outer)
        grown = outer.buffer(0.5, cap_style="square", join_style="mitre")
        for hole in holes:
            # The hole ring runs through foreground pixel centres around the hole;
            # shrinking it by 0.5 px puts it on the hole's pixel edges.
            shrunk = shapely.make_valid(hole).buffer(-0.5, join_style="mitre")
            if not shrunk.is_empty:
                grown = grown.difference(shrunk)
        parts.append(grown)
    geometry = shapely.union_all(parts)
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
    polygons = [g for g in getattr(geometry, "geoms", [geometry]) if isinstance(g, (Polygon, MultiPolygon))]
    flat = [p for g in polygons for p in getattr(g, "geoms", [g]) if not p.is_empty]
    if len(flat) == 1:
        return flat[0]
    return MultiPolygon(flat)


def encode(
    probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], threshold: float
) -> InstanceMasks:
    """Everything the output stores about N instances' masks, box-locally.

    Args:
        probs: (N, M, M) mask probabilities on any device (CUDA uses :func:`paste_batched`).
        boxes: (N, 4) float boxes x0, y0, x1, y1 in original-image pixels.
        image_size: (height, width) of the original image.
        threshold: mask threshold (probability >= threshold is inside).

    Instances whose mask is empty after thresholding are kept here (area 0,
    empty polygon, NaN centroid); the caller decides (the segment job drops them).
    """
    return encode_crops(paste_on_device(probs, boxes, image_size, threshold), image_size)


def paste_on_device(
    probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], threshold: float
) -> list[Crop]:
    """:func:`paste_batched` for CUDA tensors, the exact :func:`paste` otherwise."""
    paste_fn = paste_batched if probs.is_cuda else paste
    return paste_fn(probs, boxes, image_size, threshold)


def encode_crops(crops: list[Crop], image_size: tuple[int, int]) -> InstanceMasks:
    """:class:`InstanceMasks` of already pasted and thresholded crops."""
    height, width = image_size
    n = len(crops)
    area = np.zeros(n, np.int64)
    mask_box = np.zeros((n, 4), np.int32)
    centroid = np.full((n, 2), np.nan)
    perimeter = np.zeros(n)
    polygons, uncompressed = [], []
    for i, crop in enumerate(crops):
        uncompressed.append({"counts": rle_counts(crop, image_size), "size": [height, width]})
        pixels = int(crop.mask.sum())
        area[i] = pixels
        if pixels:
            rows, cols = np.nonzero(crop.mask)
            mask_box[i] = (
                crop.x0 + cols.min(),
                crop.y0 + rows.min(),
                crop.x0 + cols.max() + 1,
                crop.y0 + rows.max() + 1,
            )
            centroid[i] = (crop.x0 + cols.mean() + 0.5, crop.y0 + rows.mean() + 0.5)
        geometry = polygon_from_crop(crop)
        perimeter[i] = geometry.length
        polygons.append(shapely.to_wkb(geometry))
    compressed = mask_utils.frPyObjects(uncompressed, height, width) if n else []
    rle = [r["counts"].decode("ascii") for r in compressed]
    return InstanceMasks(rle, area, mask_box, centroid, perimeter, polygons)
