"""One model replica's work on one shard: decode, batched inference, box-local encode.

The three stages overlap inside a replica:

* read + decode run ahead of inference in a thread pool, at most
  ``prefetch`` images in flight (Pillow, OpenCV and storage reads release the GIL);
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
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import torch

from pipeline import masks, postprocess
from pipeline.decode import DecodeError, one_line, read_and_decode
from pipeline.infer import Detections, autocast_dtype, detect
from pipeline.model import ModelCard, build_model, configure
from schemas import IMAGES, instances_schema

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(
    executor: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], depth: int
) -> Iterator[R]:
    """``map(fn, items)`` on ``executor`` with at most ``depth`` calls in flight, results in order."""
    pending: collections.deque[Future] = collections.deque()
    for item in items:
        if len(pending) >= depth:
            yield pending.popleft().result()
        pending.append(executor.submit(fn, item))
    while pending:
        yield pending.popleft().result()


@dataclass(frozen=True)
class InferenceSettings:
    """What the replica needs besides the weights (all pinned in run.json except batch_size)."""

    score_threshold: float
    mask_threshold: float
    max_detections: int
    batch_size: int
    max_pixels: int
    overlap_threshold: float = 1.0
    exclusive_pixels: bool = False


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
        configure(model, score_threshold=settings.score_threshold, max_detections=settings.max_detections)
        self.model = model.eval().to(self.device)
        self.autocast = autocast_dtype(self.device)
        self.prefetch = prefetch or max(2 * settings.batch_size, 4)
        io_threads = min(8, max(2, os.cpu_count() or 2))
        self._decode_pool = ThreadPoolExecutor(io_threads, thread_name_prefix="decode")
        self._encode_pool = ThreadPoolExecutor(max(1, io_threads // 2), thread_name_prefix="encode")
        self._device_lock = threading.Lock()

    def to_device(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """uint8 (H, W, 3) arrays of one size -> float (3, H, W) in [0, 1] on the device.

        On CUDA the batch goes through pinned memory with a non-blocking copy.
        """
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        return list(batch.float().div_(255))

    def infer(self, arrays: list[np.ndarray]) -> list[Detections | DecodeError]:
        """Detections per image of a same-size batch of uint8 (H, W, 3) arrays.

        If the batch raises, each image is retried alone; an image that still
        raises gets a ``DecodeError("inference", ...)`` instead of detections.

        The retry runs after the device lock is released (the lock is not reentrant).
        """
        with self._device_lock:
            try:
                return list(detect(self.model, self.to_device(arrays), autocast=self.autocast))
            except (RuntimeError, ValueError) as exc:
                if len(arrays) == 1:
                    return [DecodeError("inference", one_line(exc))]
        return [self.infer([a])[0] for a in arrays]

    def _encode(self, row: dict, size: tuple[int, int], detections: Detections) -> dict[str, Any]:
        """Columns of the image's instances, and how many detections were dropped and why.

        Order of operations: paste and threshold, suppress overlapping
        duplicates, make pixels exclusive (if set), encode, drop empty masks.
        """
        order = torch.argsort(-detections.scores, stable=True)
        boxes, labels = detections.boxes[order], detections.labels[order]
        scores, probs = detections.scores[order], detections.mask_probs[order]
        crops = masks.paste_on_device(probs, boxes, size, self.settings.mask_threshold)
        boxes, labels, scores = (t.cpu().numpy() for t in (boxes, labels, scores))
        kept = postprocess.suppress_overlaps(crops, self.settings.overlap_threshold)
        crops = [crop for crop, keep in zip(crops, kept, strict=True) if keep]
        boxes, labels, scores = boxes[kept], labels[kept], scores[kept]
        if self.settings.exclusive_pixels:
            crops = postprocess.exclusive_pixels(crops)
        encoded = masks.encode_crops(crops, size)
        nonempty = encoded.area > 0
        encoded = encoded.filter(nonempty)
        boxes, labels, scores = boxes[nonempty], labels[nonempty], scores[nonempty]
        n = len(encoded)
        return {
            "n_empty_masks": int((~nonempty).sum()),
            "n_suppressed": int((~kept).sum()),
            "columns": {
                "image_id": [row["image_id"]] * n,
                "uri": [row["uri"]] * n,
                "slide_id": [row["slide_id"]] * n,
                "shard_id": [row["shard_id"]] * n,
                "instance_id": np.arange(n, dtype=np.int32),
                "label": labels.astype(np.int16),
                "class_name": [self._class_name(int(k)) for k in labels],
                "score": scores.astype(np.float32),
                "x0": boxes[:, 0],
                "y0": boxes[:, 1],
                "x1": boxes[:, 2],
                "y1": boxes[:, 3],
                "area": encoded.area,
                "centroid_x": encoded.centroid[:, 0],
                "centroid_y": encoded.centroid[:, 1],
                "perimeter": encoded.perimeter,
                "height": np.full(n, size[0], np.int32),
                "width": np.full(n, size[1], np.int32),
                "rle": encoded.rle,
                "polygon": encoded.polygon,
            },
        }

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
        buckets: dict[tuple[int, int], list[tuple[dict, np.ndarray]]] = {}

        def decode(row: dict):
            t = time.perf_counter()
            result = read_and_decode(row["uri"], max_pixels=self.settings.max_pixels)
            return result, time.perf_counter() - t

        def run_batch(batch: list[tuple[dict, np.ndarray]]):
            t = time.perf_counter()
            results = self.infer([array for _, array in batch])
            timings["infer_s"] += time.perf_counter() - t
            for (row, array), result in zip(batch, results, strict=True):
                if isinstance(result, DecodeError):
                    status[row["image_id"]].update(status=result.kind, error=result.message)
                    continue
                while len(encoding) >= self.prefetch:  # bounded encode queue
                    encoding.popleft().result()
                future = self._encode_pool.submit(self._timed_encode, row, array.shape[:2], result)
                encoded[row["image_id"]] = future
                encoding.append(future)

        for row, (result, seconds) in zip(
            rows, bounded_map(self._decode_pool, decode, rows, self.prefetch), strict=True
        ):
            timings["decode_s"] += seconds
            if isinstance(result, DecodeError):
                status[row["image_id"]] = {"status": result.kind, "error": result.message}
                continue
            status[row["image_id"]] = {"status": "ok", "height": result.shape[0], "width": result.shape[1]}
            bucket = buckets.setdefault(result.shape[:2], [])
            bucket.append((row, result))
            if len(bucket) == self.settings.batch_size:
                run_batch(buckets.pop(result.shape[:2]))
        for key in list(buckets):
            run_batch(buckets.pop(key))

        instance_columns: dict[str, list] = collections.defaultdict(list)
        image_rows = []
        for row in rows:
            info = status[row["image_id"]]
            n_instances = n_empty = n_suppressed = 0
            if row["image_id"] in encoded:
                result, seconds = encoded[row["image_id"]].result()
                timings["encode_s"] += seconds
                n_empty, n_suppressed = result["n_empty_masks"], result["n_suppressed"]
                for name, values in result["columns"].items():
                    instance_columns[name].append(values)
                n_instances = len(result["columns"]["rle"])
            image_rows.append(
                {
                    **{k: row[k] for k in ("image_id", "uri", "slide_id", "shard_id")},
                    "status": info["status"],
                    "error": info.get("error"),
                    "height": info.get("height"),
                    "width": info.get("width"),
                    "n_instances": n_instances,
                    "n_empty_masks": n_empty,
                    "n_suppressed": n_suppressed,
                }
            )
        instances = _instances_table(instance_columns)
        images = pa.Table.from_pylist(image_rows, schema=IMAGES)
        errors = collections.Counter(r["status"] for r in image_rows if r["status"] != "ok")
        summary = {
            "images": len(image_rows),
            "images_ok": len(image_rows) - sum(errors.values()),
            "image_errors": dict(errors),
            "instances": instances.num_rows,
            "device": str(self.device),
            "batch_size": self.settings.batch_size,
            "timings_s": {
                k: round(v, 3) for k, v in {**timings, "total_s": time.perf_counter() - started}.items()
            },
        }
        return ShardOutput(instances, images, summary)

    def _timed_encode(self, row: dict, size, detections: Detections) -> tuple[dict[str, Any], float]:
        t = time.perf_counter()
        return self._encode(row, size, detections), time.perf_counter() - t


def _instances_table(columns: dict[str, list]) -> pa.Table:
    schema = instances_schema()
    if not columns:
        return schema.empty_table()
    arrays = []
    for field in schema:
        parts = columns[field.name]
        values = np.concatenate(parts) if isinstance(parts[0], np.ndarray) else [v for p in parts for v in p]
        arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
