"""Score a run against COCO ground truth: COCOeval, counting, and a semantic-then-count baseline.

* COCOeval (``segm`` and ``bbox``) straight from the stored RLE strings, with
  ``maxDets`` raised to :data:`MAX_DETECTIONS` (dense tiles have more than 100
  objects). AP is read from ``eval["precision"]`` at the largest ``maxDets``
  (``stats[0]`` would ask for 100 and return -1).
* Uncertainty: the bootstrap standard error of the class-agnostic mask AP50
  over images (``agnostic.segm.AP50.se``; 200 draws of as many images with
  replacement, per-image matches from one COCOeval run): how far AP50 would
  move on another archive of the same look and size.
* Comparison of two runs over the same images: both AP50s and the difference
  with its paired standard error (the same draws of images for both).
* Matching: precision, recall and F1 of every stored instance at mask IoU
  0.5 (greedy one-to-one matching by score, class-agnostic; StarDist's and
  the cell-tracking challenges' figure). Unlike AP, F1 has no recall grid:
  COCOeval samples precision at 101 recall points, so a run stopped at a
  score threshold gains or loses 1/101 of AP as its last recall crosses one.
* Counting: per-image count error of the run against the ground truth, overall
  and on dense tiles (ground-truth count at or above the 75th percentile);
  per-slide and per-class counts.
* Baseline: Otsu threshold and connected components on the same tiles (what
  a semantic segmenter followed by counting does: touching nuclei fuse), scored
  the same way, class-agnostic.
* Sweep: per score threshold, instance count and precision / recall at mask
  IoU 0.5 (greedy one-to-one matching by score).
* Misses: recall at mask IoU 0.5 per object size band and per band of the
  objects' contrast-to-noise ratio measured on the image (and of that
  contrast over the median of the image's objects), isolated against
  touching objects, and what the false instances are (duplicates, near misses,
  background): where a model's errors are, not only how many.

* Label images: ground truth from instance label images (0 background, one id
  per object), beside the images or in a folder of their own, each object
  encoded in its own box.

Ground-truth images are matched to the run's images by path relative to the
run's source (COCO ``file_name``).
"""

from __future__ import annotations

import collections
import contextlib
import io
import itertools
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline import commit, masks, plan, preprocess, storage
from pipeline.decode import DecodeError, RawImage, read_and_decode
from pipeline.plan import IMAGE_EXTENSIONS
from pipeline.preprocess import model_input
from pipeline.rle import decode_box, decode_in_own_box
from pipeline.slides import Slide, is_slide_candidate
from pipeline.stats import read_table
from pipeline.windows import window_mask_to_slide

MAX_DETECTIONS = 1000
BASELINE_MIN_AREA = 12
"""Connected components smaller than this (px) are noise, not nuclei, for the baseline."""
MATCH_IOU = 0.5
"""Mask IoU at which a prediction matches an object (AP50's criterion)."""
CONTRAST_RING_PX = (2, 5)
"""An object's background ring, for its contrast: the pixels 2 to 5 px (chessboard distance) outside
it that belong to no object (the first pixel outside is left to the soft edge)."""
CONTRAST_EDGES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
"""Band edges of the recall-by-contrast report: fixed, so that two archives or two models compare
band by band."""
RELATIVE_CONTRAST_EDGES = (0.125, 0.25, 0.5, 1.0, 2.0)
"""Band edges of the recall-by-relative-contrast report: an object's contrast over the median of its
image's objects."""
FAINT_CONTRAST = 2.0
"""An object under this contrast-to-noise ratio is faint (:func:`faint_recall`): it stands less than
two pixels' noise out of its surroundings."""
CONTRAST_MAX_PIXELS = 10**8
"""Images (and slides' level 0) up to this many pixels are read whole for their objects' contrast."""
NEAR_MISS_IOU = 0.1
"""A false instance whose best mask IoU with an object reaches this is a near miss (a loose mask, a
piece or a merge of real objects); below it, it lies on background."""


@dataclass
class Matched:
    """A run joined to its ground truth: the COCO object, images with ``gt_id``, instances."""

    coco: COCO
    images: pd.DataFrame
    instances: pd.DataFrame


def load(dest: str, annotations: str, *, score_threshold: float | None = None) -> Matched:
    """Read the run's tables and the COCO file; match images by relative path. ``score_threshold``:
    the instances kept (default: every instance the run stored).

    Raises:
        ValueError: no run image matches a ground-truth ``file_name``, or ``score_threshold`` is
            below the run's own (those scores were never stored).
    """
    if score_threshold is not None:
        _check_stored(dest, score_threshold, "to keep scores from")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(annotations)
    source = commit.read_json(storage.join(dest, "run.json"))["settings"]["source"].rstrip("/") + "/"
    by_name = {im["file_name"]: im["id"] for im in coco.dataset["images"]}
    images = read_table(dest, "images")
    images["gt_id"] = [
        by_name.get(uri[len(source) :]) if uri.startswith(source) else None for uri in images["uri"]
    ]
    images = images[images["gt_id"].notna() & (images["status"] == "ok")].copy()
    if images.empty:
        raise ValueError(
            f"no image of the run at {storage.redact(dest)} matches a file_name in {annotations}"
        )
    images["gt_id"] = images["gt_id"].astype(int)
    instances = read_table(dest, "instances")
    instances = instances[instances["image_id"].isin(images["image_id"])]
    if score_threshold is not None:
        instances = instances[instances["score"] >= score_threshold]
    instances = instances.merge(images[["image_id", "gt_id"]], on="image_id")
    return Matched(coco, images, instances)


def detections_from_instances(instances: pd.DataFrame, coco: COCO | None = None) -> list[dict]:
    """COCO results (segmentation RLE, bbox xywh, score, category_id = label) of a run's rows.

    Rows of slide windows get their masks moved from the window's frame onto
    the slide (sized as ``coco``'s image ``gt_id``).
    """
    if coco is not None and "tile_x0" in instances:
        height = instances["gt_id"].map(lambda i: coco.imgs[int(i)]["height"])
        width = instances["gt_id"].map(lambda i: coco.imgs[int(i)]["width"])
        in_window = (
            (instances["tile_x0"].fillna(0) != 0)
            | (instances["tile_y0"].fillna(0) != 0)
            | (instances["tile_downsample"].fillna(1) != 1)
            | (instances["height"] != height)
            | (instances["width"] != width)
        )
        if in_window.any():
            return detections_from_instances(instances[~in_window]) + _slide_detections(
                instances[in_window], coco
            )
    return [
        {
            "image_id": int(row.gt_id),
            "category_id": int(row.label),
            "segmentation": {"size": [int(row.height), int(row.width)], "counts": row.rle},
            "bbox": [float(row.x0), float(row.y0), float(row.x1 - row.x0), float(row.y1 - row.y0)],
            "score": float(row.score),
        }
        for row in instances.itertuples()
    ]


