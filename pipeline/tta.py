"""Test-time augmentation: the model sees flipped and transposed views of each image, and the
views' detections of one object are fused into one instance.

Nuclei have no orientation, so a view of an image is as good an input as the
image itself; the model's outputs on the views differ a little, and their
mean follows an object's outline more closely than any one of them (README,
"Test-time augmentation", has the measured gains). :func:`detect_views`
runs the model on each view (a batch per view) and maps the detections back
into the image's frame (:func:`from_view`); :func:`fuse` (run by the
worker's encode threads, so the device does not wait for it) groups them,
one detection per view at most, by box IoU, greedily from the highest score:

* score: the sum of the group's scores over the number of views (a view that
  missed the object adds 0), so an object found by every view at 0.9 scores
  0.9 and one found by a single view of four at 0.9 scores 0.225;
* box: the score-weighted mean of the group's boxes;
* mask: the mean of the group's mask probabilities, each resampled onto the
  fused box (28 x 28 grid cells, bilinear).

Each view runs at :data:`VIEW_SCORE_FLOOR` so that objects the views find at
scores under the run's threshold still count towards the fused score; the
run's threshold applies to the fused score. Costs one forward pass per view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.ops import box_iou

from pipeline.infer import Detections, detect


@dataclass(frozen=True)
class View:
    """One of the eight symmetries of the square: transpose (swap x and y) first, then mirror."""

    transpose: bool = False
    flip_x: bool = False
    flip_y: bool = False


VIEWS: dict[str, tuple[View, ...]] = {
    "none": (View(),),
    "flips": (View(), View(flip_x=True), View(flip_y=True), View(flip_x=True, flip_y=True)),
    "dihedral": tuple(
        View(transpose, flip_x, flip_y)
        for transpose in (False, True)
        for flip_x in (False, True)
        for flip_y in (False, True)
    ),
}
"""The views of each of :data:`pipeline.card.TTA_MODES`; the first is always the image as it is."""


@dataclass(frozen=True)
class ViewDetections:
    """One image's detections from each view, in the image's frame (``per_view[0]`` is the image as
    it is). The worker fuses them where it encodes, off the thread that feeds the device."""

    per_view: tuple[Detections, ...]

    @property
    def plain(self) -> Detections:
        """The detections on the image as it is (scores of one view)."""
        return self.per_view[0]

    def fused(self, *, score_threshold: float, max_detections: int) -> Detections:
        """:func:`fuse` of the views."""
        return fuse(list(self.per_view), score_threshold=score_threshold, max_detections=max_detections)


VIEW_SCORE_FLOOR = 0.05
"""Score threshold of each view's detections when views are fused (torchvision's default)."""

FUSE_IOU = 0.5
"""Box IoU at which two views' detections are taken for one object."""


def to_view(image: torch.Tensor, view: View) -> torch.Tensor:
    """The view of an image (..., H, W): (..., W, H) when transposed."""
    if view.transpose:
        image = image.transpose(-1, -2)
    if view.flip_x:
        image = image.flip(-1)
    if view.flip_y:
        image = image.flip(-2)
    return image


def _mirrored(boxes: torch.Tensor, *, axis: int, extent: int) -> torch.Tensor:
    """Boxes (N, 4) x0, y0, x1, y1 mirrored along x (``axis`` 0) or y (1) in an image ``extent`` px
    wide or high."""
    out = boxes.clone()
    out[:, axis] = extent - boxes[:, axis + 2]
    out[:, axis + 2] = extent - boxes[:, axis]
    return out


def from_view(found: Detections, view: View, size: tuple[int, int]) -> Detections:
    """Detections made on ``to_view(image, view)`` in the frame of the image (``size`` = (H, W))."""
    height, width = size
    view_height, view_width = (width, height) if view.transpose else (height, width)
    boxes, grids = found.boxes, found.mask_probs
    if view.flip_y:
        boxes = _mirrored(boxes, axis=1, extent=view_height)
        grids = grids.flip(-2)
    if view.flip_x:
        boxes = _mirrored(boxes, axis=0, extent=view_width)
        grids = grids.flip(-1)
    if view.transpose:
        boxes = boxes[:, [1, 0, 3, 2]]
        grids = grids.transpose(-1, -2)
    return Detections(boxes=boxes, labels=found.labels, scores=found.scores, mask_probs=grids)


