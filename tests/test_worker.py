"""The shard processor without Ray: every image accounted for, bad ones isolated, queues bounded."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import cv2
import numpy as np
import pytest
import tifffile
import torch
from pycocotools import mask as mask_utils

from pipeline import infer, inputs, paste
from pipeline.concurrency import bounded_map
from pipeline.model import resolve_model
from pipeline.plan import plain_image_row
from pipeline.synth import tile_paths
from pipeline.worker import InferenceSettings, ShardProcessor
from schemas import instances_schema
from tests.helpers import continuous_reference, painted_nuclei_png, prepared_tensor


@pytest.fixture(scope="module")
def processor(random_model_path):
    loaded = resolve_model(str(random_model_path))
    settings = InferenceSettings(
        score_threshold=0.0,
        mask_threshold=0.5,
        max_detections=10,
        batch_size=2,
        max_pixels=200 * 200,
        preprocessing=loaded.card.preprocessing,
    )
    return ShardProcessor(loaded.card, loaded.module.state_dict(), settings)


def rows_for(paths):
    return [plain_image_row(str(p), i, "s") for i, p in enumerate(paths)]


def test_bad_images_become_error_rows_and_the_rest_is_processed(processor, archive, tmp_path):
    good = tile_paths(archive)[:2]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("<html>not an image</html>")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:300])
    huge = tmp_path / "huge.png"
    cv2.imwrite(str(huge), np.zeros((300, 300, 3), np.uint8))
    paths = [
        good[0],
        tmp_path / "empty.png",
        tmp_path / "text.png",
        truncated,
        huge,
        tmp_path / "gone.png",
        good[1],
    ]
    output = processor.process(rows_for(paths))
    statuses = output.images.column("status").to_pylist()
    assert statuses == ["ok", "decode", "decode", "decode", "too_large", "unreadable", "ok"]
    errors = output.images.column("error").to_pylist()
    assert errors[0] is None and all(e and "\n" not in e for e in errors[1:6])
    assert output.summary["images"] == 7 and output.summary["images_ok"] == 2
    assert output.images.column("scale").to_pylist() == [1.0, None, None, None, None, None, 1.0]
    ids = set(output.instances.column("image_id").to_pylist())
    assert ids == {0, 6}


def test_an_image_the_model_raises_on_is_isolated(processor, archive, monkeypatch):
    paths = tile_paths(archive)[:3]
    real_detect = infer.detect
    bad_sum = prepared_tensor(str(paths[1]), processor.settings.preprocessing).sum()

    def detect_failing_on_one(model, images, **kwargs):
        if any(torch.isclose(img.sum(), bad_sum) for img in images):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_detect(model, images, **kwargs)

    monkeypatch.setattr("pipeline.tta.detect", detect_failing_on_one)
    output = processor.process(rows_for(paths))
    assert output.images.column("status").to_pylist() == ["ok", "inference", "ok"]
    assert "illegal memory access" in output.images.column("error").to_pylist()[1]
    assert output.images.column("height").to_pylist()[1] == 96


def test_bounded_map_keeps_at_most_depth_in_flight_and_order():
    in_flight, peak, lock = 0, 0, threading.Lock()

    def slow(x):
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.01)
        with lock:
            in_flight -= 1
        return x * 2

    with ThreadPoolExecutor(8) as pool:
        consumed = []
        for value in bounded_map(pool, slow, range(40), depth=3):
            consumed.append(value)
            time.sleep(0.005)  # a slow consumer must not let work pile up
    assert consumed == [2 * x for x in range(40)]
    assert peak <= 3


def test_the_replica_writes_the_instances_schema_with_raw_intensities_per_channel(
    processor, archive, tmp_path
):
    """Every schema field, intensities on the raw 16-bit values of each channel, µm where known."""
    rng = np.random.default_rng(0)
    stack = rng.integers(1000, 3000, (2, 96, 96), dtype=np.uint16)
    stack[1] //= 2
    ome = tmp_path / "two-channels.ome.tif"
    metadata = {"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP"]}, "PhysicalSizeX": 0.5}
    tifffile.imwrite(ome, stack, ome=True, metadata=metadata)
    paths = [*tile_paths(archive)[:2], ome]
    output = processor.process(rows_for(paths))
    table = output.instances
    assert table.schema.equals(instances_schema(), check_metadata=True)
    images = output.images.to_pylist()
    assert images[2]["channels"] == ["DAPI", "GFP"] and images[2]["pixel_size_um"] == 0.5
    assert images[0]["pixel_size_um"] is None
    rows = table.to_pylist()
    assert {r["image_id"] for r in rows} == {0, 1, 2}
    for row in rows:
        channels = images[row["image_id"]]["channels"]
        assert len(row["intensity_mean"]) == len(channels)
        if row["image_id"] == 2:
            assert (
                1000 <= row["intensity_min"][0] <= row["intensity_mean"][0] <= row["intensity_max"][0] < 3000
            )
            assert row["intensity_mean"][1] < row["intensity_mean"][0]
            assert row["intensity_integrated"][0] == pytest.approx(row["intensity_mean"][0] * row["area"])
            assert row["area_um2"] == pytest.approx(row["area"] * 0.25)
            assert row["axis_major_length_um"] == pytest.approx(row["axis_major_length"] * 0.5)
        else:
            assert row["area_um2"] is None and row["perimeter_um"] is None


def test_a_card_that_pastes_in_continuous_coordinates_gets_exactly_those_masks(processor, archive):
    """The setting reaches the paste: each stored RLE is the detection's grid sampled at every pixel
    centre of the whole image (the full-canvas reference), not torchvision's paste."""
    settings = replace(processor.settings, mask_paste="continuous")
    continuous = ShardProcessor(processor.card, processor.model.state_dict(), settings)
    uri = str(tile_paths(archive)[0])
    stored = continuous.process(rows_for([uri])).instances.to_pandas().sort_values("instance_id")
    image = prepared_tensor(uri, processor.card.preprocessing)
    found = infer.detect(processor.model, [image])[0]
    order = torch.argsort(-found.scores, stable=True)
    probs, boxes = found.mask_probs[order], found.boxes[order]
    size = tuple(image.shape[-2:])
    references = [continuous_reference(probs, boxes, i, size, 0.5) for i in range(len(order))]
    expected = [
        mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
        for mask in references
        if mask.any()
    ]
    assert len(expected) >= 5 and stored["rle"].tolist() == expected
    torchvision_areas = paste.encode(probs, boxes, size, 0.5)["area"]
    assert sum(torchvision_areas) > sum(mask.sum() for mask in references)