def _slide_detections(instances: pd.DataFrame, coco: COCO) -> list[dict]:
    detections = []
    for gt_id, group in instances.groupby("gt_id"):
        image = coco.imgs[int(gt_id)]
        crops = [_window_mask_on_slide(r) for r in group.itertuples()]
        encoded = masks.encode_crops(crops, (image["height"], image["width"]))
        for row, rle in zip(group.itertuples(), encoded["rle"], strict=True):
            detections.append(
                {
                    "image_id": int(gt_id),
                    "category_id": int(row.label),
                    "segmentation": {"size": [image["height"], image["width"]], "counts": rle},
                    "bbox": [float(row.x0), float(row.y0), float(row.x1 - row.x0), float(row.y1 - row.y0)],
                    "score": float(row.score),
                }
            )
    return detections


def _window_mask_on_slide(row) -> masks.Crop:
    """A window row's mask as a crop in level-0 slide pixels, decoded only inside the mask's own
    box, not on the whole window."""
    part, x, y = decode_in_own_box({"size": [int(row.height), int(row.width)], "counts": row.rle})
    downsample = row.tile_downsample
    origin_x, origin_y = row.tile_x0 + x * downsample, row.tile_y0 + y * downsample
    return window_mask_to_slide(part.astype(bool), origin_x, origin_y, downsample)


def coco_ap(
    coco: COCO, detections: list[dict], image_ids: list[int], iou_type: str, *, use_cats: bool = True
):
    """AP (0.5:0.95), AP50, AP75 and per-category AP at maxDets :data:`MAX_DETECTIONS`, or more for
    an image (a whole slide) with more detections than that."""
    categories = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, **{f"AP.{name}": 0.0 for name in categories.values()}}
    evaluator = per_image_evaluation(coco, detections, image_ids, iou_type, use_cats=use_cats)
    return _ap_scores(evaluator, categories)


def agnostic_mask_ap(coco: COCO, detections: list[dict], image_ids: list[int]) -> dict[str, float]:
    """Class-agnostic mask AP, AP50, AP75 (:func:`coco_ap`) and ``AP50.se``, AP50's bootstrap
    standard error over images (:func:`ap50_standard_error`), from one COCOeval run."""
    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AP50.se": 0.0}
    evaluator = per_image_evaluation(coco, detections, image_ids, "segm", use_cats=False)
    scores = _ap_scores(evaluator, {})
    scores["AP50.se"] = ap50_standard_error(image_matches_at_50(evaluator), evaluator.params.recThrs)
    return scores


def _ap_scores(evaluator: COCOeval, categories: dict[int, str]) -> dict[str, float]:
    """AP, AP50, AP75 (and ``AP.NAME`` per category when the evaluation uses them) after accumulating."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [iou, recall, category] at area all

    def mean(values):
        valid = values[values > -1]
        return float(valid.mean()) if valid.size else 0.0

    scores = {"AP": mean(precision), "AP50": mean(precision[0]), "AP75": mean(precision[5])}
    if evaluator.params.useCats:
        for index, category in enumerate(evaluator.params.catIds):
            scores[f"AP.{categories[category]}"] = mean(precision[:, :, index])
    return scores


def per_image_evaluation(
    coco: COCO, detections: list[dict], image_ids: list[int], iou_type: str, *, use_cats: bool
) -> COCOeval:
    """A COCOeval of ``detections`` (not empty) on ``image_ids`` after ``evaluate()`` (per-image
    matches in ``evalImgs``), with the ``maxDets`` :func:`coco_ap` documents."""
    with contextlib.redirect_stdout(io.StringIO()):
        results = coco.loadRes([dict(d) for d in detections])
        evaluator = COCOeval(coco, results, iou_type)
        evaluator.params.imgIds = sorted(image_ids)
        most = max(collections.Counter(d["image_id"] for d in detections).values())
        evaluator.params.maxDets = [1, 10, max(MAX_DETECTIONS, most)]
        evaluator.params.useCats = int(use_cats)
        evaluator.evaluate()
    return evaluator


@dataclass(frozen=True)
class ImageMatches:
    """One image's detections at mask IoU 0.5, as COCOeval matched them: ``scores`` (D,), ``true`` (D,)
    bool (matched an object), ``counted`` (D,) bool (not ignored), and ``objects`` (objects not ignored)."""

    scores: np.ndarray
    true: np.ndarray
    counted: np.ndarray
    objects: int


def image_matches_at_50(evaluator: COCOeval) -> list[ImageMatches]:
    """Per image of ``evaluator.params.imgIds`` (class-agnostic, after ``evaluate()``): its
    :class:`ImageMatches` at IoU 0.5, area "all", the largest ``maxDets``."""
    params = evaluator.params
    if params.useCats:
        raise ValueError("per-image matches are read from a class-agnostic evaluation (useCats=0)")
    images, most = len(params.imgIds), params.maxDets[-1]
    empty = ImageMatches(np.zeros(0), np.zeros(0, bool), np.zeros(0, bool), 0)
    matches = []
    for entry in evaluator.evalImgs[:images]:  # area "all" comes first
        if entry is None:
            matches.append(empty)
            continue
        matched, ignored = entry["dtMatches"][0, :most] > 0, entry["dtIgnore"][0, :most].astype(bool)
        scores = np.asarray(entry["dtScores"][:most], dtype=np.float64)
        objects = int(np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0))
        matches.append(ImageMatches(scores, matched, ~ignored, objects))
    return matches


def ap50_of(matches: list[ImageMatches], recall_points: np.ndarray) -> float:
    """AP50 of these images together, as COCOeval's ``accumulate`` computes it: detections ranked by
    score (stable), precision made non-increasing, read at ``recall_points``; -1 without objects.

    Written out for the bootstrap: COCOeval's ``accumulate`` does all 10 IoUs, 4 areas and 3
    ``maxDets`` at once, 0.14 s on 256 validation tiles against 0.5 ms here (200 draws: 27 s
    against 0.1 s). Tested equal to COCOeval's AP50."""
    objects = sum(m.objects for m in matches)
    if objects == 0:
        return -1.0
    scores = np.concatenate([m.scores for m in matches])
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="mergesort")
    true = np.concatenate([m.true for m in matches])[order]
    counted = np.concatenate([m.counted for m in matches])[order]
    true_positives = np.cumsum(true & counted).astype(np.float64)
    false_positives = np.cumsum(~true & counted).astype(np.float64)
    recall = true_positives / objects
    precision = true_positives / (true_positives + false_positives + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    at = np.searchsorted(recall, recall_points, side="left")
    sampled = np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0)
    return float(sampled.mean())


