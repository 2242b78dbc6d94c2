"""The model card and the replica's settings: what the driver needs to know about a model, without torch.

The driver of the segment job plans, schedules and writes ``run.json``; it
never imports torch (about 0.7 GB of resident libraries), so it can run on a
small head node. Everything it handles about the model is here; building and
running the network is :mod:`pipeline.model` and :mod:`pipeline.worker`, in
the replicas.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.fs as pafs

from pipeline import preprocess, storage
from pipeline.preprocess import Preprocessing
from schemas import SCHEMA_VERSION

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


TTA_MODES = ("none", "flips", "dihedral")
"""Test-time augmentation: the image alone, its 4 mirror images, or all 8 symmetries of the square
(:data:`pipeline.tta.VIEWS`)."""


MASK_PASTES = ("torchvision", "continuous")
"""How a mask grid is pasted into its box (:func:`pipeline.paste.paste_on_device`): ``torchvision``,
exactly ``paste_masks_in_image`` (Detectron's convention: the box is widened by a pixel, its corners
taken as pixel indices); ``continuous``, each pixel centre sampled in the box taken as continuous
coordinates (Detectron2's convention, the one the training boxes follow)."""


class ModelLoadError(ValueError):
    """A model spec that cannot be resolved or a checkpoint that cannot be loaded safely."""


def check_model_file(spec: str | None) -> None:
    """Refuse a checkpoint path or URI that does not name a file, after one request (the segment job
    asks before it starts Ray, so a mistyped ``--model`` fails at once, not after the replicas start).

    The bundled model (None) and ``torchvision:NAME`` are not files; they, and a file that cannot be
    read or is no checkpoint, are reported where the model loads.

    Raises:
        ModelLoadError: nothing at ``spec``, or a folder.
    """
    if spec is None or spec.startswith("torchvision:"):
        return
    try:
        fs, path = storage.resolve(spec)
        info = storage.retry_transient(lambda: fs.get_file_info(path))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read model {storage.redact(spec)}: {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise ModelLoadError(f"cannot read model {storage.redact(spec)}: it does not exist")
    if info.type != pafs.FileType.File:
        raise ModelLoadError(f"cannot read model {storage.redact(spec)}: a folder, not a checkpoint file")


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint is and how to run it.

    Attributes:
        name: human-readable model name.
        architecture: a key of :data:`pipeline.model.ARCHITECTURES`.
        classes: class names; torchvision label ``k`` is ``classes[k - 1]``.
        input_size: ``"native"`` (images go in at their own size, right for
            tiles), or the shorter side in pixels that torchvision resizes to.
        max_size: longer-side cap in pixels when resizing (ignored for native).
        image_mean, image_std: per-channel normalisation of the network's three
            input channels (applied inside the model, after ``preprocessing``).
        preprocessing: how raw pixels become the input in [0, 1]
            (:class:`pipeline.preprocess.Preprocessing`); a checkpoint written
            without one gets :data:`pipeline.preprocess.LEGACY`, which says so.
        score_threshold, mask_threshold, max_detections: default thresholds.
        tta_score_thresholds: the default score threshold under each test-time
            augmentation (``--tta``) that has its own: fused scores run lower
            than one view's (a view that misses an object adds 0), so the best
            threshold is lower; a mode not listed takes ``score_threshold``.
        mask_paste: how the mask grids are pasted into their boxes, one of
            :data:`MASK_PASTES`; a checkpoint written without one gets
            ``torchvision`` (its masks as before).
        largest_object_px: the largest object the model is meant to find, in
            input pixels; the default window overlap on whole slides.
        object_diameter_px: equivalent-circle diameters (px) of the objects it
            was trained on, 2nd to 98th percentile of its training annotations;
            ``--scale auto`` enlarges images whose objects are much smaller
            (None: unknown, images stay as they are).
        mpp: µm per pixel of the images the model was made for; whole slides
            that state their pixel size are read at it by default (None:
            level 0 as it is).
        training: provenance (command, seed, steps, duration), free form.
    """

    name: str
    architecture: str
    classes: tuple[str, ...]
    input_size: str | int = "native"
    max_size: int = 1333
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    max_detections: int = 500
    tta_score_thresholds: dict[str, float] = field(default_factory=dict)
    mask_paste: str = "torchvision"
    largest_object_px: int = 64
    object_diameter_px: tuple[float, float] | None = None
    mpp: float | None = None
    preprocessing: Preprocessing = preprocess.LEGACY
    training: dict[str, Any] = field(default_factory=dict)

    def default_score_threshold(self, tta: str = "none") -> float:
        """The score threshold a run takes when ``--score-threshold`` is not given."""
        return self.tta_score_thresholds.get(tta, self.score_threshold)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not ignored."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ModelLoadError(f"model card has unknown keys {sorted(unknown)}")
        data = dict(data)
        for key in ("classes", "image_mean", "image_std", "object_diameter_px"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        if "preprocessing" in data:
            try:
                data["preprocessing"] = Preprocessing.from_dict(data["preprocessing"])
            except preprocess.PreprocessingError as exc:
                raise ModelLoadError(f"model card: {exc}") from None
        if data.get("mask_paste", "torchvision") not in MASK_PASTES:
            raise ModelLoadError(f"model card: mask_paste {data['mask_paste']!r} is not one of {MASK_PASTES}")
        return cls(**data)


@dataclass(frozen=True)
class InferenceSettings:
    """What a replica needs besides the weights (all pinned in run.json except batch_size).

    ``preprocessing`` is the model card's, with ``--channel`` applied.
    """

    score_threshold: float
    mask_threshold: float
    max_detections: int
    batch_size: int
    max_pixels: int
    preprocessing: Preprocessing
    overlap_threshold: float = 1.0
    exclusive_pixels: bool = False
    pixel_size_um: float | None = None
    """µm per pixel for every image (``--pixel-size-um``); None: each file's own, if it states one."""
    slide_mpp_override: float | None = None
    """µm per level-0 pixel of every slide (``--mpp-override``); None: each slide's own."""
    tile_size: int | None = None
    """A plain image larger than this on a side is segmented in windows of this size (decoded once);
    None: whole, whatever its size (runs made before whole-slide support)."""
    tile_overlap: int = 0
    """Pixels shared by those windows (even)."""
    scale: float | str = 1.0
    """Factor plain images (and their windows) are resampled by before the model, or ``"auto"``
    (per image, :func:`pipeline.infer.automatic_scale`, from the card's ``object_diameter_px``);
    slide windows are read at ``--mpp`` and never resampled here."""
    tta: str = "none"
    """Test-time augmentation, one of :data:`TTA_MODES`."""
    mask_paste: str = "torchvision"
    """The model card's ``mask_paste``, one of :data:`MASK_PASTES`."""
    schema_version: str = SCHEMA_VERSION
    """The table schema version of the run (a run resumed keeps the version it started with)."""
