"""Models: the model card, torchvision Mask R-CNN builders, safe checkpoint I/O.

A checkpoint is a ``torch.save`` of a plain dict that loads with
``torch.load(..., weights_only=True)`` (no pickled code ever runs)::

    {"format": "segpipe-checkpoint", "version": 1,
     "card": ModelCard.to_dict(), "state_dict": {name: tensor}}

A model spec (``--model``) is one of:

* ``None``: the bundled nuclei model shipped inside this package;
* a local path or a ``pyarrow.fs`` URI (``s3://...``) to a checkpoint;
* ``torchvision:maskrcnn_resnet50_fpn`` or ``torchvision:maskrcnn_resnet50_fpn_v2``,
  with ``weights`` ``"DEFAULT"`` (COCO weights from torchvision's local cache;
  never downloaded), a path to a state dict, or ``None`` (random weights, for
  benchmarks).

Labels follow torchvision: 0 is background, label ``k`` is ``card.classes[k - 1]``.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import (
    MaskRCNN,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from pipeline import storage
from pipeline.card import ModelCard, ModelLoadError
from pipeline.preprocess import Preprocessing

CHECKPOINT_FORMAT = "segpipe-checkpoint"
CHECKPOINT_VERSION = 1
BUNDLED_MODEL = Path(__file__).parent / "models" / "nuclei_r18_fpn.pt"
TORCHVISION_PREPROCESSING = Preprocessing(
    channel="rgb", normalize="range", note="torchvision's COCO convention: RGB scaled by the type's range"
)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference: module (eval mode, CPU), its card, a weights fingerprint."""

    module: MaskRCNN
    card: ModelCard
    fingerprint: str


class NativeSizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform (normalise, pad, batch) that never resizes.

    Cell tiles are already at the resolution the model was trained for;
    torchvision's default 800 px shorter side would upsample a 256 px tile 3x.
    """

    def resize(self, image, target=None):
        return image, target


def _build_resnet18_fpn_lite(num_classes: int) -> MaskRCNN:
    """ResNet-18 up to layer3 + 64-channel FPN + narrow heads (about 4M parameters).

    Anchors of 8-64 px on strides 4-32 suit nuclei of 8-60 px diameter at native size.
    BatchNorm (not frozen) because it is trained from scratch.
    """
    channels = 64
    body = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2"},
        in_channels_list=[64, 128, 256],
        out_channels=channels,
    )
    anchors = AnchorGenerator(sizes=((8,), (16,), (32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    return MaskRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(channels, anchors.num_anchors_per_location()[0]),
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(channels * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2"], output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(channels, [channels] * 4, 1),
        mask_predictor=MaskRCNNPredictor(channels, channels, num_classes),
        rpn_pre_nms_top_n_test=2000,
        rpn_post_nms_top_n_test=2000,
    )


ARCHITECTURES = {
    "maskrcnn_resnet18_fpn_lite": _build_resnet18_fpn_lite,
    "maskrcnn_resnet50_fpn": lambda n: maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=n
    ),
    "maskrcnn_resnet50_fpn_v2": lambda n: maskrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=n
    ),
}


def build_model(card: ModelCard) -> MaskRCNN:
    """A randomly initialised Mask R-CNN configured from ``card`` (train mode, CPU)."""
    if card.architecture not in ARCHITECTURES:
        raise ModelLoadError(f"unknown architecture {card.architecture!r}; known: {sorted(ARCHITECTURES)}")
    model = ARCHITECTURES[card.architecture](len(card.classes) + 1)
    transform_cls = NativeSizeTransform if card.input_size == "native" else GeneralizedRCNNTransform
    min_size = 800 if card.input_size == "native" else int(card.input_size)
    model.transform = transform_cls(
        min_size=min_size,
        max_size=card.max_size,
        image_mean=list(card.image_mean),
        image_std=list(card.image_std),
    )
    configure(model, score_threshold=card.score_threshold, max_detections=card.max_detections)
    return model


def configure(model: MaskRCNN, *, score_threshold: float, max_detections: int) -> None:
    """Set the post-processing thresholds the run uses (in place).

    ``score_threshold`` filters detections before NMS (torchvision's
    ``box_score_thresh``); ``max_detections`` caps instances per image.
    """
    model.roi_heads.score_thresh = float(score_threshold)
    model.roi_heads.detections_per_img = int(max_detections)


def save_checkpoint(path: str | Path, model: nn.Module, card: ModelCard, *, half: bool = False) -> None:
    """Write a weights-only checkpoint; ``half`` stores float tensors as fp16."""
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
        for k, v in model.state_dict().items()
    }
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "card": card.to_dict(),
        "state_dict": state,
    }
    torch.save(payload, path)


def _safe_torch_load(data: bytes, where: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines()]
        reason = next((line for line in lines if "Unsupported" in line), "not a weights-only pickle")
        raise ModelLoadError(
            f"refusing to load {where}: it is not a weights-only checkpoint "
            f"(loading it would run pickled code): {reason}"
        ) from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise ModelLoadError(f"cannot read checkpoint {where}: {exc}") from None


def _fingerprint(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _load_checkpoint_bytes(data: bytes, where: str) -> LoadedModel:
    payload = _safe_torch_load(data, where)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelLoadError(
            f"{where} is not a {CHECKPOINT_FORMAT} file (expected a dict with "
            f"'format', 'card', 'state_dict'; use torchvision:NAME --weights PATH for a bare state dict)"
        )
    card = ModelCard.from_dict(payload["card"])
    model = build_model(card)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    model.load_state_dict(state)
    return LoadedModel(model.eval(), card, _fingerprint(data))


def _torchvision_model(name: str, weights: str | None) -> LoadedModel:
    from torchvision.models import get_model_weights

    if name not in ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"):
        raise ModelLoadError(
            f"unknown torchvision model {name!r}; use maskrcnn_resnet50_fpn or maskrcnn_resnet50_fpn_v2"
        )
    enum = get_model_weights(name)
    if weights is None:
        card = ModelCard(
            name=f"{name} (random weights)",
            architecture=name,
            classes=tuple(c for c in enum.DEFAULT.meta["categories"][1:]),
            input_size=800,
            preprocessing=TORCHVISION_PREPROCESSING,
        )
        torch.manual_seed(0)
        model = build_model(card)
        return LoadedModel(model.eval(), card, "random-init:seed0")
    if weights == "DEFAULT":
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.DEFAULT.url).name
        if not cached.exists():
            raise ModelLoadError(
                f"{name} DEFAULT weights are not in torchvision's cache ({cached}); nothing is "
                f"downloaded at run time: fetch {enum.DEFAULT.url} there on a machine with network, "
                f"or pass --weights PATH"
            )
        data, where = cached.read_bytes(), str(cached)
    else:
        data, where = storage.read_bytes(weights), storage.redact(weights)
    state = _safe_torch_load(data, where)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    head = state.get("roi_heads.box_predictor.cls_score.weight")
    if head is None:
        raise ModelLoadError(f"{where} has no roi_heads.box_predictor; not a {name} state dict")
    categories = enum.DEFAULT.meta["categories"]
    num_classes = head.shape[0]
    classes = (
        tuple(categories[1:])
        if num_classes == len(categories)
        else tuple(f"class_{k}" for k in range(1, num_classes))
    )
    card = ModelCard(
        name=name,
        architecture=name,
        classes=classes,
        input_size=800,
        preprocessing=TORCHVISION_PREPROCESSING,
    )
    model = build_model(card)
    model.load_state_dict(state)
    return LoadedModel(model.eval(), card, _fingerprint(data))


def resolve_model(spec: str | None = None, *, weights: str | None = None) -> LoadedModel:
    """Load the model named by ``spec`` (see the module docstring) in eval mode on the CPU.

    Raises:
        ModelLoadError: unknown spec, missing file, unsafe or malformed checkpoint.
    """
    if spec is None:
        if not BUNDLED_MODEL.exists():
            raise ModelLoadError(f"the bundled model is missing from the install: {BUNDLED_MODEL}")
        return _load_checkpoint_bytes(BUNDLED_MODEL.read_bytes(), "the bundled model")
    if spec.startswith("torchvision:"):
        return _torchvision_model(spec.split(":", 1)[1], weights)
    if weights is not None:
        raise ModelLoadError("--weights only applies to torchvision:NAME models")
    try:
        data = storage.read_bytes(spec)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read model {storage.redact(spec)}: {exc}") from None
    return _load_checkpoint_bytes(data, storage.redact(spec))


def load_model(spec: str | None = None, *, weights: str | None = None) -> MaskRCNN:
    """The torchvision ``MaskRCNN`` for ``spec``, configured from its model card, eval mode.

    Its standard ``forward`` is the reference the pipeline's output matches.
    """
    return resolve_model(spec, weights=weights).module


def with_thresholds(card: ModelCard, **overrides: Any) -> ModelCard:
    """The card with the given thresholds replaced (None values keep the card's)."""
    return replace(card, **{k: v for k, v in overrides.items() if v is not None})