def ap50_standard_error(
    matches: list[ImageMatches], recall_points: np.ndarray, *, samples: int = 200, seed: int = 0
) -> float:
    """Bootstrap standard error of AP50 over images: the spread of :func:`ap50_of` over ``samples``
    draws of as many images as ``matches`` holds, with replacement (how far the figure would move on
    another archive of this look and size). 0.0 without objects."""
    if sum(m.objects for m in matches) == 0:
        return 0.0
    values = _drawn_ap50(matches, recall_points, _bootstrap_draws(len(matches), samples, seed))
    return _spread(values[values > -1])  # a draw without objects has no AP


def _bootstrap_draws(images: int, samples: int, seed: int) -> np.ndarray:
    """int (samples, images): each row a draw of as many image indices, with replacement. One
    function for :func:`ap50_standard_error` and :func:`compare_ap50`, so that at the same
    ``samples`` and ``seed`` they score the same draws."""
    return np.random.default_rng(seed).integers(0, images, size=(samples, images))


def _drawn_ap50(matches: list[ImageMatches], recall_points: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """:func:`ap50_of` of each row of ``draws`` (samples, images): indices into ``matches``."""
    return np.array([ap50_of([matches[i] for i in draw], recall_points) for draw in draws])


def _spread(values: np.ndarray) -> float:
    """Sample standard deviation, 0.0 for fewer than two values."""
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def compare_ap50(
    dest: str,
    other: str,
    annotations: str,
    *,
    score_threshold: float | None = None,
    other_score_threshold: float | None = None,
    samples: int = 200,
    seed: int = 0,
) -> dict:
    """Class-agnostic mask AP50 of two runs over the same ground-truth images, with each one's
    bootstrap standard error, and the difference ``other - dest`` with its paired standard error:
    both runs scored on the same ``samples`` draws of images, so what the images share does not
    count as noise. ``score_threshold``: the instances of ``dest`` kept (default: every instance
    it stored); ``other_score_threshold``: those of ``other`` (default: ``score_threshold``), e.g.
    two models each at its own card's threshold.

    Raises:
        ValueError: the runs do not cover the same ground-truth images, or a threshold is below its
            run's own (those scores were never stored).
    """
    if other_score_threshold is None:
        other_score_threshold = score_threshold
    runs = [
        load(run, annotations, score_threshold=threshold)
        for run, threshold in ((dest, score_threshold), (other, other_score_threshold))
    ]
    image_ids = [sorted(run.images["gt_id"].unique().tolist()) for run in runs]
    if image_ids[0] != image_ids[1]:
        raise ValueError(
            f"the runs cover different images of {annotations} ({len(image_ids[0])} and "
            f"{len(image_ids[1])}); compare runs of the same source"
        )
    ids = image_ids[0]
    draws = _bootstrap_draws(len(ids), samples, seed)
    whole, drawn = [], []
    for run in runs:
        matches, recall_points = _agnostic_matches(
            run.coco, detections_from_instances(run.instances, run.coco), ids
        )
        whole.append(ap50_of(matches, recall_points))
        drawn.append(_drawn_ap50(matches, recall_points, draws))
    valid = (drawn[0] > -1) & (drawn[1] > -1)  # a draw without objects has no AP
    return {
        "images": len(ids),
        "AP50": whole[0],
        "AP50.se": _spread(drawn[0][valid]),
        "other.AP50": whole[1],
        "other.AP50.se": _spread(drawn[1][valid]),
        "difference": whole[1] - whole[0],
        "difference.se": _spread(drawn[1][valid] - drawn[0][valid]),
    }


def _agnostic_matches(coco: COCO, detections: list[dict], image_ids: list[int]):
    """(:func:`image_matches_at_50` per image of ``image_ids``, COCOeval's recall points); a run
    without detections has each image's objects and nothing found."""
    if detections:
        evaluator = per_image_evaluation(coco, detections, image_ids, "segm", use_cats=False)
        return image_matches_at_50(evaluator), evaluator.params.recThrs
    truth = ground_truth_counts(coco, image_ids).groupby("gt_id").size()
    nothing = np.zeros(0)
    matches = [
        ImageMatches(nothing, nothing.astype(bool), nothing.astype(bool), int(truth.get(i, 0)))
        for i in image_ids
    ]
    return matches, COCOeval(iouType="segm").params.recThrs


def ground_truth_counts(coco: COCO, image_ids) -> pd.DataFrame:
    """Per ground-truth image and category: the number of annotations."""
    rows = [
        {"gt_id": a["image_id"], "label": a["category_id"]}
        for a in coco.dataset["annotations"]
        if a["image_id"] in set(image_ids) and not a.get("iscrowd", 0)
    ]
    return pd.DataFrame(rows, columns=["gt_id", "label"])


def count_errors(predicted: pd.Series, truth: pd.Series) -> dict[str, float]:
    """MAE, relative error (sum |error| / sum truth) and mean signed error of per-image counts."""
    error = predicted - truth
    return {
        "mae": float(error.abs().mean()),
        "relative_error": float(error.abs().sum() / max(truth.sum(), 1)),
        "bias": float(error.mean()),
    }


def baseline_detections(images: pd.DataFrame, max_pixels: int = 10**9) -> list[dict]:
    """Otsu + connected components (8-connected, >= BASELINE_MIN_AREA px) on each image, as COCO results.

    The baseline sees the image as the bundled model's preprocessing prepares
    it (maximum over channels, percentile-normalised), so it never loses for
    want of a contrast stretch.
    """
    detections = []
    for row in images.drop_duplicates("gt_id").itertuples():  # a slide's windows: the slide once
        raw = _whole_image(row.uri, max_pixels)
        prepared = model_input(raw.pixels, preprocess.DEFAULT, channel_names=raw.channel_names)[0]
        gray = cv2.GaussianBlur((prepared * 255 + 0.5).astype(np.uint8), (0, 0), 1.0)
        _, foreground = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
        crops = []
        for k in range(1, count):
            x, y, w, h, area = stats[k]
            if area >= BASELINE_MIN_AREA:
                crops.append(masks.Crop(labels[y : y + h, x : x + w] == k, int(x), int(y)))
        encoded = masks.encode_crops(crops, gray.shape)
        for crop, rle, area in zip(crops, encoded["rle"], encoded["area"], strict=True):
            h, w = crop.mask.shape
            detections.append(
                {
                    "image_id": int(row.gt_id),
                    "category_id": 1,
                    "segmentation": {"size": list(gray.shape), "counts": rle},
                    "bbox": [crop.x0, crop.y0, w, h],
                    "score": float(min(area / 1e4, 1.0)),
                }
            )
    return detections


def _whole_image(uri: str, max_pixels: int) -> RawImage:
    """An image file decoded, or a slide file's level 0 read whole (small test slides only)."""
    if not is_slide_candidate(uri, None):
        return read_and_decode(uri, max_pixels=max_pixels)
    slide = Slide(uri)
    try:
        if slide.info.width * slide.info.height > max_pixels:
            raise ValueError(
                f"{uri} is too large for the baseline ({slide.info.width} x {slide.info.height})"
            )
        return RawImage(slide.read_region(0, 0, 0, slide.info.width, slide.info.height), slide.info.channels)
    finally:
        slide.close()


def _per_image_counts(detections: list[dict], image_ids) -> pd.Series:
    counts = pd.Series(0, index=sorted(image_ids), dtype="int64")
    observed = pd.Series([d["image_id"] for d in detections], dtype="int64").value_counts()
    counts.loc[observed.index] = observed.values
    return counts


def evaluate(dest: str, annotations: str) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """All scores of the run at ``dest`` (flat dict) and the per-slide / per-class count tables."""
    matched = load(dest, annotations)
    coco, images, instances = matched.coco, matched.images, matched.instances
    image_ids = sorted(images["gt_id"].unique().tolist())  # a slide's windows share its id
    detections = detections_from_instances(instances, coco)
    scores: dict[str, float] = {"images": len(images), "instances": len(instances)}
    for iou_type in ("segm", "bbox"):
        for key, value in coco_ap(coco, detections, image_ids, iou_type).items():
            scores[f"{iou_type}.{key}"] = value
    agnostic = agnostic_mask_ap(coco, detections, image_ids)
    for key in ("AP", "AP50", "AP50.se"):
        scores[f"agnostic.segm.{key}"] = agnostic[key]
    ranked, truth_masks, n_objects = _ranked_with_truth(detections, coco, image_ids)
    kept, true_positives = _matched(ranked, truth_masks, -np.inf)
    scores.update({f"match.{k}": v for k, v in _precision_recall_f1(kept, true_positives, n_objects).items()})

    truth = ground_truth_counts(coco, image_ids)
    truth_per_image = truth.groupby("gt_id").size().reindex(sorted(image_ids), fill_value=0)
    predicted = _per_image_counts(detections, image_ids)
    dense = truth_per_image >= truth_per_image.quantile(0.75)
    scores.update({f"count.{k}": v for k, v in count_errors(predicted, truth_per_image).items()})
    scores.update(
        {f"count.dense.{k}": v for k, v in count_errors(predicted[dense], truth_per_image[dense]).items()}
    )
    scores["count.dense.images"] = int(dense.sum())

    base = baseline_detections(images)
    base_ap = coco_ap(coco, base, image_ids, "segm", use_cats=False)
    scores["baseline.segm.AP"], scores["baseline.segm.AP50"] = base_ap["AP"], base_ap["AP50"]
    base_counts = _per_image_counts(base, image_ids)
    scores.update({f"baseline.count.{k}": v for k, v in count_errors(base_counts, truth_per_image).items()})
    scores.update(
        {
            f"baseline.count.dense.{k}": v
            for k, v in count_errors(base_counts[dense], truth_per_image[dense]).items()
        }
    )
    return scores, {"counts": _count_table(coco, images, instances, truth)}


def _count_table(
    coco: COCO, images: pd.DataFrame, instances: pd.DataFrame, truth: pd.DataFrame
) -> pd.DataFrame:
    """Per slide and class: predicted and ground-truth counts."""
    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    slide_of = images.drop_duplicates("gt_id").set_index("gt_id")["slide_id"]
    truth = truth.assign(slide_id=truth["gt_id"].map(slide_of), class_name=truth["label"].map(names))
    gt = truth.groupby(["slide_id", "class_name"]).size().rename("gt_count")
    pred = instances.groupby(["slide_id", "class_name"]).size().rename("count")
    index = pd.MultiIndex.from_product(
        [sorted(images["slide_id"].unique()), list(names.values())], names=["slide_id", "class_name"]
    )
    table = pd.concat([pred, gt], axis=1).reindex(index).fillna(0).astype("int64")
    table["error"] = table["count"] - table["gt_count"]
    return table.reset_index()


def sweep(dest: str, annotations: str, thresholds: list[float]) -> pd.DataFrame:
    """Per score threshold: instances kept, objects, true positives at mask IoU 0.5 (greedy by score,
    :func:`match_masks`), precision, recall and F1 (2 TP / (instances + objects), the criterion the
    card's default threshold is chosen by); slide windows' masks are moved onto the slide first.

    Raises:
        ValueError: a threshold is below the run's own score threshold (those
            detections were never stored; rerun with a lower ``--score-threshold``).
    """
    _check_stored(dest, min(thresholds), "to sweep from")
    matched = load(dest, annotations)
    detections = detections_from_instances(matched.instances, matched.coco)
    ranked, truth, n_gt = _ranked_with_truth(detections, matched.coco, matched.images["gt_id"])
    rows = []
    for threshold in thresholds:
        kept, true_positives = _matched(ranked, truth, threshold)
        rows.append(
            {
                "score_threshold": round(float(threshold), 4),
                "instances": kept,
                "ground_truth": n_gt,
                "true_positives": true_positives,
                **_precision_recall_f1(kept, true_positives, n_gt),
            }
        )
    return pd.DataFrame(rows)


def _ranked_with_truth(
    detections: list[dict], coco: COCO, gt_ids
) -> tuple[dict[int, tuple[np.ndarray, list[dict]]], dict[int, list[dict]], int]:
    """What :func:`_matched` takes: :func:`_ranked_detections` of ``detections``, each image's object
    RLEs (:func:`_object_masks`), and the number of objects."""
    ranked = _ranked_detections(detections, gt_ids)
    truth = {gt_id: _object_masks(coco, gt_id) for gt_id in ranked}
    return ranked, truth, sum(len(objects) for objects in truth.values())


def _matched(
    ranked: dict[int, tuple[np.ndarray, list[dict]]], truth: dict[int, list[dict]], threshold: float
) -> tuple[int, int]:
    """(instances scoring at least ``threshold``, how many of them :func:`match_masks` pairs with an
    object), over the images of ``ranked`` (:func:`_ranked_detections`) and their ``truth`` RLEs."""
    kept, true_positives = 0, 0
    for gt_id, (scores, rles) in ranked.items():
        n = int(np.searchsorted(-scores, -threshold, side="right"))
        match, _ = match_masks(rles[:n], truth[gt_id])
        kept += n
        true_positives += int((match >= 0).sum())
    return kept, true_positives


def _precision_recall_f1(instances: int, true_positives: int, objects: int) -> dict[str, float]:
    """Precision, recall and F1 (2 TP / (instances + objects)) of a one-to-one matching; 1.0 where
    the denominator is 0 (nothing to find and nothing found)."""
    return {
        "precision": true_positives / instances if instances else 1.0,
        "recall": true_positives / objects if objects else 1.0,
        "f1": 2 * true_positives / (instances + objects) if instances + objects else 1.0,
    }


def _check_stored(dest: str, threshold: float, purpose: str) -> None:
    """ValueError if ``threshold`` is below the run's own score threshold (never stored)."""
    run_threshold = commit.read_json(storage.join(dest, "run.json"))["settings"]["score_threshold"]
    if threshold < run_threshold:
        raise ValueError(
            f"the run kept only scores >= {run_threshold}; {purpose} {threshold}, "
            f"segment again with --score-threshold {threshold} or lower"
        )


def _object_masks(coco: COCO, image_id: int) -> list[dict]:
    """COCO RLEs of an image's objects, whatever their stored form; crowd regions left out, as the
    counts leave them out (:func:`ground_truth_counts`)."""
    return [coco.annToRLE(a) for a in coco.imgToAnns.get(int(image_id), []) if not a.get("iscrowd", 0)]


def _ranked_detections(detections: list[dict], gt_ids) -> dict[int, tuple[np.ndarray, list[dict]]]:
    """Per ground-truth image ``gt_ids`` (those without an instance too): its ``detections``'
    (:func:`detections_from_instances`) scores (float64, descending) and COCO RLEs in the image's
    own frame, in that order."""
    ranked: dict[int, tuple[list, list]] = {int(i): ([], []) for i in gt_ids}
    for detection in sorted(detections, key=lambda d: -d["score"]):
        scores, rles = ranked[detection["image_id"]]
        scores.append(detection["score"])
        rles.append(detection["segmentation"])
    return {gt_id: (np.asarray(scores, np.float64), rles) for gt_id, (scores, rles) in ranked.items()}


def match_masks(predicted: list[dict], truth: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Greedy one-to-one matching of one image's predictions to its objects at mask IoU >= :data:`MATCH_IOU`.

    Args:
        predicted: COCO RLEs by descending score (each takes the best object still free).
        truth: the objects' COCO RLEs, same image size.

    Returns:
        ``(match, best)``, int64 and float64 of length ``len(predicted)``: the object index
        each prediction took (-1: none) and its highest IoU with any object, taken or not.
    """
    match = np.full(len(predicted), -1, np.int64)
    if not predicted or not truth:
        return match, np.zeros(len(predicted))
    iou = np.atleast_2d(mask_utils.iou(predicted, truth, [0] * len(truth)))
    taken = np.zeros(len(truth), bool)
    for i, row in enumerate(iou):
        candidates = np.where(taken, -1, row)
        j = int(np.argmax(candidates))
        if candidates[j] >= MATCH_IOU:
            taken[j] = True
            match[i] = j
    return match, iou.max(axis=1)


def equivalent_diameters(rles: list[dict]) -> np.ndarray:
    """Diameter (px, float64) of the disk with each mask's area."""
    # One call per mask: pycocotools' area() of a list overflows past 255 masks.
    area = np.array([mask_utils.area(rle) for rle in rles], np.float64)
    return 2 * np.sqrt(area / np.pi)


def touching_objects(truth: list[dict]) -> np.ndarray:
    """Per object (COCO RLEs of one image): does it overlap another or lie within 1 px (8-neighbours)?"""
    if len(truth) < 2:
        return np.zeros(len(truth), bool)
    crops, cover = _object_crops(truth, pad=1)
    touching = np.zeros(len(truth), bool)
    for k, (mask, x0, y0) in enumerate(crops):
        h, w = mask.shape
        others = cover[y0 : y0 + h, x0 : x0 + w] > mask
        touching[k] = bool((_dilated(mask, 1) & others).any())
    return touching


def _object_crops(truth: list[dict], pad: int) -> tuple[list[tuple[np.ndarray, int, int]], np.ndarray]:
    """Each object (COCO RLEs of one image) decoded in its box grown by ``pad`` px (clipped to the
    image): ``(mask uint8, x0, y0)``; and how many objects cover each pixel (uint16, H x W)."""
    height, width = truth[0]["size"]
    cover = np.zeros((height, width), np.uint16)
    crops = []
    for rle in truth:
        x, y, w, h = mask_utils.toBbox(rle)
        x0, y0 = max(int(x) - pad, 0), max(int(y) - pad, 0)
        x1, y1 = min(int(np.ceil(x + w)) + pad, width), min(int(np.ceil(y + h)) + pad, height)
        mask = decode_box(rle, x0, y0, x1, y1)
        cover[y0:y1, x0:x1] += mask
        crops.append((mask, x0, y0))
    return crops, cover


@dataclass
class Outcomes:
    """What became of each labelled object and each stored instance of a run, at mask IoU 0.5.

    ``objects``: one row per labelled object: ``diameter`` (px), ``contrast`` (:func:`object_contrast`,
    NaN where unmeasured), ``relative_contrast`` (over the median of its image's objects),
    ``touching`` (bool), ``found`` (bool); ``false_kinds``: per unmatched instance ``duplicate``,
    ``near miss`` or ``background``; ``instances``: the instances kept.
    """

    objects: pd.DataFrame
    false_kinds: list[str]
    instances: int


def outcomes(dest: str, annotations: str, *, score_threshold: float | None = None) -> Outcomes:
    """Match a run's instances to its objects (greedy by score, mask IoU :data:`MATCH_IOU`) and
    measure each object (size, contrast on the channel the run's model saw: its ``--channel``,
    else its card's; objects walled in by others, or whose image cannot be read whole, NaN).

    Args:
        score_threshold: instances kept (default: every instance the run stored).

    Raises:
        ValueError: ``score_threshold`` below the run's own (those were never stored).
    """
    matched = load(dest, annotations, score_threshold=score_threshold)
    coco, instances = matched.coco, matched.instances
    ranked = _ranked_detections(detections_from_instances(instances, coco), matched.images["gt_id"])
    uris = dict(zip(matched.images["gt_id"], matched.images["uri"], strict=True))
    channel = _channel_the_model_saw(commit.read_json(storage.join(dest, "run.json")))
    objects, kinds = [], []
    for gt_id in sorted(ranked):
        truth = _object_masks(coco, gt_id)
        match, best = match_masks(ranked[gt_id][1], truth)
        found = np.zeros(len(truth), bool)
        found[match[match >= 0]] = True
        contrast = _contrast_in_image(uris[gt_id], channel, truth)
        objects.append(
            pd.DataFrame(
                {
                    "diameter": equivalent_diameters(truth),
                    "contrast": contrast,
                    "relative_contrast": _relative_to_median(contrast),
                    "touching": touching_objects(truth),
                    "found": found,
                }
            )
        )
        unmatched = best[match < 0]
        kinds += np.select(
            [unmatched >= MATCH_IOU, unmatched >= NEAR_MISS_IOU], ["duplicate", "near miss"], "background"
        ).tolist()
    return Outcomes(pd.concat(objects, ignore_index=True), kinds, len(instances))


def faint_recall(objects: pd.DataFrame, below: float = FAINT_CONTRAST) -> dict[str, float | None]:
    """How many of :attr:`Outcomes.objects` are faint (contrast under ``below``) and the recall of
    those and of the rest: ``faint_share`` (of the measured objects), ``recall_faint``,
    ``recall_rest`` (None where there is no such object)."""
    measured = objects[objects["contrast"].notna()]
    faint = measured["contrast"] < below

    def recall(part: pd.DataFrame) -> float | None:
        return float(part["found"].mean()) if len(part) else None

    return {
        "faint_share": float(faint.mean()) if len(measured) else None,
        "recall_faint": recall(measured[faint]),
        "recall_rest": recall(measured[~faint]),
    }


def misses(
    dest: str, annotations: str, *, score_threshold: float | None = None, bands: int = 5
) -> dict[str, pd.DataFrame]:
    """Where a run's errors are (:func:`outcomes`), as tables.

    Args:
        score_threshold: instances kept (default: every instance the run stored).
        bands: object size bands, quantiles of the objects' equivalent diameters.

    Returns:
        ``recall``: per size band (``diameter_px``, "8-10" px, and a last row ``all``): objects
        and recall of the isolated ones, of those touching or overlapping another, of all;
        ``recall_by_contrast``: the same per band of :func:`object_contrast` (``contrast_to_noise``,
        fixed bands :data:`CONTRAST_EDGES`), objects without a contrast in a band ``unmeasured``;
        ``recall_by_relative_contrast``: the same per band of each object's contrast over the
        median of its image's objects (``contrast_relative_to_median``, fixed bands
        :data:`RELATIVE_CONTRAST_EDGES`: a dim nucleus among bright ones);
        ``false_instances``: the unmatched instances by kind, ``duplicate`` (IoU >= 0.5 with an
        object a higher-scoring instance took), ``near miss`` (best IoU :data:`NEAR_MISS_IOU`
        to 0.5), ``background``, with their count and share of all instances.

    Raises:
        ValueError: ``score_threshold`` below the run's own (those were never stored).
    """
    outcome = outcomes(dest, annotations, score_threshold=score_threshold)
    objects = outcome.objects
    false_instances = (
        pd.Series(outcome.false_kinds, dtype="object")
        .value_counts()
        .reindex(["duplicate", "near miss", "background"], fill_value=0)
        .rename_axis("kind")
        .reset_index(name="instances")
    )
    false_instances["share"] = false_instances["instances"] / max(outcome.instances, 1)
    return {
        "recall": _recall_by_size(objects, bands),
        "recall_by_contrast": _recall_by_fixed_bands(
            objects, "contrast", CONTRAST_EDGES, "contrast_to_noise"
        ),
        "recall_by_relative_contrast": _recall_by_fixed_bands(
            objects, "relative_contrast", RELATIVE_CONTRAST_EDGES, "contrast_relative_to_median"
        ),
        "false_instances": false_instances,
    }


def object_contrast(values: np.ndarray, truth: list[dict]) -> np.ndarray:
    """Contrast-to-noise ratio of each object of one image: how far it stands out of its surroundings.

    (mean of the object's pixels - median of its background ring, :data:`CONTRAST_RING_PX`) / the
    image's pixel noise (:func:`pipeline.preprocess.noise_sigma` over the pixels more than
    ``CONTRAST_RING_PX[0]`` px from every object; for integer types at least one grey level, so
    on clean 8-bit images it reads low). About 1: an object as bright above its surroundings as
    one pixel's noise; blur that spills light into the ring lowers it.

    Args:
        values: (H, W) raw intensities, any numeric type.
        truth: COCO RLEs of the image's objects, each of size (H, W).

    Returns:
        float64 (len(truth),); NaN for an object with no background ring (walled in by others).
    """
    if not truth:
        return np.zeros(0)
    inner, outer = CONTRAST_RING_PX
    crops, count = _object_crops(truth, pad=outer)
    cover = count > 0
    noise = preprocess.noise_sigma(values, where=~_dilated(cover.view(np.uint8), inner))
    intensity = values.astype(np.float64)
    contrast = np.full(len(truth), np.nan)
    for k, (mask, x0, y0) in enumerate(crops):
        h, w = mask.shape
        ring = _dilated(mask, outer) & ~_dilated(mask, inner - 1) & ~cover[y0 : y0 + h, x0 : x0 + w]
        window = intensity[y0 : y0 + h, x0 : x0 + w]
        if ring.any() and mask.any() and noise > 0:
            contrast[k] = (window[mask.astype(bool)].mean() - np.median(window[ring])) / noise
    return contrast


def _dilated(mask: np.ndarray, radius: int) -> np.ndarray:
    """bool: ``mask`` (uint8) grown by ``radius`` px in chessboard distance."""
    return cv2.dilate(mask, np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)).astype(bool)


def _channel_the_model_saw(run: dict) -> str | int:
    """The run's ``--channel``, else its model card's channel, else ``"max"`` (from ``run.json``)."""
    channel = run["settings"].get("channel")
    if channel is None:
        channel = run.get("model", {}).get("card", {}).get("preprocessing", {}).get("channel")
    return "max" if channel is None else channel


def _contrast_in_image(uri: str, channel: str | int, truth: list[dict]) -> np.ndarray:
    """:func:`object_contrast` of an image's objects on ``channel`` (three channels, as ``"rgb"``
    gives: their maximum); NaN for each if the image cannot be read whole (a slide larger than
    :data:`CONTRAST_MAX_PIXELS`)."""
    try:
        raw = _whole_image(uri, CONTRAST_MAX_PIXELS)
    except ValueError:
        raw = None
    if not isinstance(raw, RawImage):
        return np.full(len(truth), np.nan)
    values = preprocess.select_channels(raw.pixels, channel, raw.channel_names)
    return object_contrast(values.max(axis=2) if values.ndim == 3 else values, truth)


def _relative_to_median(contrast: np.ndarray) -> np.ndarray:
    """Each object's contrast over the median contrast of its image's objects (NaN where that median is
    not positive): how dim a nucleus is beside the others of its image."""
    finite = contrast[np.isfinite(contrast)]
    median = float(np.median(finite)) if len(finite) else np.nan
    return contrast / median if median > 0 else np.full(len(contrast), np.nan)


def _recall_by_size(objects: pd.DataFrame, bands: int) -> pd.DataFrame:
    """:func:`_recall_table` per diameter band (``bands`` quantile edges of the objects' diameters)."""
    if objects.empty:
        return _recall_table(objects, np.zeros(0, int), [], "diameter_px")
    edges = np.unique(np.quantile(objects["diameter"], np.linspace(0, 1, bands + 1)))
    last = max(len(edges) - 2, 0)
    band = np.clip(np.searchsorted(edges, objects["diameter"], side="right") - 1, 0, last)
    return _recall_table(objects, band, _band_names(edges), "diameter_px")


def _recall_by_fixed_bands(
    objects: pd.DataFrame, column: str, edges: tuple[float, ...], name: str
) -> pd.DataFrame:
    """:func:`_recall_table` per band of ``column`` between fixed ``edges`` ("under 1", "1-2", ...,
    "128 and over"), then the objects without a value (``unmeasured``)."""
    text = [f"{edge:g}" for edge in edges]
    inner = [f"{low}-{high}" for low, high in itertools.pairwise(text)]
    names = [f"under {text[0]}", *inner, f"{text[-1]} and over"]
    band = np.searchsorted(edges, objects[column].to_numpy(), side="right")
    band = np.where(objects[column].notna(), band, len(names))
    return _recall_table(objects, band, [*names, "unmeasured"], name)


def _recall_table(objects: pd.DataFrame, band: np.ndarray, names: list[str], column: str) -> pd.DataFrame:
    """Objects and recall of each band (``band``: an index into ``names`` per object) that has
    objects, isolated / touching / all, named in ``column``; a last row ``all``."""
    if objects.empty:
        return pd.DataFrame(columns=[column, "objects", "recall"])

    def summary(group: pd.DataFrame) -> dict:
        row = {}
        for kind, part in (("isolated", group[~group["touching"]]), ("touching", group[group["touching"]])):
            row[f"{kind}_objects"] = len(part)
            row[f"{kind}_recall"] = part["found"].mean() if len(part) else np.nan
        row["objects"], row["recall"] = len(group), group["found"].mean()
        return row

    rows = [
        {column: name, **summary(objects[band == b])} for b, name in enumerate(names) if (band == b).any()
    ]
    return pd.DataFrame([*rows, {column: "all", **summary(objects)}])


def _band_names(edges: np.ndarray) -> list[str]:
    """Names ("8-10") of the bands between consecutive ``edges`` (one edge: that value), with
    the fewest decimals (0 to 2) that tell every edge apart, so narrow bands ("6.4-6.9") keep
    distinct names."""
    for digits in (0, 1, 2):
        text = [f"{edge:.{digits}f}" for edge in edges]
        if len(set(text)) == len(text):
            break
    if len(text) == 1:
        return text
    return [f"{low}-{high}" for low, high in itertools.pairwise(text)]


def labelled_images(folder: str | Path, suffix: str = "_labels") -> list[tuple[Path, Path]]:
    """(image, label image) pairs under ``folder``, in one of two layouts.

    * Beside: a label image ``NAME{suffix}.EXT`` annotates the image ``NAME.EXT`` beside it or, if
      there is none, the one image ``NAME.*`` of another format (PNG images with TIFF label images).
    * Folders: when ``folder`` holds ``images/`` and ``masks/`` (StarDist's and the Cell Tracking
      Challenge's layout), ``masks/a/NAME.*`` annotates ``images/a/NAME.*``, by the same rule.

    A label image that could annotate several images is skipped.
    """
    folder = Path(folder)
    images_dir, masks_dir = folder / "images", folder / "masks"
    if images_dir.is_dir() and masks_dir.is_dir():
        images, labels, suffix = _image_files(images_dir), _image_files(masks_dir), ""
        image_root, label_root = images_dir, masks_dir
    else:
        images = labels = _image_files(folder)
        image_root = label_root = folder
    by_name: dict[tuple[Path, str], list[Path]] = collections.defaultdict(list)
    for path in images:
        by_name[path.parent.relative_to(image_root), path.stem].append(path)
    pairs = []
    for label_path in labels:
        if not label_path.stem.endswith(suffix):
            continue
        name = label_path.stem[: len(label_path.stem) - len(suffix)]
        chosen = _counterparts(by_name.get((label_path.parent.relative_to(label_root), name), []), label_path)
        if len(chosen) == 1:
            pairs.append((chosen[0], label_path))
    return pairs


def _counterparts(candidates: list, other) -> list:
    """Which of ``candidates`` (files or URIs of one name in any image format) pair with ``other``:
    the one in ``other``'s format if there is one, else all of them (one: the pair; several: no
    pair can be told)."""
    same_format = [c for c in candidates if PurePosixPath(str(c)).suffix == PurePosixPath(str(other)).suffix]
    return same_format if len(same_format) == 1 else candidates


def _image_files(folder: Path) -> list[Path]:
    """The files under ``folder`` (recursive) with an image extension, sorted."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def label_images_to_coco(folder: str | Path, dest: str | Path, *, suffix: str = "_labels") -> Path:
    """An archive with COCO ground truth from a folder of images with instance label images.

    ``NAME.png`` (any image format) is annotated by ``NAME{suffix}.png`` or
    ``NAME{suffix}.tif`` beside it, or by ``masks/NAME.*`` when the images are
    under ``images/`` (see :func:`labelled_images`), an integer label
    image (0 background, one id per object). Each annotated
    image is copied to ``dest`` (same relative path; label images are not, so
    ``dest`` can be segmented as it is), and ``dest/annotations.json`` is
    written (one class, ``nucleus``). Returns its path.

    Raises:
        ValueError: no image with a label image in ``folder``, or an unreadable label image.
    """
    folder, dest = Path(folder), Path(dest)
    images, annotations = [], []
    for image_path, label_path in labelled_images(folder, suffix):
        label_map = read_label_image(str(label_path))
        relative = image_path.relative_to(folder)
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        (dest / relative).write_bytes(image_path.read_bytes())
        _append_labelled(images, annotations, str(relative), label_map)
    if not images:
        raise ValueError(
            f"no image with a '{suffix}' label image beside it, nor images/ and masks/ folders, "
            f"under {folder}"
        )
    path = dest / "annotations.json"
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "nucleus"}]}
    path.write_text(json.dumps(coco))
    return path


def read_label_image(uri: str) -> np.ndarray:
    """An instance label image as (H, W) int64: 0 background, one positive id per object.

    Any format the pipeline decodes (PNG, 8/16/32-bit TIFF, float TIFFs holding whole numbers).

    Raises:
        ValueError: unreadable, more than one channel (a colour rendering of labels is not a label
            image), or values that are negative or not whole numbers.
    """
    labels = read_and_decode(uri, max_pixels=2**40)
    if isinstance(labels, DecodeError):
        raise ValueError(f"cannot read label image {storage.redact(uri)}: {labels.kind}: {labels.message}")
    pixels = labels.pixels
    if pixels.shape[2] != 1:
        raise ValueError(
            f"label image {storage.redact(uri)} has {pixels.shape[2]} channels, expected 1 "
            "(an integer image: 0 background, one id per object)"
        )
    values = pixels[..., 0]
    label_map = values.astype(np.int64)
    if (label_map < 0).any() or (np.issubdtype(values.dtype, np.floating) and (label_map != values).any()):
        raise ValueError(
            f"label image {storage.redact(uri)} holds negative or fractional values; "
            "expected 0 for background and a positive whole-number id per object"
        )
    return label_map


def label_image_annotations(label_map: np.ndarray) -> list[dict]:
    """COCO annotations of an instance label image, one per object id in increasing order, each
    with ``category_id`` 1, ``segmentation`` (compressed RLE, ASCII counts), ``area`` (px) and
    ``bbox`` (x, y, w, h px) and ``iscrowd`` 0; no ``id`` or ``image_id``.

    Each object is encoded in its own box (:func:`pipeline.masks.rle_strings`: the same strings
    as ``pycocotools.mask.encode`` of the whole-image mask), so the work is O(image + boxes),
    not O(image x objects).

    Args:
        label_map: (H, W) non-negative integers, 0 background; ids need not be consecutive.
    """
    rows, cols = np.nonzero(label_map)
    if not len(rows):
        return []
    ids, owner = np.unique(label_map[rows, cols], return_inverse=True)
    order = np.argsort(owner, kind="stable")
    starts = np.searchsorted(owner[order], np.arange(len(ids)))
    x0, x1 = np.minimum.reduceat(cols[order], starts), np.maximum.reduceat(cols[order], starts) + 1
    y0, y1 = np.minimum.reduceat(rows[order], starts), np.maximum.reduceat(rows[order], starts) + 1
    crops = [
        masks.Crop(label_map[top:bottom, left:right] == value, int(left), int(top))
        for value, left, top, right, bottom in zip(ids, x0, y0, x1, y1, strict=True)
    ]
    atlas = masks.CropAtlas.pack(crops)
    counts = masks.rle_strings(masks.ColumnRuns.of(atlas), len(crops), label_map.shape)
    height, width = label_map.shape
    return [
        {
            "category_id": 1,
            "segmentation": {"size": [height, width], "counts": rle},
            "area": float(crop.mask.sum()),
            "bbox": [float(crop.x0), float(crop.y0), float(crop.mask.shape[1]), float(crop.mask.shape[0])],
            "iscrowd": 0,
        }
        for crop, rle in zip(crops, counts, strict=True)
    ]


def _append_labelled(
    images: list[dict], annotations: list[dict], file_name: str, label_map: np.ndarray
) -> None:
    """Add an image and the objects of its label image (:func:`label_image_annotations`) to a COCO
    file's ``images`` and ``annotations`` lists, numbering both on from their lengths."""
    height, width = label_map.shape
    image_id = len(images) + 1
    images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
    for annotation in label_image_annotations(label_map):
        annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})


