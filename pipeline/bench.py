"""Benchmarks measured as ratios against a reference run side by side in one process.

``masks``: torchvision's full-canvas route (``paste_masks_in_image``, threshold,
``pycocotools.mask.encode`` of full masks, ``cv2.findContours`` on full masks)
against :func:`pipeline.paste.encode` on the same inputs, asserting identical
RLE strings; and the same encoding with the continuous paste beside it.

``pipeline``: the bare forward pass over preloaded, already-decoded tensors
(the ceiling) against the whole segment job on the same images, same batch
size, device and precision; plus time to the first committed shard and the
peak memory of the driver and every Ray process for N and 10 x N images.

``scale``: planning generated listings of 100,000 and 1,000,000 images
(time to the first shard, plan time, peak memory) and the resume scan of
10,000 markers on S3.

``robustness``: the segment job and an Otsu + connected-components baseline
scored side by side on a held-out in-distribution archive, on each shifted
archive (:data:`pipeline.synth.SHIFTS`) and, where given, on folders of real
images with label images.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import paste_masks_in_image

from pipeline import evaluate, features, masks, paste, segment, synth
from pipeline.infer import detect
from pipeline.model import resolve_model
from pipeline.plan import plain_image_row
from pipeline.rle import decode_box
from pipeline.stats import read_table
from pipeline.worker import InferenceSettings, ShardProcessor

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


def feature_seconds(probs, boxes, image_size, threshold: float, pixels: np.ndarray, repeats: int) -> float:
    """Best-of seconds of the shape and intensity features alone, on the crops ``encode`` makes."""
    crops = paste.paste_on_device(probs, boxes, image_size, threshold)
    atlas = masks.CropAtlas.pack(crops)
    runs = masks.ColumnRuns.of(atlas)
    n = len(crops)
    area = masks.measure(runs, n)[0]
    origin = np.stack([atlas.x0, atlas.y0], axis=1)

    def run():
        features.shape_features(runs, atlas, n, origin, area)
        features.intensity_features(runs, n, pixels)

    return _best_of(run, repeats)[0]


def decode_seconds(rles: list[str], boxes: np.ndarray, image_size: tuple[int, int], repeats: int):
    """Best-of seconds to read stored masks back inside their boxes: ``pycocotools.mask.decode``
    of the full canvas then cropped (reference) against :func:`pipeline.rle.decode_box`.

    Args:
        rles: COCO compressed counts (ASCII) over ``image_size`` (height, width).
        boxes: int (N, 4) x0, y0, x1, y1 (exclusive), one per RLE.

    Raises:
        AssertionError: a crop differs between the two.
    """
    size = list(image_size)
    pairs = [({"size": size, "counts": rle}, box) for rle, box in zip(rles, boxes.tolist(), strict=True)]

    def reference():
        return [mask_utils.decode(rle)[y0:y1, x0:x1] for rle, (x0, y0, x1, y1) in pairs]

    def box_local():
        return [decode_box(rle, *box) for rle, box in pairs]

    reference_s, expected = _best_of(reference, max(1, repeats // 3))
    box_local_s, got = _best_of(box_local, repeats)
    if any(not np.array_equal(a, b) for a, b in zip(expected, got, strict=True)):
        raise AssertionError(f"a box decoded by decode_box differs from pycocotools at {image_size}")
    return reference_s, box_local_s


def bench_masks(
    cases=MASK_CASES, *, device: str = "cpu", threshold: float = 0.5, repeats: int = 3
) -> list[dict[str, float]]:
    """Time per image of the reference and of :func:`pipeline.paste.encode` for each case.

    The pipeline encodes with the intensity features on a two-channel 16-bit
    image (what the segment job does); ``features_s`` times the shape and
    intensity features alone on the same masks, and ``feature_growth`` is
    what they add to the rest of the encoding (``features_s / (pipeline_s -
    features_s)``). Raises AssertionError if any RLE string differs between
    the reference and the pipeline. ``decode_*`` time reading the stored
    RLEs back inside their boxes (:func:`decode_seconds`), what evaluation
    does per object. ``continuous_s`` is :func:`pipeline.paste.encode` with the
    continuous paste (:data:`pipeline.card.MASK_PASTES`) on the same inputs,
    and ``continuous_ratio`` its time over ``pipeline_s``.
    """
    masks.compile_kernels()  # as a replica does at start-up
    results = []
    for size, count in cases:
        probs, boxes = synthetic_detections(size, count, device=device)
        image_size = (size, size)
        pixels = np.random.default_rng(size).integers(0, 4096, (size, size, 2)).astype(np.uint16)
        args = (probs, boxes, image_size, threshold)
        reference_s, reference = _best_of(partial(reference_encode, *args), max(1, repeats // 3))
        pipeline_s, ours = _best_of(partial(paste.encode, *args, pixels), repeats)
        if reference != ours["rle"]:
            differing = sum(a != b for a, b in zip(reference, ours["rle"], strict=True))
            raise AssertionError(f"{differing} of {count} RLE strings differ at {size}^2")
        features_s = feature_seconds(*args, pixels, repeats)
        continuous_s, _ = _best_of(partial(paste.encode, *args, pixels, "continuous"), repeats)
        decode_reference_s, decode_s = decode_seconds(ours["rle"], ours["_mask_box"], image_size, repeats)
        results.append(
            {
                "size": size,
                "instances": count,
                "device": device,
                "reference_s": round(reference_s, 4),
                "pipeline_s": round(pipeline_s, 4),
                "speedup": round(reference_s / pipeline_s, 1),
                "features_s": round(features_s, 4),
                "feature_growth": round(features_s / max(pipeline_s - features_s, 1e-9), 3),
                "continuous_s": round(continuous_s, 4),
                "continuous_ratio": round(continuous_s / pipeline_s, 2),
                "decode_reference_s": round(decode_reference_s, 6),
                "decode_s": round(decode_s, 6),
                "decode_speedup": round(decode_reference_s / decode_s, 1),
            }
        )
    return results


def process_role(proc, root_pid: int) -> str:
    """What a process of an embedded Ray job is, for the memory breakdown.

    ``driver`` (the benchmark itself), ``replica`` (a ShardWorker actor),
    ``idle_worker`` (a Ray worker waiting for work), ``raylet``, ``gcs_server``,
    or ``ray_other`` (dashboard, agents, log monitor, other workers).
    """
    if proc.pid == root_pid:
        return "driver"
    name = proc.name()
    if name in ("raylet", "gcs_server"):
        return name
    cmdline = proc.cmdline()
    title = cmdline[0] if cmdline else ""
    if title.startswith("ray::ShardWorker"):
        return "replica"
    if title.startswith("ray::IDLE"):
        return "idle_worker"
    return "ray_other"


class PeakMemory:
    """Samples the summed resident memory of this process and all its descendants.

    With an embedded local Ray instance, the GCS, raylet and every worker
    process are descendants of the driver, so the sum covers the whole job.
    Use as a context manager; ``peak_bytes`` is the largest sum seen and
    ``peak_by_role`` its split by :func:`process_role` at that moment.
    RSS counts a shared page (the object store, shared libraries) in every
    process that maps it, so the sum is an upper bound.
    """

    def __init__(self, interval_s: float = 0.1):
        import psutil

        self._root = psutil.Process()
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.peak_by_role: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-memory")

    def sample(self) -> dict[str, int]:
        """RSS in bytes of this process and its live descendants now, summed by role."""
        import psutil

        by_role: dict[str, int] = collections.Counter()
        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                by_role[process_role(proc, self._root.pid)] += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return dict(by_role)

    def _record(self) -> None:
        by_role = self.sample()
        total = sum(by_role.values())
        if total > self.peak_bytes:
            self.peak_bytes = total
            self.peak_by_role = dict(sorted(by_role.items()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._record()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._record()


def make_archive(dest: Path, images: int, size: int, tiles_per_slide: int = 16) -> Path:
    """A synthetic archive of exactly ``images`` tiles of ``size`` px (no annotations needed)."""
    slides = -(-images // tiles_per_slide)
    synth.write_archive(dest, slides=slides, tiles_per_slide=tiles_per_slide, size=size, seed=7)
    for path in synth.tile_paths(dest)[images:]:
        path.unlink()
    return dest


def bare_forward_images_per_s(
    model: str | None, rows: list[dict], *, batch_size: int, device: str, threads: int
) -> float:
    """Images/s of the model's forward (no paste, no encode) over preloaded device tensors of the
    manifest ``rows`` (image files or slide windows).

    Same model construction, precision and batch size as a replica; one
    warm-up batch is not timed.
    """
    loaded = resolve_model(model)
    settings = InferenceSettings(
        score_threshold=loaded.card.score_threshold,
        mask_threshold=loaded.card.mask_threshold,
        max_detections=loaded.card.max_detections,
        batch_size=batch_size,
        max_pixels=segment.DEFAULT_MAX_PIXELS,
        preprocessing=loaded.card.preprocessing,
    )
    processor = ShardProcessor(
        loaded.card, loaded.module.state_dict(), settings, device=device, threads=threads
    )
    arrays = [processor.prepare(row)[1] for row in rows]
    batches = [processor.to_device(arrays[i : i + batch_size]) for i in range(0, len(arrays), batch_size)]
    detect(processor.model, batches[0], autocast=processor.autocast)

    def run_all():
        for batch in batches:
            detect(processor.model, batch, autocast=processor.autocast)
        if processor.device.type == "cuda":
            torch.cuda.synchronize()

    seconds, _ = _best_of(run_all, 1)
    return len(arrays) / seconds


def first_commit_seconds(source: Path, dest: Path, *, model: str | None, shard_size: int) -> float:
    """Seconds from launching ``python -m jobs.segment`` (fresh process, own Ray) to its first marker."""
    command = [sys.executable, "-m", "jobs.segment", str(source), "--output", str(dest)]
    command += ["--shard-size", str(shard_size), "--no-progress"]
    if model:
        command += ["--model", model]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    first = None
    while proc.poll() is None and first is None:
        if any((dest / "_commits").glob("shard-*.json")):
            first = time.monotonic() - start
        time.sleep(0.02)
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"segment job failed (exit {proc.returncode}): {stderr.strip()[-500:]}")
    return first if first is not None else time.monotonic() - start


def _timed_run(source: Path, dest: Path, pinned_kwargs: dict, execution) -> tuple[float, PeakMemory, object]:
    """(wall seconds of plan + execute, its PeakMemory, report) of one segment run on the live Ray."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        settings = segment.PinnedSettings(source=str(source), **pinned_kwargs)
        report = segment.new_run(str(dest), settings, execution)
        wall = time.perf_counter() - start
    if report.failed or report.images_error:
        raise RuntimeError(f"benchmark run not clean: {segment.format_report(report)}")
    return wall, memory, report