def _groups(iou: np.ndarray, view_of: np.ndarray) -> list[np.ndarray]:
    """Indices (into score-sorted detections) of each object's detections, greedily by score: a
    detection not yet taken starts a group and takes, from each other view, the untaken detection of
    highest IoU >= :data:`FUSE_IOU` with it."""
    taken = np.zeros(len(view_of), bool)
    groups = []
    for seed in range(len(view_of)):
        if taken[seed]:
            continue
        candidates = np.flatnonzero(~taken & (iou[seed] >= FUSE_IOU) & (view_of != view_of[seed]))
        candidates = candidates[np.argsort(-iou[seed, candidates], kind="stable")]
        _, first = np.unique(view_of[candidates], return_index=True)
        members = np.concatenate([[seed], candidates[first]])
        taken[members] = True
        groups.append(members)
    return groups


def _resampled(grids: torch.Tensor, boxes: torch.Tensor, onto: torch.Tensor) -> torch.Tensor:
    """Mask grids (P, M, M) over ``boxes`` (P, 4) sampled at the cell centres of ``onto`` (P, 4)
    boxes (0 outside their own box)."""
    cells = grids.shape[-1]
    centres = (torch.arange(cells, device=grids.device, dtype=grids.dtype) + 0.5) / cells
    xs = onto[:, None, 0] + centres * (onto[:, None, 2] - onto[:, None, 0])
    ys = onto[:, None, 1] + centres * (onto[:, None, 3] - onto[:, None, 1])
    gx = (xs - boxes[:, None, 0]) / (boxes[:, None, 2] - boxes[:, None, 0]).clamp(min=1e-6) * 2 - 1
    gy = (ys - boxes[:, None, 1]) / (boxes[:, None, 3] - boxes[:, None, 1]).clamp(min=1e-6) * 2 - 1
    coords = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)  # (P, M, M, 2)
    return F.grid_sample(grids[:, None], coords, mode="bilinear", align_corners=False)[:, 0]


def detect_views(
    model: MaskRCNN,
    images: list[torch.Tensor],
    views: tuple[View, ...],
    *,
    autocast: torch.dtype | None = None,
    scale: float = 1.0,
) -> list[list[Detections]]:
    """:func:`pipeline.infer.detect` on each view of a same-size batch of images, one batch per
    view; the detections in the images' own frame, indexed [view][image]."""
    sizes = [tuple(image.shape[-2:]) for image in images]
    per_view = []
    for view in views:
        found = detect(model, [to_view(image, view) for image in images], autocast=autocast, scale=scale)
        per_view.append([from_view(d, view, size) for d, size in zip(found, sizes, strict=True)])
    return per_view


def fuse(per_view: list[Detections], *, score_threshold: float, max_detections: int) -> Detections:
    """One image's detections from every view (in the image's frame) fused into one set, sorted by
    descending fused score, those under ``score_threshold`` dropped, at most ``max_detections``.

    The label of a fused detection is that of its highest-scoring member.
    """
    boxes = torch.cat([d.boxes for d in per_view])
    scores = torch.cat([d.scores for d in per_view])
    order = torch.argsort(-scores, stable=True)
    boxes, scores = boxes[order], scores[order]
    labels = torch.cat([d.labels for d in per_view])[order]
    grids = torch.cat([d.mask_probs for d in per_view])[order]
    view_of = np.repeat(np.arange(len(per_view)), [len(d.scores) for d in per_view])[order.cpu().numpy()]
    groups = _groups(box_iou(boxes, boxes).cpu().numpy(), view_of)
    sorted_scores = scores.cpu().numpy()
    group_scores = np.array([sorted_scores[g].sum() for g in groups], dtype=np.float32) / len(per_view)
    ranked = np.argsort(-group_scores, kind="stable")
    chosen = ranked[group_scores[ranked] >= score_threshold][:max_detections]
    if len(chosen) == 0:
        return Detections(boxes=boxes[:0], labels=labels[:0], scores=scores[:0], mask_probs=grids[:0])
    device = boxes.device
    kept = [groups[i] for i in chosen]
    members = torch.as_tensor(np.concatenate(kept), device=device)
    group_of = torch.as_tensor(np.repeat(np.arange(len(kept)), [len(g) for g in kept]), device=device)
    weights = scores[members]
    total = torch.zeros(len(kept), device=device).index_add_(0, group_of, weights)
    weighted = boxes[members] * weights[:, None]
    fused_boxes = torch.zeros(len(kept), 4, device=device).index_add_(0, group_of, weighted) / total[:, None]
    resampled = _resampled(grids[members], boxes[members], fused_boxes[group_of])
    summed = torch.zeros(len(kept), *grids.shape[1:], device=device).index_add_(0, group_of, resampled)
    count = torch.bincount(group_of, minlength=len(kept)).to(summed.dtype)
    return Detections(
        boxes=fused_boxes,
        labels=labels[torch.as_tensor([int(g[0]) for g in kept], device=device)],
        scores=torch.as_tensor(group_scores[chosen], device=device),
        mask_probs=summed / count[:, None, None],
    )
