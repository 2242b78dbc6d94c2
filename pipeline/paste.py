"""Box-local paste of Mask R-CNN's mask grids, on the tensors' device (step 1 of :mod:`pipeline.masks`).

Mask R-CNN predicts each instance's mask as an M x M (M = 28) grid of
probabilities inside its box. Two conventions place the grid in the image
(the model card's ``mask_paste``, :data:`pipeline.card.MASK_PASTES`):

- ``torchvision``: :func:`paste` does torchvision's arithmetic exactly
  (``expand_masks`` pads the grid by one cell, ``expand_boxes`` scales the box
  by (M + 2) / M and truncates it to integers, bilinear ``F.interpolate`` to
  the box's size, clipping at the image border), then thresholds
  (``probability >= mask_threshold``), inside the instance's own box only.
  Placed in a full canvas, a crop equals ``paste_masks_in_image(...)[i, 0] >=
  threshold`` pixel for pixel. That arithmetic takes the box's corners as
  pixel indices (Detectron's "+ 1" widths), while boxes are continuous
  coordinates (x1 is the right edge of the last pixel, as COCO's and the
  training targets' are), so every mask comes out about a pixel wider and
  taller than its box: +30% area on a nucleus 7 px across. On CUDA,
  :func:`paste_batched` does the same for all instances of an image in one
  batched gather and copies only the box-sized crops to the host.
- ``continuous``: :func:`paste_continuous` samples the grid at every pixel
  centre (x + 0.5, y + 0.5) taken in the box's continuous coordinates
  (bilinear, zero outside the grid: ``F.grid_sample`` with
  ``align_corners=False``, Detectron2's paste), in batches on any device,
  inside the pixels near the box only. Placed in a full canvas, a crop equals
  the same ``grid_sample`` over the whole image, thresholded.

The crops then go to :func:`pipeline.masks.encode_crops` (RLE, polygon,
measurements), which needs no torch: the analysis jobs (evaluate, export)
start without importing it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

from pipeline.card import MASK_PASTES
from pipeline.columns import InstanceColumns
from pipeline.masks import Crop, encode_crops

PASTE_PADDING = 1
"""Cells of zero padding torchvision adds around each mask grid before pasting."""

_EMPTY = np.zeros((0, 0), bool)


def _check_shapes(probs: torch.Tensor, boxes: torch.Tensor) -> None:
    if probs.ndim != 3 or probs.shape[1] != probs.shape[2] or boxes.shape != (len(probs), 4):
        raise ValueError(
            f"expected probs (N, M, M) and boxes (N, 4), got {tuple(probs.shape)} and {tuple(boxes.shape)}"
        )


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
    _check_shapes(probs, boxes)
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
        # NumPy compares float32 with a Python float in float32, as torch does.
        window = local.cpu().numpy()[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] >= threshold
        crops.append(Crop(window, x0, y0))
    return crops


CONTINUOUS_BATCH_PIXELS = 1 << 22
"""Most sampled pixels (instances x the largest crop of the batch) :func:`paste_continuous` computes in
one ``grid_sample`` call; instances go in by crop size, so a batch's crops are alike."""


def continuous_crop_bounds(boxes: torch.Tensor, mask_size: int, image_size: tuple[int, int]) -> torch.Tensor:
    """The pixels :func:`paste_continuous` samples for each box: (N, 4) int64 x0, y0, x1, y1 (end
    exclusive), clipped to the image.

    A pixel can take a non-zero probability only where its centre lies within half a grid cell of
    the box (bilinear weights reach one cell beyond the grid's outer cell centres); one pixel more
    on each side leaves room for rounding.
    """
    height, width = image_size
    half_cell = (boxes[:, 2:] - boxes[:, :2]) / (2 * mask_size)
    low = torch.floor(boxes[:, :2] - half_cell - 0.5)
    high = torch.ceil(boxes[:, 2:] + half_cell + 0.5)
    limit = torch.tensor([width, height], device=boxes.device, dtype=boxes.dtype)
    low = torch.minimum(low.clamp(min=0), limit)
    high = torch.maximum(torch.minimum(high, limit), low)
    return torch.cat([low, high], dim=1).to(torch.int64)


def continuous_sample_points(boxes: torch.Tensor, first: torch.Tensor, count: int) -> torch.Tensor:
    """``grid_sample`` coordinates along one axis: (N, count) float32.

    ``boxes`` (N, 2) float32 start and end of each box on the axis, ``first`` (N,) int64 the first
    pixel; pixel ``first + k`` has its centre at ``first + k + 0.5``, which maps to
    ``(centre - start) / (end - start) * 2 - 1`` (-1 and 1 are the box's edges).
    """
    centres = (first[:, None] + torch.arange(count, device=boxes.device)[None]).to(torch.float32) + 0.5
    start, end = boxes[:, :1], boxes[:, 1:]
    return (centres - start) / (end - start) * 2 - 1