def test_an_image_larger_than_a_window_is_decoded_once_and_segmented_in_windows(tmp_path, monkeypatch):
    discs = painted_nuclei_png(tmp_path / "big.png", 1400, 1100, seed=5)
    loaded = resolve_model(None)
    settings = InferenceSettings(
        score_threshold=0.5,
        mask_threshold=0.5,
        max_detections=500,
        batch_size=4,
        max_pixels=10**8,
        preprocessing=loaded.card.preprocessing,
        overlap_threshold=0.7,
    )
    decoded = []
    real_decode = inputs.read_and_decode
    monkeypatch.setattr(
        inputs, "read_and_decode", lambda uri, **kw: decoded.append(uri) or real_decode(uri, **kw)
    )
    found = {}
    for tile in (None, 512):
        processor = ShardProcessor(
            loaded.card, loaded.module.state_dict(), replace(settings, tile_size=tile, tile_overlap=64)
        )
        found[tile] = processor.process(rows_for([tmp_path / "big.png"])).instances.to_pandas()
    assert len(decoded) == 2  # once per run: the windowed run cut one decoded image into 9 windows
    whole, windowed = found[None], found[512]
    overlaps = []
    for x, y, r in discs:  # every nucleus once, at the same place, with about the same mask
        near = [f[(f["centroid_x"] - x) ** 2 + (f["centroid_y"] - y) ** 2 < r**2] for f in (whole, windowed)]
        assert [len(n) for n in near] == [1, 1], (x, y)
        a, b = (mask_utils.decode({"size": [1100, 1400], "counts": n["rle"].item()}) for n in near)
        overlaps.append((a & b).sum() / (a | b).sum())
    assert np.median(overlaps) > 0.95 and min(overlaps) > 0.8
    assert windowed["height"].eq(1100).all() and windowed["tile_x0"].eq(0).all()  # the image's own frame
    assert windowed["instance_id"].tolist() == list(range(len(windowed)))
    assert windowed["score"].is_monotonic_decreasing


