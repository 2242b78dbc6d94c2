"""Batched Mask R-CNN inference that stops before torchvision pastes full-size masks.

``MaskRCNN.forward`` ends with ``transform.postprocess``, which pastes every
28 x 28 mask into an H x W canvas. :func:`detect` runs the same components in
the same order (transform, backbone, RPN, ROI heads) and only rescales the
boxes, returning the mask grids; :mod:`pipeline.masks` pastes box-locally.
Boxes, labels, scores and the mask grids are exactly what ``forward`` computes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA devices that support it, else fp16 on CUDA; None (no autocast) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.inference_mode()
def detect(
    model: MaskRCNN, images: list[torch.Tensor], *, autocast: torch.dtype | None = None
) -> list[Detections]:
    """Run ``model`` (eval mode) on float images (3, H, W) in [0, 1] on its device.

    With ``autocast`` set (CUDA), the network runs under ``torch.autocast``;
    outputs are returned as float32.
    """
    if model.training:
        raise ValueError("detect() needs the model in eval mode")
    original_sizes = [tuple(img.shape[-2:]) for img in images]
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
