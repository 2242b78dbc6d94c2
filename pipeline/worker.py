"""One model replica's work on one shard: decode, batched inference, box-local encode.

The three stages overlap inside a replica:

* read + decode + preprocessing (the model card's, :mod:`pipeline.preprocess`)
  run ahead of inference in a thread pool, at most ``prefetch`` images in
  flight (decoders, NumPy and storage reads release the GIL);
* inference takes batches of same-size images (so an image's result never
  depends on its batch neighbours' sizes) under a lock (one forward at a
  time on the device, even with two shards in flight);
* encoding (RLE, polygons, measurements) runs in another thread pool while
  the next batch is inferred, at most ``prefetch`` images queued.

All queues are bounded, so memory depends on batch size and prefetch depth,
never on the shard or archive size. :class:`ShardProcessor` has no Ray
dependency; :mod:`pipeline.segment` wraps it in a Ray actor.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline import masks, paste, postprocess, tta
from pipeline.card import InferenceSettings, ModelCard
from pipeline.columns import InstanceColumns
from pipeline.concurrency import bounded_map
from pipeline.decode import DecodeError, RawImage, one_line
from pipeline.infer import Detections, autocast_dtype, automatic_scale
from pipeline.inputs import Input, InputReader
from pipeline.model import build_model, configure
from pipeline.preprocess import Intensity, PreprocessingError, model_input
from pipeline.windows import Grid, Window, cut_into_windows, owned_crops_in_image
from schemas import IMAGES, SCHEMA_VERSION, at_version, instances_schema

Found = Detections | tta.ViewDetections
"""What the model found on one input: its detections, or with ``--tta`` its views' detections."""


def _plain(found: Found) -> Detections:
    """The detections on the input as it is (one view)."""
    return found.plain if isinstance(found, tta.ViewDetections) else found


@dataclass
class ShardOutput:
    """A processed shard: its two tables (schemas ``instances`` and ``images``) and a summary dict."""

    instances: pa.Table
    images: pa.Table
    summary: dict[str, Any]


