"""The bundled model: loads from the package, finds nuclei on unseen tiles, nothing on empty ones."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from pycocotools import mask as mask_utils

from pipeline import masks, preprocess
from pipeline.infer import detect
from pipeline.model import BUNDLED_MODEL, resolve_model
from pipeline.preprocess import model_input
from pipeline.synth import TRAINING, render_tile, tile_annotations


def detections(loaded, pixels: np.ndarray):
    """The bundled model's non-empty instances on raw pixels (H, W[, C]), through its card's preprocessing."""
    pixels = pixels if pixels.ndim == 3 else pixels[..., None]
    prepared = torch.from_numpy(model_input(pixels, loaded.card.preprocessing)).expand(3, -1, -1)
    found = detect(loaded.module, [prepared])[0]
    encoded = masks.encode(found.mask_probs, found.boxes, pixels.shape[:2], loaded.card.mask_threshold)
    return encoded.filter(encoded["area"] > 0)


def test_bundled_model_is_small_native_size_dense_ready_and_states_its_preprocessing():
    loaded = resolve_model(None)
    assert BUNDLED_MODEL.stat().st_size <= 20 * 2**20
    assert loaded.card.classes == ("nucleus",)
    assert loaded.card.input_size == "native"
    assert loaded.card.max_detections >= 300
    assert loaded.card.preprocessing == preprocess.DEFAULT


def test_bundled_model_finds_nuclei_on_a_fresh_tile():
    loaded = resolve_model(None)
    recalls = []
    for index in range(4):
        tile = render_tile(seed=424242, slide=0, tile=index, size=256)
        truth = [a["segmentation"] for a in tile_annotations(tile.instances, tile.labels)]
        predicted = [{"size": [256, 256], "counts": r} for r in detections(loaded, tile.pixels)["rle"]]
        iou = np.atleast_2d(mask_utils.iou(predicted, truth, [0] * len(truth)))
        recalls.append(float((iou.max(axis=0) >= 0.5).mean()))
    # The target on held-out tiles is mask AP50 >= 0.92; this floor only guards against a broken model.
    assert np.mean(recalls) >= 0.7, recalls


def test_background_only_tiles_and_an_empty_slide_region_give_no_instance():
    loaded = resolve_model(None)
    empty_look = replace(TRAINING, density=(1e-6, 1e-6))
    for index in range(6):
        tile = render_tile(seed=7, slide=0, tile=index, size=256, look=empty_look)
        if tile.labels:
            continue  # a cluster was drawn; only background tiles count here
        assert len(detections(loaded, tile.pixels)) == 0, (index, tile.file_type)
    # A region of a 16-bit slide with no tissue: camera offset, shot and read noise, a slow gradient.
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 40, 768)[None, :]
    background = 300 + gradient + rng.normal(0, 6, (768, 768))
    assert len(detections(loaded, np.clip(background, 0, 65535).astype(np.uint16))) == 0


def test_the_same_scene_in_8_and_low_range_16_bits_gives_the_same_nuclei():
    loaded = resolve_model(None)
    tile = render_tile(seed=99, slide=0, tile=3, size=256)
    gray = tile.pixels.max(axis=2) if tile.pixels.ndim == 3 else tile.pixels
    unit = gray.astype(np.float64) / gray.max()
    eight = (unit * 250).astype(np.uint8)
    twelve_in_sixteen = (unit * 235 + 10).astype(np.uint16)  # values 10..245 of 65535, as the camera wrote
    a, b = detections(loaded, eight), detections(loaded, twelve_in_sixteen)
    assert len(a) > 5 and abs(len(a) - len(b)) <= max(2, len(a) // 10)
