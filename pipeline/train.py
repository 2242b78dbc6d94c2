"""Train or fine-tune a torchvision Mask R-CNN on a COCO-annotated image folder.

Recipe: AdamW, linear warm-up then cosine decay, gradient clipping, batches
sampled with replacement and built ahead on threads while the model trains
(:data:`PREFETCH_BATCHES`); on CPU, RoIAlign's backward is
:mod:`pipeline.roi_align_grad`'s. Images are decoded in their native bit depth and
prepared by the model card's preprocessing (:func:`pipeline.preprocess.model_input`,
the function inference uses), then augmented: flips, 90-degree rotations,
scale jitter, gamma, contrast, blur and noise. Pixel coordinates are
continuous throughout, as inference pastes them (``mask_paste: continuous``):
scale jitter resizes masks at pixel centres like the image, and each mask
target is sampled at its box's continuous coordinates
(:func:`aligned_mask_targets`). Every step draws its
randomness from ``(seed, step)``, so an interrupted run resumed from its
training state continues exactly as it would have (to float rounding when it
resumes on another device: ``device`` is the one field a resume may change).

Fine-tuning: with ``init`` set, the initial model's backbone, FPN and RPN are
kept; when its classes differ from the dataset's, the box and mask predictors
are replaced by new ones of the right size (the standard recipe).

Files: the result goes to ``output`` (a checkpoint, see :mod:`pipeline.model`);
``output + ".train-state"`` holds model, optimiser and step, written atomically
every ``checkpoint_every`` steps and removed when training completes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection import roi_heads
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops import roi_align
from tqdm import tqdm

from pipeline.concurrency import bounded_map
from pipeline.decode import DecodeError, decode_image
from pipeline.model import (
    ModelCard,
    build_model,
    configure,
    resolve_model,
    save_checkpoint,
)
from pipeline.preprocess import Preprocessing, model_input
from pipeline.roi_align_grad import faster_backward

PREFETCH_BATCHES = 4
"""Batches built ahead of the step that uses them, each on a thread of its own (decoding, OpenCV and
most NumPy work release the GIL). A batch of four 256-px tiles takes 50-60 ms of one CPU core to
build (BENCHMARKS.md, "Training"): built in line, a GPU whose step is shorter would wait for it."""

TRAINED_MASK_PASTE = "continuous"
"""The card's ``mask_paste`` for a model trained here: its target boxes are COCO's, continuous
coordinates with x1 the right edge of the last pixel, and its mask targets are sampled in those
(:func:`aligned_mask_targets`), so its mask grids are pasted in those (README, "How masks are
pasted")."""

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (stored in the training state and card)."""

    images: str
    annotations: str
    output: str
    init: str | None = None
    init_weights: str | None = None
    arch: str = "maskrcnn_resnet18_fpn_lite"
    input_size: str | None = None
    steps: int = 1500
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 100
    half: bool = False
    name: str = "custom"
    channel: str | int = "max"
    normalize: str = "percentile"

    @property
    def preprocessing(self) -> Preprocessing:
        """The preprocessing the model is trained with and its card carries."""
        return Preprocessing(channel=self.channel, normalize=self.normalize)


class CocoTiles:
    """Images and instance targets from a COCO instances file.

    ``sample(i, rng)`` returns an augmented ``(image, target)`` pair: image
    float32 (3, H, W) in [0, 1] (the model card's preprocessing, then
    augmentation); target ``boxes`` float32 (N, 4) xyxy pixels, ``labels``
    int64 (N,), ``masks`` uint8 (N, H, W).
    """

    def __init__(self, images: str | Path, annotations: str | Path, preprocessing: Preprocessing):
        coco = json.loads(Path(annotations).read_text())
        self.root = Path(images)
        self.preprocessing = preprocessing
        self.images = coco["images"]
        self.classes = tuple(c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"]))
        ids = [c["id"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
        if ids != list(range(1, len(ids) + 1)):
            raise ValueError(f"category ids must be 1..K, got {ids}")
        self.annotations: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in coco["annotations"]:
            self.annotations[ann["image_id"]].append(ann)

    def __len__(self) -> int:
        return len(self.images)

    def object_diameter_px(self) -> tuple[float, float] | None:
        """The card's ``object_diameter_px``: :func:`diameter_range` of the annotations' areas."""
        return diameter_range([a["area"] for anns in self.annotations.values() for a in anns])

    def model_input(self, index: int) -> np.ndarray:
        """Image ``index`` as the model sees it before augmentation: float32 (H, W, C), C 1 or 3."""
        path = self.root / self.images[index]["file_name"]
        raw = decode_image(path.read_bytes(), max_pixels=2**40)
        if isinstance(raw, DecodeError):
            raise OSError(f"cannot read training image {path}: {raw.kind}: {raw.message}")
        prepared = model_input(raw.pixels, self.preprocessing, channel_names=raw.channel_names)
        return prepared.transpose(1, 2, 0)

    def sample(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        info = self.images[index]
        image = self.model_input(index)
        anns = self.annotations[info["id"]]
        h, w = image.shape[:2]
        if anns:
            masks = np.moveaxis(mask_utils.decode([a["segmentation"] for a in anns]), -1, 0)
        else:
            masks = np.zeros((0, h, w), np.uint8)
        labels = np.array([a["category_id"] for a in anns], np.int64)
        image, masks = augment(image, masks, rng)
        keep = masks.any(axis=(1, 2))
        masks, labels = np.ascontiguousarray(masks[keep]), labels[keep]
        target = {
            "boxes": torch.from_numpy(boxes_from_masks(masks)),
            "labels": torch.from_numpy(labels),
            "masks": torch.from_numpy(masks),
        }
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        return tensor.expand(3, -1, -1), target


def diameter_range(areas) -> tuple[float, float] | None:
    """2nd and 98th percentiles (px, to 0.1) of the equivalent-circle diameters of objects of these
    areas (px²): the objects' size range without the few cut by a tile's edge; None if no object."""
    areas = np.asarray(areas, dtype=np.float64)
    if not len(areas):
        return None
    low, high = np.percentile(2 * np.sqrt(areas / np.pi), [2, 98])
    return round(float(low), 1), round(float(high), 1)


def augment(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Geometry and appearance augmentation of a prepared image (H, W, C) in [0, 1] and masks (N, H, W).

    Flips and 90-degree rotations; scale jitter 0.7-1.4x (:func:`resized`: image bilinear,
    masks nearest, both at pixel centres); gamma 0.6-1.6; contrast (gain 0.7-1.3, offset +-0.05);
    Gaussian blur (sigma 0.3-1.5, 30% of samples); Gaussian noise (sigma up to
    0.04, 30% of samples); colour JPEG compression (quality 30-95, one
    channel tinted first, 25% of samples: scanners store slides as JPEG
    tiles, whose chroma blocks on dark glass a model never shown them takes
    for nuclei). The result is clipped to [0, 1].
    """
    if rng.random() < 0.5:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    if rng.random() < 0.5:
        image, masks = image[::-1], masks[:, ::-1]
    k = int(rng.integers(4))
    image, masks = np.rot90(image, k, (0, 1)), np.rot90(masks, k, (1, 2))
    scale = math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
    h, w = image.shape[:2]
    image, masks = resized(image, masks, (max(round(w * scale), 32), max(round(h * scale), 32)))
    gamma, gain, offset = rng.uniform(0.6, 1.6), rng.uniform(0.7, 1.3), rng.uniform(-0.05, 0.05)
    image = np.clip(image, 0, 1) ** gamma * gain + offset
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 1.5)).reshape(image.shape)
    if rng.random() < 0.3:
        image = image + rng.normal(0, rng.uniform(0, 0.04), image.shape)
    image = np.clip(image, 0, 1).astype(np.float32)
    if rng.random() < 0.25:
        tint = np.array([rng.uniform(0, 0.6), rng.uniform(0, 0.6), 1.0], np.float32)[rng.permutation(3)]
        # (the largest entry is 1: a stain's own channel keeps its values)
        image = jpeg_roundtrip(image, int(rng.integers(30, 96)), tint)
    return image, masks