def paste_continuous(
    probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], threshold: float
) -> list[Crop]:
    """Paste and threshold each instance's mask at its box's continuous coordinates (any device).

    Args:
        probs: (N, M, M) mask probabilities.
        boxes: (N, 4) float boxes x0, y0, x1, y1 in original-image pixels, x1 > x0 and y1 > y0.
        image_size: (height, width) of the original image.
        threshold: a pixel belongs to the instance when its probability is >= this (> 0: pixels
            beyond :func:`continuous_crop_bounds` sample zero).

    Returns:
        N crops over :func:`continuous_crop_bounds`; crop i is exactly that window of
        ``F.grid_sample(probs[i], grid of every pixel centre mapped by
        continuous_sample_points, align_corners=False) >= threshold`` over the whole image.
    """
    _check_shapes(probs, boxes)
    n, m = probs.shape[0], probs.shape[-1]
    if n == 0:
        return []
    boxes = boxes.to(torch.float32)
    bounds = continuous_crop_bounds(boxes, m, image_size)
    x0, y0, x1, y1 = (column.tolist() for column in bounds.cpu().unbind(1))
    heights = [b - a for a, b in zip(y0, y1, strict=True)]
    widths = [b - a for a, b in zip(x0, x1, strict=True)]
    crops: list[Crop] = [Crop(_EMPTY, x0[i], y0[i]) for i in range(n)]
    for batch, h, w in _batches_by_size(heights, widths):
        index = torch.tensor(batch, device=probs.device)
        chosen = boxes[index]
        along_x = continuous_sample_points(chosen[:, 0::2], bounds[index, 0], w)
        along_y = continuous_sample_points(chosen[:, 1::2], bounds[index, 1], h)
        grid = torch.stack(
            [along_x[:, None, :].expand(-1, h, -1), along_y[:, :, None].expand(-1, -1, w)], dim=-1
        )
        grids = probs[index, None].to(torch.float32)
        sampled = F.grid_sample(grids, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        inside = (sampled[:, 0] >= threshold).cpu().numpy()
        for k, i in enumerate(batch):
            crops[i] = Crop(inside[k, : heights[i], : widths[i]], x0[i], y0[i])
    return crops


def _batches_by_size(heights: list[int], widths: list[int]) -> list[tuple[list[int], int, int]]:
    """Non-empty crops in batches (indices, largest height, largest width), smallest crops first, each
    batch's len x height x width at most :data:`CONTINUOUS_BATCH_PIXELS` (or one crop)."""
    batches: list[tuple[list[int], int, int]] = []
    non_empty = [i for i in range(len(heights)) if heights[i] and widths[i]]
    for i in sorted(non_empty, key=lambda i: heights[i] * widths[i]):
        if batches:
            batch, h, w = batches[-1]
            grown_h, grown_w = max(h, heights[i]), max(w, widths[i])
            if (len(batch) + 1) * grown_h * grown_w <= CONTINUOUS_BATCH_PIXELS:
                batch.append(i)
                batches[-1] = (batch, grown_h, grown_w)
                continue
        batches.append(([i], heights[i], widths[i]))
    return batches


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


def encode(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float,
    pixels: np.ndarray | None = None,
    convention: str = "torchvision",
) -> InstanceColumns:
    """Everything the output stores about N instances' masks, box-locally (see :func:`encode_crops`).

    Args:
        probs: (N, M, M) mask probabilities on any device (CUDA uses :func:`paste_batched`).
        boxes: (N, 4) float boxes x0, y0, x1, y1 in original-image pixels.
        image_size: (height, width) of the original image.
        threshold: mask threshold (probability >= threshold is inside).
        pixels: the raw image (H, W, C) for the intensity features, or None.
        convention: the model card's ``mask_paste`` (:func:`paste_on_device`).
    """
    return encode_crops(paste_on_device(probs, boxes, image_size, threshold, convention), image_size, pixels)


def paste_on_device(
    probs: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float,
    convention: str = "torchvision",
) -> list[Crop]:
    """The crops of ``convention`` (:data:`pipeline.card.MASK_PASTES`): :func:`paste_continuous` on
    any device; for ``torchvision``, :func:`paste_batched` on CUDA tensors and the exact :func:`paste`
    otherwise."""
    if convention == "continuous":
        return paste_continuous(probs, boxes, image_size, threshold)
    if convention != "torchvision":
        raise ValueError(f"unknown mask paste {convention!r}; one of {MASK_PASTES}")
    paste_fn = paste_batched if probs.is_cuda else paste
    return paste_fn(probs, boxes, image_size, threshold)
