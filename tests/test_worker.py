"""The shard processor without Ray: every image accounted for, bad ones isolated, queues bounded."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import torch

from pipeline import infer
from pipeline.decode import read_and_decode
from pipeline.model import resolve_model
from pipeline.worker import InferenceSettings, ShardProcessor, bounded_map


@pytest.fixture(scope="module")
def processor(random_model_path):
    loaded = resolve_model(str(random_model_path))
    settings = InferenceSettings(
        score_threshold=0.0, mask_threshold=0.5, max_detections=10, batch_size=2, max_pixels=200 * 200
    )
    return ShardProcessor(loaded.card, loaded.module.state_dict(), settings)


def rows_for(paths):
    return [{"uri": str(p), "image_id": i, "slide_id": "s", "shard_id": 0} for i, p in enumerate(paths)]


def test_bad_images_become_error_rows_and_the_rest_is_processed(processor, archive, tmp_path):
    good = sorted(archive.rglob("*.png"))[:2]
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
    ids = set(output.instances.column("image_id").to_pylist())
    assert ids == {0, 6}


def test_an_image_the_model_raises_on_is_isolated(processor, archive, monkeypatch):
    paths = sorted(archive.rglob("*.png"))[:3]
    real_detect = infer.detect
    array = read_and_decode(str(paths[1]), max_pixels=10**6)
    bad_sum = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255).sum()

    def detect_failing_on_one(model, images, **kwargs):
        if any(torch.isclose(img.sum(), bad_sum) for img in images):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_detect(model, images, **kwargs)

    monkeypatch.setattr("pipeline.worker.detect", detect_failing_on_one)
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