def resized(image: np.ndarray, masks: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """An image (H, W, C) and its masks (N, H, W) resampled to ``size`` (width, height), both with
    pixel (x, y) centred at (x + 0.5, y + 0.5): the image bilinear, the masks nearest
    (``cv2.INTER_NEAREST_EXACT``; plain ``INTER_NEAREST`` samples ``floor(x / scale)`` and moves
    the masks 0.5-0.7 px right and down of the image at scales 0.7-1.4)."""
    width, height = size
    image = cv2.resize(np.ascontiguousarray(image), size, interpolation=cv2.INTER_LINEAR)
    nearest = [
        cv2.resize(np.ascontiguousarray(m), size, interpolation=cv2.INTER_NEAREST_EXACT) for m in masks
    ]
    masks = np.stack(nearest) if nearest else np.zeros((0, height, width), np.uint8)
    return image.reshape(height, width, -1), masks


def mask_targets_at_continuous_coordinates(
    gt_masks: torch.Tensor, boxes: torch.Tensor, matched_idxs: torch.Tensor, mask_size: int
) -> torch.Tensor:
    """Mask R-CNN's mask targets (P, M, M): each matched ground-truth mask (of ``gt_masks`` (G, H, W))
    sampled at the M x M cell centres of its proposal box (P, 4), in continuous coordinates
    (``roi_align(..., aligned=True)``, Detectron2's targets). torchvision's
    ``project_masks_on_boxes`` uses ``aligned=False``, which samples half a pixel right and down of
    the cell centres, so a model learns grids whose content lies half a pixel off its box."""
    rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
    return roi_align(gt_masks[:, None].to(rois), rois, (mask_size, mask_size), 1.0, aligned=True)[:, 0]


@contextlib.contextmanager
def aligned_mask_targets():
    """While it lasts, torchvision's Mask R-CNN loss takes its mask targets from
    :func:`mask_targets_at_continuous_coordinates` (``roi_heads.project_masks_on_boxes``, which
    ``maskrcnn_loss`` calls, is replaced, then restored)."""
    original = roi_heads.project_masks_on_boxes
    roi_heads.project_masks_on_boxes = mask_targets_at_continuous_coordinates
    try:
        yield
    finally:
        roi_heads.project_masks_on_boxes = original


def jpeg_roundtrip(image: np.ndarray, quality: int, tint: np.ndarray) -> np.ndarray:
    """``image`` (H, W, C) float32 in [0, 1], C 1 or 3, stored as an 8-bit colour JPEG of ``quality``
    (4:2:0 chroma, as scanners store RGB slides) and read back; one channel is first tinted RGB by
    ``tint`` (3,) and comes back as the maximum over the channels, as the model's ``max`` input sees it."""
    colour = image * tint if image.shape[2] == 1 else image
    eight_bit = (np.clip(colour, 0, 1) * 255 + 0.5).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", eight_bit, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR).astype(np.float32) / 255
    if image.shape[2] == 1:
        decoded = decoded.max(axis=2, keepdims=True)  # the tint's largest entry is 1
    return np.clip(decoded, 0, 1).astype(np.float32)


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight xyxy boxes (float32, N x 4; x1, y1 exclusive) of non-empty masks (N x H x W)."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def initial_model(config: TrainConfig, classes: tuple[str, ...]):
    """(model, card) to start from: scratch, or ``init`` with predictors replaced when needed."""
    if config.init is None:
        card = ModelCard(
            name=config.name,
            architecture=config.arch,
            classes=classes,
            input_size=_input_size(config.input_size or "native"),
            preprocessing=config.preprocessing,
        )
        return build_model(card), card
    loaded = resolve_model(config.init, weights=config.init_weights)
    model, card = loaded.module, loaded.card
    if card.classes != classes:
        num_classes = len(classes) + 1
        box_in = model.roi_heads.box_predictor.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(box_in, num_classes)
        mask_in = model.roi_heads.mask_predictor.conv5_mask.in_channels
        hidden = model.roi_heads.mask_predictor.conv5_mask.out_channels
        model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_in, hidden, num_classes)
    card = replace(
        card,
        name=config.name,
        classes=classes,
        input_size=_input_size(config.input_size or card.input_size),
        preprocessing=config.preprocessing,
    )
    fresh = build_model(card)
    fresh.load_state_dict(model.state_dict())
    return fresh, card