def bench_pipeline(
    *,
    images: int = 256,
    size: int = 256,
    model: str | None = None,
    device: str = "cpu",
    batch_size: int = 4,
    shard_size: int = 16,
    memory_factor: int = 10,
    workdir: Path | None = None,
) -> dict[str, object]:
    """The segment job against the bare forward pass on the same ``images`` tiles of ``size`` px.

    Returns images/s of both and their ratio (the pipeline timed from
    planning to the last commit, replica start-up included), the same ratio
    once replicas are up (``steady_ratio``), Ray and replica start-up seconds, seconds
    to the first committed shard (a fresh ``jobs.segment`` process), peak RSS
    for ``images`` and ``memory_factor * images`` images, the relative growth
    and each peak's split by process role, and the per-stage seconds per image
    of the pipeline run.
    """
    import ray

    own_tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="segpipe-bench-")) if own_tmp else Path(workdir)
    try:
        large = make_archive(root / "archive-large", images * memory_factor, size)
        small = root / "archive"
        for path in synth.tile_paths(large)[:images]:
            target = small / path.relative_to(large)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
        paths = synth.tile_paths(small)
        first_commit = first_commit_seconds(small, root / "first", model=model, shard_size=shard_size)

        start = time.perf_counter()
        segment.connect_ray("local")
        ray_start_s = time.perf_counter() - start
        gpus = 1.0 if device == "cuda" else 0.0
        execution = segment.ExecutionSettings(
            replicas=1, gpus_per_replica=gpus, batch_size=batch_size, progress=False
        )
        threads = segment.replica_layout(execution)[2]
        rows = [plain_image_row(str(p)) for p in paths]
        forward = bare_forward_images_per_s(
            model, rows, batch_size=batch_size, device=device, threads=int(threads)
        )
        pinned = {"model": model, "shard_size": shard_size}
        wall, memory_small, report = _timed_run(small, root / "run", pinned, execution)
        _, memory_large, _ = _timed_run(large, root / "run-large", pinned, execution)
        peak_small, peak_large = memory_small.peak_bytes, memory_large.peak_bytes
        pipeline_rate = images / wall
        steady_rate = images / (wall - report.replicas_ready_s)
        per_image = {k: round(v / images, 5) for k, v in sorted(report.stage_s.items())}
        return {
            "images": images,
            "size": size,
            "device": device,
            "batch_size": batch_size,
            "shard_size": shard_size,
            "threads": int(threads),
            "forward_images_per_s": round(forward, 3),
            "pipeline_images_per_s": round(pipeline_rate, 3),
            "ratio": round(pipeline_rate / forward, 3),
            "steady_ratio": round(steady_rate / forward, 3),
            "ray_start_s": round(ray_start_s, 2),
            "replica_start_s": round(report.replicas_ready_s, 2),
            "first_commit_s": round(first_commit, 2),
            "peak_rss_bytes": peak_small,
            f"peak_rss_bytes_{memory_factor}x": peak_large,
            "memory_growth": round(peak_large / peak_small - 1, 4),
            "peak_rss_by_role": memory_small.peak_by_role,
            f"peak_rss_by_role_{memory_factor}x": memory_large.peak_by_role,
            "stage_s_per_image": per_image,
        }
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)


