"""Batched Mask R-CNN inference that stops before torchvision pastes full-size masks.

``MaskRCNN.forward`` ends with ``transform.postprocess``, which pastes every
28 x 28 mask into an H x W canvas. :func:`detect` runs the same components in
the same order (transform, backbone, RPN, ROI heads) and only rescales the
boxes, returning the mask grids; :mod:`pipeline.masks` pastes box-locally.
Boxes, labels, scores and the mask grids are exactly what ``forward`` computes.

An image may be resampled before the network (``scale``, for objects smaller
than the model was trained on): boxes come back in the image's own pixels,
and the mask grids, being box-local, need no change. :func:`automatic_scale`
is the rule that picks the factor from what a first pass at native size found.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.transform import resize_boxes


@dataclass(frozen=True)
class Detections:
    """One image's detections, on the model's device, sorted by descending score.

    boxes: float32 (N, 4) x0, y0, x1, y1 in original-image pixels.
    labels: int64 (N,) in 1..K.
    scores: float32 (N,).
    mask_probs: float32 (N, M, M) mask probabilities inside each box (M = 28).
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor
    mask_probs: torch.Tensor

    def diameters(self, mask_threshold: float, min_score: float = 0.0) -> np.ndarray:
        """float64 (n,) equivalent-circle diameters in px of the detections scoring at least
        ``min_score``, from each mask grid's fraction above ``mask_threshold`` times its box area
        (an estimate: no mask is pasted)."""
        confident = self.scores >= min_score
        boxes, grids = self.boxes[confident], self.mask_probs[confident]
        width = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)
        height = (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
        area = (grids > mask_threshold).float().mean(dim=(1, 2)) * width * height
        return (2 * torch.sqrt(area / torch.pi)).cpu().numpy().astype(np.float64)


UPSCALE_BELOW = 1.5
"""Automatic scale: an image is enlarged when the median diameter found is under this many times the
smallest diameter the model was trained on ..."""
UPSCALE_TO = 2.0
"""... to bring that median to this many times the smallest (rounded to :data:`SCALE_STEP`)."""
SCALE_STEP = 0.5
"""Automatic factors are multiples of this, so images of one size share a few factors and batch."""
MAX_AUTOMATIC_SCALE = 3.0
MIN_OBJECTS_FOR_SCALE = 8
"""Fewer objects than this found at native size: the image stays as is. A few specks on a background
tile look like small nuclei (on validation tiles, 3 to 6 specks set off the rule on 3 of 320)."""


def automatic_scale(diameters: np.ndarray, smallest_trained: float) -> float:
    """The factor to enlarge an image by, from the diameters (px) its objects had at native size.

    1.0 unless at least :data:`MIN_OBJECTS_FOR_SCALE` objects were found and
    their median diameter is under ``UPSCALE_BELOW * smallest_trained``; then
    ``UPSCALE_TO * smallest_trained / median``, to the nearest multiple of
    :data:`SCALE_STEP`, between 1.5 and :data:`MAX_AUTOMATIC_SCALE`. Only
    enlarges: objects somewhat larger than trained on are found at native
    size, and much larger ones break into fragments that look no larger
    (README, "Object size").
    """
    diameters = np.asarray(diameters, dtype=np.float64)
    diameters = diameters[diameters > 0]
    if len(diameters) < MIN_OBJECTS_FOR_SCALE:
        return 1.0
    median = float(np.median(diameters))
    if median >= UPSCALE_BELOW * smallest_trained:
        return 1.0
    factor = round(UPSCALE_TO * smallest_trained / median / SCALE_STEP) * SCALE_STEP
    return float(min(max(factor, 1.5), MAX_AUTOMATIC_SCALE))


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA devices that support it, else fp16 on CUDA; None (no autocast) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.inference_mode()
def detect(
    model: MaskRCNN,
    images: list[torch.Tensor],
    *,
    autocast: torch.dtype | None = None,
    scale: float = 1.0,
) -> list[Detections]:
    """Run ``model`` (eval mode) on float images (3, H, W) in [0, 1] on its device.

    With ``autocast`` set (CUDA), the network runs under ``torch.autocast``;
    outputs are returned as float32. ``scale`` != 1 resamples the images
    (bilinear, antialiased when shrinking; all of one size) before the network;
    boxes are returned in the images' own pixels either way.
    """
    if model.training:
        raise ValueError("detect() needs the model in eval mode")
    original_sizes = [tuple(img.shape[-2:]) for img in images]
    if scale != 1 and images:
        resampled = F.interpolate(
            torch.stack(images),
            scale_factor=scale,
            mode="bilinear",
            align_corners=False,
            antialias=scale < 1,
            recompute_scale_factor=True,  # sample by the output size, as resize_boxes maps back
        )
        images = list(resampled)
    device_type = images[0].device.type if images else "cpu"
    context = (
        torch.autocast(device_type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    )
    with context:
        image_list, _ = model.transform(images)
        features = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, features)
        results, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    out = []
    for result, resized, original in zip(results, image_list.image_sizes, original_sizes, strict=True):
        boxes = resize_boxes(result["boxes"].float(), resized, original)
        out.append(
            Detections(
                boxes=boxes,
                labels=result["labels"],
                scores=result["scores"].float(),
                mask_probs=result["masks"][:, 0].float(),
            )
        )
    return out