def label_images_for_run(dest: str, labels: str, *, suffix: str = "") -> dict:
    """COCO ground truth (a dict) for a run's images from instance label images in another folder.

    The image ``SOURCE/a/b/NAME.ext`` of the run is annotated by ``labels/a/b/NAME{suffix}.*``
    (any image format; with several, the one with the image's own extension): the layout of
    StarDist's and Cellpose's ``images/`` and ``masks/`` folders (``suffix`` "") and of
    label images named ``NAME_labels`` (``suffix`` "_labels"). Images of the run without a
    label image are left out of the truth (not scored); one class, named after the run's
    model's first class.

    Raises:
        ValueError: a slide run (its truth is in level-0 coordinates: give COCO annotations),
            no label image for any image of the run, two label images for one image, a label
            image of another size than its image, or an unreadable one (:func:`read_label_image`).
    """
    run = commit.read_json(storage.join(dest, "run.json"))
    if run.get("slides"):
        raise ValueError("label images annotate tiles; a slide run needs COCO annotations in level-0 pixels")
    source = run["settings"]["source"].rstrip("/") + "/"
    root = labels.rstrip("/") + "/"
    by_key: dict[str, list[str]] = collections.defaultdict(list)
    for uri in plan.iter_images(labels):
        by_key[str(PurePosixPath(uri[len(root) :]).with_suffix(""))].append(uri)
    images, annotations = [], []
    table = read_table(dest, "images")
    for row in table[table["status"] == "ok"].itertuples():
        relative = PurePosixPath(row.uri[len(source) :])
        candidates = _counterparts(by_key.get(str(relative.with_suffix("")) + suffix, []), relative)
        if len(candidates) > 1:
            raise ValueError(f"{len(candidates)} label images for {relative}: {', '.join(candidates)}")
        if not candidates:
            continue
        label_map = read_label_image(candidates[0])
        if label_map.shape != (row.height, row.width):
            raise ValueError(
                f"label image {storage.redact(candidates[0])} is {label_map.shape[1]} x "
                f"{label_map.shape[0]} px, its image {relative} {row.width} x {row.height}"
            )
        _append_labelled(images, annotations, str(relative), label_map)
    if not images:
        raise ValueError(
            f"no label image under {storage.redact(labels)} for any image of the run "
            f"(looked for the image's relative path with '{suffix}' before any image extension)"
        )
    classes = run.get("model", {}).get("card", {}).get("classes") or ["object"]
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": classes[0]}]}


def plot_sweep(table: pd.DataFrame, path: str) -> None:
    """Two panels: instance count (with the ground-truth count) and precision / recall / F1 against
    threshold, the F1-best threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    left.plot(table["score_threshold"], table["instances"], "o-", label="instances found")
    left.axhline(table["ground_truth"].iloc[0], color="grey", ls="--", label="ground truth")
    left.set(xlabel="score threshold", ylabel="instances", title="Count against threshold")
    left.legend()
    right.plot(table["score_threshold"], table["precision"], "o-", label="precision")
    right.plot(table["score_threshold"], table["recall"], "s-", label="recall")
    best = table.loc[table["f1"].idxmax()]
    right.plot(table["score_threshold"], table["f1"], "^-", label=f"F1 (best {best['score_threshold']:g})")
    right.axvline(best["score_threshold"], color="grey", ls=":")
    right.set(xlabel="score threshold", ylim=(0, 1.02), title="Precision / recall / F1 at mask IoU 0.5")
    right.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