def _score_or_none(scores: dict[str, float], key: str, truth: int) -> float | None:
    """A rounded AP or F1, or None where the archive holds no true instance (undefined or meaningless)."""
    return round(scores[key], 3) if truth else None


def robustness_looks(cell_bodies: float | None = None) -> list[tuple[str, synth.Appearance]]:
    """The robustness archives' names and looks: in-distribution (:data:`pipeline.synth.TRAINING`),
    each shift, background-only; ``cell_bodies`` (if given) sets every look's
    ``cytoplasm_fraction``."""
    looks = [
        ("in-distribution", synth.TRAINING),
        *synth.SHIFTS.items(),
        ("background-only", replace(synth.TRAINING, empty_fraction=1.0)),
    ]
    if cell_bodies is None:
        return looks
    return [(name, replace(look, cytoplasm_fraction=cell_bodies)) for name, look in looks]


def bench_robustness(
    *,
    model: str | None = None,
    slides: int = 4,
    tiles_per_slide: int = 16,
    size: int = 256,
    seed: int = 0,
    real: Sequence[Path] = (),
    workdir: Path | None = None,
    cell_bodies: float | None = None,
    scale: float | str = "auto",
    tta: str = "none",
) -> list[dict[str, object]]:
    """Segment and score the in-distribution archive, every shifted archive, a background-only
    archive (no nucleus: its instances are all false) and each folder of ``real``.

    Each archive is written with ``seed`` (the training archive's seed must
    differ) into a folder of its own under one source; the segment job
    segments that source in one run with the default settings (Ray and the
    replica start once), and :func:`pipeline.evaluate.evaluate` scores each
    archive's images against that archive's truth. ``real``: folders of
    images with ``*_labels.*`` instance label images beside them, a row each
    (:func:`pipeline.evaluate.label_images_to_coco`). ``cell_bodies``: the
    fraction of tiles with cell bodies in every archive (see :func:`robustness_looks`). ``scale``:
    the segment job's ``--scale``; ``tta``: its ``--tta``. ``workdir``: a folder to write
    into and keep (``archives/NAME``, the run ``run``, each archive's truth
    ``truth-NAME.json``, ``truth-real-I.json`` for the I-th real folder); None: a temporary
    folder, deleted.

    Returns one dict per archive: ``archive``, ``tta``, ``images``,
    ``enlarged`` (the fraction of images the model saw enlarged), ``instances``, ``truth``
    (ground-truth instances), ``AP50``, ``AP50_se`` (its bootstrap standard error over images,
    :func:`pipeline.evaluate.ap50_standard_error`), ``AP`` (mask), ``F1`` (mask IoU 0.5, one-to-one),
    ``count_mae``, ``count_bias``, ``faint_share``, ``recall_faint``, ``recall_rest`` (the share
    of true nuclei under contrast-to-noise 2 and the recall of those and of the rest,
    :func:`pipeline.evaluate.faint_recall`), ``baseline_AP50``, ``baseline_AP``,
    ``baseline_count_mae`` (the APs and faint figures are None for an archive without a true
    instance).
    """
    import ray

    own_tmp = workdir is None
    root = Path(tempfile.mkdtemp(prefix="segpipe-robust-")) if own_tmp else Path(workdir)
    source, dest = root / "archives", root / "run"
    archives: list[tuple[str, str]] = []  # (row name, folder under source)
    try:
        for name, look in robustness_looks(cell_bodies):
            synth.write_archive(
                source / name, slides=slides, tiles_per_slide=tiles_per_slide, size=size, seed=seed, look=look
            )
            archives.append((name, name))
        for index, folder in enumerate(real):
            evaluate.label_images_to_coco(folder, source / f"real-{index}")
            archives.append((f"real: {Path(folder).name}", f"real-{index}"))
        segment.connect_ray("local")
        report = segment.new_run(
            str(dest),
            segment.PinnedSettings(source=str(source), model=model, scale=scale, tta=tta),
            segment.ExecutionSettings(replicas=1, progress=False),
        )
        if report.failed or report.images_error:
            raise RuntimeError(f"robustness run not clean: {segment.format_report(report)}")
        images = read_table(str(dest), "images", ["uri", "scale"])
        rows = []
        for name, folder in archives:
            coco = _truth_under(source / folder, root / f"truth-{folder}.json")
            scores, _ = evaluate.evaluate(str(dest), str(coco))
            faint = evaluate.faint_recall(evaluate.outcomes(str(dest), str(coco)).objects)
            truth = len(json.loads(coco.read_text())["annotations"])
            scales = images.loc[images["uri"].str.startswith(f"{(source / folder).as_posix()}/"), "scale"]
            rows.append(
                {
                    "archive": name,
                    "tta": tta,
                    "images": int(scores["images"]),
                    "enlarged": round(float((scales > 1).mean()), 3),
                    "instances": int(scores["instances"]),
                    "truth": truth,
                    "AP50": _score_or_none(scores, "agnostic.segm.AP50", truth),
                    "AP50_se": _score_or_none(scores, "agnostic.segm.AP50.se", truth),
                    "AP": _score_or_none(scores, "agnostic.segm.AP", truth),
                    "F1": _score_or_none(scores, "match.f1", truth),
                    "count_mae": round(scores["count.mae"], 2),
                    "count_bias": round(scores["count.bias"], 2),
                    **{key: None if value is None else round(value, 3) for key, value in faint.items()},
                    "baseline_AP50": _score_or_none(scores, "baseline.segm.AP50", truth),
                    "baseline_AP": _score_or_none(scores, "baseline.segm.AP", truth),
                    "baseline_count_mae": round(scores["baseline.count.mae"], 2),
                }
            )
        return rows
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if own_tmp:
            shutil.rmtree(root, ignore_errors=True)


def _truth_under(folder: Path, out: Path) -> Path:
    """``folder/annotations.json`` with each ``file_name`` prefixed by the folder's name, written to
    ``out``: one archive's truth, relative to the source that holds every archive."""
    coco = json.loads((folder / "annotations.json").read_text())
    for image in coco["images"]:
        image["file_name"] = f"{folder.name}/{image['file_name']}"
    out.write_text(json.dumps(coco))
    return out