class ShardProcessor:
    """Holds one model replica and turns shards (manifest rows) into output tables.

    Args:
        card: the model card; weights: its state dict (numpy arrays or tensors).
        settings: thresholds, batch size, image size limit.
        device: "cuda" or "cpu"; threads: torch intra-op threads for this replica.
    """

    def __init__(
        self,
        card: ModelCard,
        weights: dict[str, Any],
        settings: InferenceSettings,
        *,
        device: str = "cpu",
        threads: int | None = None,
        prefetch: int | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.card = card
        self.settings = settings
        self.device = torch.device(device)
        model = build_model(card)
        model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
        self.views = tta.VIEWS[settings.tta]
        per_view_threshold = settings.score_threshold if len(self.views) == 1 else tta.VIEW_SCORE_FLOOR
        configure(model, score_threshold=per_view_threshold, max_detections=settings.max_detections)
        self.model = model.eval().to(self.device)
        self.autocast = autocast_dtype(self.device)
        self.prefetch = prefetch or max(2 * settings.batch_size, 4)
        io_threads = min(8, max(2, os.cpu_count() or 2))
        self._decode_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="decode")
        self._encode_pool = ThreadPoolExecutor(max(1, io_threads // 2), thread_name_prefix="encode")
        self._device_lock = threading.Lock()
        self.inputs = InputReader(max_pixels=settings.max_pixels, mpp_override=settings.slide_mpp_override)

    def to_device(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Model inputs float32 (C, H, W) of one size, C 1 or 3 -> float (3, H, W) on the device.

        On CUDA the batch goes through pinned memory with a non-blocking copy;
        one channel is replicated to three as a view, after the copy.
        """
        batch = torch.from_numpy(np.stack(arrays))
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return list(batch.expand(-1, 3, -1, -1))

    def prepare(self, row: dict) -> tuple[Input, np.ndarray] | DecodeError:
        """Read, decode and preprocess one manifest row: (input, model input float32 (C, H, W)).

        A slide's windows use the slide's normalisation (``intensity_*`` columns), images their own.

        A channel the image does not have (``--channel``) makes it ``unsupported``.
        """
        found = self.inputs.read(row)
        if isinstance(found, DecodeError):
            return found
        raw = found.raw
        slide_wide = row.get("intensity_scale") is not None
        intensity = Intensity(row["intensity_offset"], row["intensity_scale"]) if slide_wide else None
        try:
            array = model_input(
                raw.pixels, self.settings.preprocessing, channel_names=raw.channel_names, intensity=intensity
            )
            return found, array
        except PreprocessingError as exc:
            return DecodeError("unsupported", one_line(exc))

    def infer(self, arrays: list[np.ndarray], scale: float = 1.0) -> list[Found | DecodeError]:
        """Detections per image of a same-size batch of model inputs (C, H, W), resampled by ``scale``
        before the network (boxes in the inputs' own pixels).

        With test-time augmentation (``settings.tta``) the model runs on each view of the batch
        and an image's result holds its views' detections (fused later, where it is encoded).
        If the batch raises, each image is retried alone; an image that still
        raises gets a ``DecodeError("inference", ...)`` instead of detections.

        The retry runs after the device lock is released (the lock is not reentrant).
        """
        with self._device_lock:
            try:
                images = self.to_device(arrays)
                per_view = tta.detect_views(
                    self.model, images, self.views, autocast=self.autocast, scale=scale
                )
            except (RuntimeError, ValueError) as exc:
                if len(arrays) == 1:
                    return [DecodeError("inference", one_line(exc))]
            else:
                if len(self.views) == 1:
                    return per_view[0]
                return [tta.ViewDetections(views) for views in zip(*per_view, strict=True)]
        return [self.infer([a], scale)[0] for a in arrays]

    def infer_scaled(
        self, arrays: list[np.ndarray], kinds: list[str]
    ) -> tuple[list[Found | DecodeError], list[float]]:
        """:meth:`infer` at each input's scale: (detections, factors), in input order.

        ``kinds``: per input, ``"image"`` (a plain image sent whole), ``"window"`` (a window of a
        larger plain image) or ``"slide"`` (a slide's window, never resampled: ``--mpp`` chose its
        resolution). A fixed ``settings.scale`` applies to images and their windows; ``"auto"``
        runs everything at native size, then again, enlarged, the whole images whose objects
        were small (:func:`pipeline.infer.automatic_scale`; windows stay native). The sizes are
        those of detections scoring at least the card's ``score_threshold``, whatever the run's
        ``--score-threshold`` (a low one lets through fragments and specks that would look small);
        with ``--tta``, of the image as it is (one view), as without it.
        """
        smallest = self.card.object_diameter_px[0] if self.card.object_diameter_px else None
        confident = self.card.score_threshold
        if self.settings.scale == "auto":
            results = self.infer(arrays)
            factors = [
                automatic_scale(_plain(found).diameters(self.settings.mask_threshold, confident), smallest)
                if kind == "image" and smallest and not isinstance(found, DecodeError)
                else 1.0
                for kind, found in zip(kinds, results, strict=True)
            ]
        else:
            results = [None] * len(arrays)
            factors = [float(self.settings.scale) if kind != "slide" else 1.0 for kind in kinds]
        for factor in sorted(set(factors)):
            todo = [i for i, f in enumerate(factors) if f == factor and (results[i] is None or f != 1)]
            if todo:
                for i, found in zip(todo, self.infer([arrays[i] for i in todo], factor), strict=True):
                    results[i] = found
        return results, factors

    def _encode(
        self, row: dict, unit: Input, pieces: list[tuple[Window | None, Found]]
    ) -> tuple[InstanceColumns, dict]:
        """The image's instance rows (every field of the instances schema) and counts of dropped ones.

        ``pieces``: the image's detections, whole (one piece, window None), or
        per window of an image larger than ``tile_size`` (each window keeps
        what its core owns, its masks moved into the image).

        Order of operations: paste and threshold, suppress overlapping
        duplicates, make pixels exclusive (if set), encode and measure (on the
        raw pixels), drop empty masks; for a slide's window, keep what its core
        owns and move coordinates onto the slide (:func:`_onto_slide`).
        """
        raw = unit.raw
        parts = [self._pasted(raw, window, detections) for window, detections in pieces]
        found = parts[0] if len(parts) == 1 else _by_score(parts)
        kept = postprocess.suppress_overlaps(found["_crop"], self.settings.overlap_threshold)
        found = found.filter(kept)
        if self.settings.exclusive_pixels:
            found["_crop"] = postprocess.exclusive_pixels(found["_crop"])
        found.update(masks.encode_crops(found["_crop"], raw.size, raw.pixels))
        nonempty = found["area"] > 0
        found = found.filter(nonempty)
        counts = {
            "n_empty_masks": int((~nonempty).sum()),
            "n_suppressed": int((~kept).sum()),
            "n_cut": int(found["_touching"].sum()),
        }
        if unit.window is not None:
            found, counts["n_cut"] = _onto_slide(found, unit.window, unit.slide_size)
        n = len(found)
        found.update(
            InstanceColumns(
                length=n,
                image_id=[row["image_id"]] * n,
                uri=[row["uri"]] * n,
                slide_id=[row["slide_id"]] * n,
                shard_id=[row["shard_id"]] * n,
                instance_id=np.arange(n, dtype=np.int32),
                class_name=[self._class_name(int(k)) for k in found["label"]],
                height=np.full(n, raw.size[0], np.int32),
                width=np.full(n, raw.size[1], np.int32),
                tile_x0=np.full(n, row["tile_x0"], np.float64),
                tile_y0=np.full(n, row["tile_y0"], np.float64),
                tile_downsample=np.full(n, row["tile_downsample"], np.float64),
            )
        )
        um = self.pixel_size_um(raw) or np.nan
        found["area_um2"] = found["area"] * um**2
        for name in ("perimeter", "axis_major_length", "axis_minor_length"):
            found[f"{name}_um"] = found[name] * um
        return found, counts

    def _pasted(self, raw: RawImage, window: Window | None, found: Found) -> InstanceColumns:
        """One piece's detections (its views' fused first) by descending score, masks pasted in their
        boxes (in the image's frame: a window's are moved into the image and only those its core owns
        are kept)."""
        detections = found
        if isinstance(found, tta.ViewDetections):
            threshold, most = self.settings.score_threshold, self.settings.max_detections
            detections = found.fused(score_threshold=threshold, max_detections=most)
        order = torch.argsort(-detections.scores, stable=True)
        boxes = detections.boxes[order]
        size = raw.size if window is None else (window.size, window.size)
        crops = paste.paste_on_device(
            detections.mask_probs[order], boxes, size, self.settings.mask_threshold, self.settings.mask_paste
        )
        boxes = boxes.cpu().numpy()
        owned = touching = np.zeros(len(crops), bool)
        if window is not None:
            crops, owned, touching = owned_crops_in_image(crops, window, *raw.size)
            boxes = boxes + np.array([window.x, window.y, window.x, window.y], boxes.dtype)
        found = InstanceColumns(
            _crop=crops,
            _touching=touching,
            label=detections.labels[order].cpu().numpy().astype(np.int16),
            score=detections.scores[order].cpu().numpy().astype(np.float32),
            x0=boxes[:, 0],
            y0=boxes[:, 1],
            x1=boxes[:, 2],
            y1=boxes[:, 3],
        )
        return found if window is None else found.filter(owned)

    def pixel_size_um(self, raw: RawImage) -> float | None:
        """The image's pixel size in µm: the run's ``--pixel-size-um``, else the file's, else None."""
        return self.settings.pixel_size_um or raw.pixel_size_um

    def _class_name(self, label: int) -> str:
        classes = self.card.classes
        return classes[label - 1] if 1 <= label <= len(classes) else f"label_{label}"

    def process(self, rows: list[dict]) -> ShardOutput:
        """Segment the images of one shard (manifest rows, in manifest order).

        Every row yields exactly one ``images`` row (``ok`` or an error kind);
        a bad image never raises.
        """
        timings = collections.Counter()
        started = time.perf_counter()
        status: dict[int, dict[str, Any]] = {}
        encoded: dict[int, Future] = {}
        encoding: collections.deque[Future] = collections.deque()
        buckets: dict[tuple[int, int], list[tuple[dict, Input, Window | None, np.ndarray]]] = {}
        pieces: dict[int, list] = {}  # image_id -> [(window, detections)] as they come out of the model
        expected: dict[int, int] = {}

        def decode(row: dict):
            t = time.perf_counter()
            result = self.prepare(row)
            return result, time.perf_counter() - t

        def run_batch(batch: list[tuple[dict, Input, Window | None, np.ndarray]]):
            t = time.perf_counter()
            kinds = [
                "slide" if found.window is not None else "window" if window is not None else "image"
                for _, found, window, _ in batch
            ]
            results, factors = self.infer_scaled([array for *_, array in batch], kinds)
            timings["infer_s"] += time.perf_counter() - t
            for (row, found, window, _), result, factor in zip(batch, results, factors, strict=True):
                image_id = row["image_id"]
                status[image_id]["scale"] = factor
                if isinstance(result, DecodeError):
                    status[image_id].update(status=result.kind, error=result.message)
                    expected[image_id] = -1  # no encode for this image
                    continue
                pieces.setdefault(image_id, []).append((window, result))
                if len(pieces[image_id]) != expected[image_id]:
                    continue
                while len(encoding) >= self.prefetch:  # bounded encode queue
                    encoding.popleft().result()
                future = self._encode_pool.submit(self._timed_encode, row, found, pieces.pop(image_id))
                encoded[image_id] = future
                encoding.append(future)

        def add(item: tuple[dict, Input, Window | None, np.ndarray]) -> None:
            """Queue one model input; a full batch runs, and so does the fullest size's once more
            inputs wait than ``prefetch`` (so inputs of many sizes never pile up)."""
            size = item[3].shape[1:]
            bucket = buckets.setdefault(size, [])
            bucket.append(item)
            if len(bucket) == self.settings.batch_size:
                run_batch(buckets.pop(size))
            elif sum(len(b) for b in buckets.values()) > self.prefetch:
                run_batch(buckets.pop(max(buckets, key=lambda k: len(buckets[k]))))

        for row, (result, seconds) in zip(
            rows, bounded_map(self._decode_pool, decode, rows, self.prefetch), strict=True
        ):
            timings["decode_s"] += seconds
            if isinstance(result, DecodeError):
                status[row["image_id"]] = {"status": result.kind, "error": result.message}
                continue
            found, array = result
            raw = found.raw
            status[row["image_id"]] = {
                "status": "ok",
                "height": raw.size[0],
                "width": raw.size[1],
                "channels": list(raw.channel_names),
                "pixel_size_um": self.pixel_size_um(raw),
            }
            tile = self.settings.tile_size
            if found.window is None and tile and max(raw.size) > tile:
                cut = cut_into_windows(array, Grid(tile, self.settings.tile_overlap, 1.0))
            else:
                cut = [(None, array)]
            expected[row["image_id"]] = len(cut)
            for window, piece in cut:
                add((row, found, window, piece))
        for key in list(buckets):
            run_batch(buckets.pop(key))

        parts: list[InstanceColumns] = []
        image_rows = []
        for row in rows:
            info = status[row["image_id"]]
            dropped = {"n_empty_masks": 0, "n_suppressed": 0, "n_cut": 0}
            n_instances = 0
            if row["image_id"] in encoded:
                (found, dropped), seconds = encoded[row["image_id"]].result()
                timings["encode_s"] += seconds
                parts.append(found)
                n_instances = len(found)
            image_rows.append(
                {
                    **{k: row[k] for k in ("image_id", "uri", "slide_id", "shard_id")},
                    "status": info["status"],
                    "error": info.get("error"),
                    "height": info.get("height"),
                    "width": info.get("width"),
                    "n_instances": n_instances,
                    **dropped,
                    "channels": info.get("channels"),
                    "pixel_size_um": info.get("pixel_size_um"),
                    "scale": info.get("scale"),
                    **{k: row[k] for k in ("tile_x0", "tile_y0", "tile_downsample")},
                }
            )
        instances_at = instances_schema(self.settings.schema_version)
        if self.settings.schema_version != SCHEMA_VERSION:
            parts = [part.select(instances_at.names) for part in parts]
        instances = InstanceColumns.to_table(parts, instances_at)
        images = pa.Table.from_pylist(image_rows, schema=at_version(IMAGES, self.settings.schema_version))
        errors = collections.Counter(r["status"] for r in image_rows if r["status"] != "ok")
        summary = {
            "images": len(image_rows),
            "images_ok": len(image_rows) - sum(errors.values()),
            "image_errors": dict(errors),
            "instances": instances.num_rows,
            "instances_cut": sum(r["n_cut"] for r in image_rows),
            "device": str(self.device),
            "batch_size": self.settings.batch_size,
            "timings_s": {
                k: round(v, 3) for k, v in {**timings, "total_s": time.perf_counter() - started}.items()
            },
        }
        return ShardOutput(instances, images, summary)

    def _timed_encode(self, row: dict, found: Input, pieces: list[tuple[Window | None, Found]]):
        t = time.perf_counter()
        return self._encode(row, found, pieces), time.perf_counter() - t

    def close(self) -> None:
        """Close the slides this replica holds open."""
        self.inputs.close()


def _by_score(parts: list[InstanceColumns]) -> InstanceColumns:
    """The instances of several pieces of one image in one container, by descending score."""
    joined = InstanceColumns.concat(parts)
    return joined.take(np.argsort(-joined["score"], kind="stable"))


def _onto_slide(
    found: InstanceColumns, window: Window, slide_size: tuple[int, int]
) -> tuple[InstanceColumns, int]:
    """A window's instances that its core owns, with boxes, centroids and polygons in level-0 slide
    pixels (masks stay in the window's frame), and how many of them touch an inner window edge."""
    cx, cy = window.to_slide(found["centroid_x"], found["centroid_y"])
    width, height = slide_size
    owned = window.owns(cx, cy) & (cx < width) & (cy < height)
    found = found.filter(owned)
    cx, cy = cx[owned], cy[owned]
    x0, y0 = window.to_slide(found["x0"], found["y0"])
    x1, y1 = window.to_slide(found["x1"], found["y1"])
    touches = window.touches_inner_edge(found["_crop"], width, height)
    found.update(
        InstanceColumns(
            length=len(found),
            centroid_x=cx,
            centroid_y=cy,
            x0=x0.astype(np.float32),
            y0=y0.astype(np.float32),
            x1=x1.astype(np.float32),
            y1=y1.astype(np.float32),
            polygon=window.polygons_to_slide(found["polygon"]),
        )
    )
    return found, int(touches.sum())
