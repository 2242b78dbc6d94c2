"""The bundled model loads from the package and finds nuclei on a tile it never saw."""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils

from pipeline import masks
from pipeline.infer import detect
from pipeline.model import BUNDLED_MODEL, resolve_model
from pipeline.synth import render_tile, tile_annotations


def test_bundled_model_is_small_native_size_and_dense_ready():
    loaded = resolve_model(None)
    assert BUNDLED_MODEL.stat().st_size <= 20 * 2**20
    assert loaded.card.classes == ("nucleus", "mitotic")
    assert loaded.card.input_size == "native"
    assert loaded.card.max_detections >= 300


def test_bundled_model_finds_nuclei_on_a_fresh_tile():
    loaded = resolve_model(None)
    recalls = []
    for tile in range(3):
        image, instances, labels = render_tile(seed=424242, slide=0, tile=tile, size=256)
        truth = [a["segmentation"] for a in tile_annotations(instances, labels)]
        tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div(255)
        found = detect(loaded.module, [tensor])[0]
        encoded = masks.encode(found.mask_probs, found.boxes, (256, 256), loaded.card.mask_threshold)
        predicted = [
            {"size": [256, 256], "counts": r} for r, a in zip(encoded.rle, encoded.area, strict=True) if a
        ]
        iou = np.atleast_2d(mask_utils.iou(predicted, truth, [0] * len(truth)))
        recalls.append(float((iou.max(axis=0) >= 0.5).mean()))
    # The target on held-out tiles is mask AP50 >= 0.9; this floor only guards against a broken model.
    assert np.mean(recalls) >= 0.6, recalls