def test_inputs_of_many_sizes_never_pile_up_waiting_for_a_full_batch(processor, tmp_path, monkeypatch):
    paths = []
    for k in range(12):
        path = tmp_path / f"{k}.png"
        cv2.imwrite(str(path), np.full((64 + 8 * k, 64, 3), 40, np.uint8))  # 12 sizes, batch size 2
        paths.append(path)
    prepared, inferred, waiting = [], [], []
    real_prepare, real_infer = processor.prepare, processor.infer

    def prepare(row):
        prepared.append(row["image_id"])
        return real_prepare(row)

    def infer(arrays, scale=1.0):
        inferred.extend(arrays)
        waiting.append(len(prepared) - len(inferred))
        return real_infer(arrays, scale)

    monkeypatch.setattr(processor, "prepare", prepare)
    monkeypatch.setattr(processor, "infer", infer)
    output = processor.process(rows_for(paths))
    assert output.images.num_rows == 12 and set(output.images.column("status").to_pylist()) == {"ok"}
    assert len(inferred) == 12 and max(waiting) <= 2 * processor.prefetch


def spy_on_infer(processor, monkeypatch) -> list[tuple[int, float]]:
    """Record (inputs, scale) of each :meth:`ShardProcessor.infer` call."""
    calls, real_infer = [], processor.infer

    def infer(arrays, scale=1.0):
        calls.append((len(arrays), scale))
        return real_infer(arrays, scale)

    monkeypatch.setattr(processor, "infer", infer)
    return calls


def test_a_fixed_scale_resamples_plain_images_and_their_windows_never_slide_windows(processor, monkeypatch):
    arrays = [np.random.default_rng(k).random((1, 64, 64), dtype=np.float32) for k in range(3)]
    calls = spy_on_infer(processor, monkeypatch)
    monkeypatch.setattr(processor, "settings", replace(processor.settings, scale=2.0))
    found, factors = processor.infer_scaled(arrays, ["image", "window", "slide"])
    assert factors == [2.0, 2.0, 1.0] and sorted(calls) == [(1, 1.0), (2, 2.0)]
    assert all(len(f.boxes) and f.boxes[:, 2:].max() <= 64 for f in found)  # in the inputs' own pixels


def test_automatic_scale_reruns_enlarged_only_whole_images_of_small_objects(processor, monkeypatch):
    arrays = [np.random.default_rng(k).random((1, 64, 64), dtype=np.float32) for k in range(3)]
    calls = spy_on_infer(processor, monkeypatch)
    monkeypatch.setattr(processor, "settings", replace(processor.settings, scale="auto"))
    # A card without object sizes: one pass, nothing resampled.
    assert processor.infer_scaled(arrays, ["image", "window", "slide"])[1] == [1.0, 1.0, 1.0]
    assert calls == [(3, 1.0)]
    # Objects far smaller than the card's smallest: the whole image is redone at the largest factor.
    calls.clear()
    small_objects = replace(processor.card, object_diameter_px=(1000.0, 2000.0), score_threshold=0.0)
    monkeypatch.setattr(processor, "card", small_objects)
    found, factors = processor.infer_scaled(arrays, ["image", "window", "slide"])
    assert factors == [infer.MAX_AUTOMATIC_SCALE, 1.0, 1.0]
    assert calls == [(3, 1.0), (1, infer.MAX_AUTOMATIC_SCALE)]
    assert found[0].boxes[:, 2:].max() <= 64
    # Only detections the card itself would keep judge the size, whatever the run's threshold (0 here).
    calls.clear()
    monkeypatch.setattr(processor, "card", replace(small_objects, score_threshold=1.01))
    assert processor.infer_scaled(arrays, ["image", "window", "slide"])[1] == [1.0, 1.0, 1.0]
    assert calls == [(3, 1.0)]