def _input_size(value: str | int) -> str | int:
    return "native" if value == "native" else int(value)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Warm-up from 1% to ``lr`` over ``warmup_steps``, then cosine decay to 2% of ``lr``."""
    if step < config.warmup_steps:
        return config.lr * (0.01 + 0.99 * step / config.warmup_steps)
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _run_identity(config: dict) -> dict:
    """The fields of a config that decide what is trained; a run moves between devices
    (started on a CPU, resumed on a GPU) and stays the same run."""
    return {name: value for name, value in config.items() if name != "device"}


def _save_state(path: str, model, optimizer, step: int, config: TrainConfig, card: ModelCard):
    tmp = f"{path}.tmp"
    torch.save(
        {
            "step": step,
            "config": asdict(config),
            "card": card.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
        },
        tmp,
    )
    os.replace(tmp, path)


def training_batch(dataset: CocoTiles, config: TrainConfig, step: int) -> list[tuple[torch.Tensor, dict]]:
    """The ``config.batch_size`` augmented samples of ``step``: images drawn with replacement and
    augmented with the generator seeded by ``(config.seed, step)`` alone, so a batch does not depend
    on when, or on which thread, it is built."""
    rng = np.random.default_rng([config.seed, step])
    return [dataset.sample(int(i), rng) for i in rng.integers(0, len(dataset), config.batch_size)]


def _step(model, optimizer, params, batch, config: TrainConfig, step: int) -> dict[str, float]:
    """One optimiser step on ``batch``; returns its loss terms."""
    images = [image.to(config.device) for image, _ in batch]
    targets = [{k: v.to(config.device) for k, v in target.items()} for _, target in batch]
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step)
    losses = model(images, targets)
    total = sum(losses.values())
    if not torch.isfinite(total):
        raise FloatingPointError(f"loss is {total.item()} at step {step}: {losses}")
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(params, 5.0)
    optimizer.step()
    return {k: v.item() for k, v in losses.items()}


def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    prefetch: int = PREFETCH_BATCHES,
    faster_roi_align: bool = True,
) -> dict[str, float]:
    """Train per ``config``, resuming from ``output.train-state`` when present.

    ``prefetch``: batches built ahead on threads (0: each batch built when
    its step starts). ``faster_roi_align``: on CPU, RoIAlign's backward runs
    :func:`pipeline.roi_align_grad.roi_align_backward` (False: torchvision's
    kernel; the gradients agree to float rounding).

    Returns the mean of each loss term over the first and last 10% of the
    steps run in this call (``first.loss_mask``, ``last.loss_mask``, ...)
    and ``data_wait_fraction``, the share of the training loop's time spent
    waiting for a batch (near 0 when batches are built faster than the
    model trains).
    """
    dataset = CocoTiles(config.images, config.annotations, config.preprocessing)
    torch.manual_seed(config.seed)
    model, card = initial_model(config, dataset.classes)
    model.to(config.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    state_path = f"{config.output}.train-state"
    start = 0
    if os.path.exists(state_path):
        state = torch.load(state_path, map_location=config.device, weights_only=True)
        if _run_identity(state["config"]) != _run_identity(asdict(config)):
            raise ValueError(
                f"{state_path} belongs to a different training configuration; remove it to start over"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        print(f"resuming training from step {start} of {config.steps}")

    history: list[dict[str, float]] = []
    started, waited = time.monotonic(), 0.0
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not progress)
    with (
        ThreadPoolExecutor(max(prefetch, 1), thread_name_prefix="train-batches") as pool,
        faster_backward(model) if faster_roi_align else contextlib.nullcontext(),
        aligned_mask_targets(),
    ):
        build = functools.partial(training_batch, dataset, config)
        steps = range(start, config.steps)
        batches = bounded_map(pool, build, steps, prefetch) if prefetch else map(build, steps)
        for step in bar:
            before = time.monotonic()
            batch = next(batches)
            waited += time.monotonic() - before
            torch.manual_seed(config.seed * 1_000_003 + step)
            history.append(_step(model, optimizer, params, batch, config, step))
            recent = history[-20:]
            bar.set_postfix(
                {k.removeprefix("loss_")[:6]: f"{np.mean([h[k] for h in recent]):.3f}" for k in LOSS_NAMES}
            )
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                _save_state(state_path, model, optimizer, step + 1, config, card)
    loop_seconds = time.monotonic() - started

    card = replace(
        card,
        object_diameter_px=dataset.object_diameter_px(),
        mask_paste=TRAINED_MASK_PASTE,
        training={
            **asdict(config),
            "seconds_this_session": round(loop_seconds, 1),
            "torch": str(torch.__version__),
        },
    )
    model.eval()
    configure(model, score_threshold=card.score_threshold, max_detections=card.max_detections)
    save_checkpoint(config.output, model.cpu(), card, half=config.half)
    if os.path.exists(state_path):
        os.remove(state_path)
    summary = _loss_summary(history)
    if history:
        summary["data_wait_fraction"] = waited / loop_seconds
    return summary


def _loss_summary(history: list[dict[str, float]]) -> dict[str, float]:
    if not history:
        return {}
    tenth = max(len(history) // 10, 1)
    summary = {}
    for name in LOSS_NAMES:
        summary[f"first.{name}"] = float(np.mean([h[name] for h in history[:tenth]]))
        summary[f"last.{name}"] = float(np.mean([h[name] for h in history[-tenth:]]))
    summary["first.total"] = sum(summary[f"first.{n}"] for n in LOSS_NAMES)
    summary["last.total"] = sum(summary[f"last.{n}"] for n in LOSS_NAMES)
    return summary
