"""Benchmarks measured as ratios against a reference run side by side in one process.

``masks``: torchvision's full-canvas route (``paste_masks_in_image``, threshold,
``pycocotools.mask.encode`` of full masks, ``cv2.findContours`` on full masks)
against :func:`pipeline.masks.encode` on the same inputs, asserting identical
RLE strings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from pipeline import masks

MASK_CASES = ((1024, 50), (1024, 200), (1024, 500), (2048, 500))
"""(image side in px, instances) of the ``masks`` benchmark."""

REFERENCE_CHUNK = 50
"""Instances the reference pastes at once: bounds its memory (500 x 2048^2 floats is 8 GB)."""


def synthetic_detections(size: int, count: int, seed: int = 0, device: str = "cpu"):
    """Cell-like mask grids (count, 28, 28) and boxes (count, 4) of 10-40 px on a size x size image."""
    rng = np.random.default_rng([seed, size, count])
    yy, xx = np.mgrid[0:28, 0:28] - 13.5
    radius = rng.uniform(6, 12, (count, 1, 1))
    blobs = 1 / (1 + np.exp((np.sqrt(yy**2 + xx**2) - radius) * 0.8))
    probs = np.clip(blobs + rng.normal(0, 0.08, blobs.shape), 0, 1)
    xy = rng.uniform(0, size - 40, (count, 2))
    wh = rng.uniform(10, 40, (count, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    return (
        torch.tensor(probs, dtype=torch.float32, device=device),
        torch.tensor(boxes, dtype=torch.float32, device=device),
    )


def reference_encode(probs: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], threshold: float):
    """The usual route: full canvases, thresholded, encoded and traced. Returns RLE strings."""
    rles = []
    for start in range(0, len(probs), REFERENCE_CHUNK):
        chunk = slice(start, start + REFERENCE_CHUNK)
        full = paste_masks_in_image(probs[chunk, None], boxes[chunk], size)[:, 0] >= threshold
        binary = full.cpu().numpy().astype(np.uint8)
        encoded = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        rles.extend(r["counts"].decode("ascii") for r in encoded)
        for mask in binary:
            cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return rles


def _best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_masks(
    cases=MASK_CASES, *, device: str = "cpu", threshold: float = 0.5, repeats: int = 3
) -> list[dict[str, float]]:
    """Time per image of the reference and of :func:`pipeline.masks.encode` for each case.

    Raises AssertionError if any RLE string differs between the two.
    """
    results = []
    for size, count in cases:
        probs, boxes = synthetic_detections(size, count, device=device)
        image_size = (size, size)
        args = (probs, boxes, image_size, threshold)
        reference_s, reference = _best_of(partial(reference_encode, *args), max(1, repeats // 3))
        pipeline_s, ours = _best_of(partial(masks.encode, *args), repeats)
        if reference != ours.rle:
            differing = sum(a != b for a, b in zip(reference, ours.rle, strict=True))
            raise AssertionError(f"{differing} of {count} RLE strings differ at {size}^2")
        results.append(
            {
                "size": size,
                "instances": count,
                "device": device,
                "reference_s": round(reference_s, 4),
                "pipeline_s": round(pipeline_s, 4),
                "speedup": round(reference_s / pipeline_s, 1),
            }
        )
    return results
