"""Test-time augmentation: views map back exactly, fusion groups one detection per view, and a
mirrored image gets the mirrored instances."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline import tta
from pipeline.card import TTA_MODES, InferenceSettings
from pipeline.infer import Detections
from pipeline.model import resolve_model
from pipeline.plan import plain_image_row
from pipeline.synth import tile_paths
from pipeline.worker import ShardProcessor
from tests.helpers import painted_nuclei_png, prepared_tensor

L_SHAPE = np.array(
    [[1, 0, 0, 0, 0, 0, 0, 0]] * 5 + [[1, 1, 1, 1, 1, 1, 0, 0]] * 2 + [[1] * 8],
    dtype=np.float32,
)
"""An 8 x 8 mask touching every side of its box, which no symmetry of the square leaves unchanged."""


def detections(boxes, scores, grids=None, labels=None) -> Detections:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes)
    if grids is None:
        grids = torch.from_numpy(np.stack([L_SHAPE] * n)) if n else torch.zeros(0, 8, 8)
    return Detections(
        boxes=boxes,
        labels=torch.tensor(labels if labels is not None else [1] * n, dtype=torch.int64),
        scores=torch.tensor(scores, dtype=torch.float32),
        mask_probs=grids,
    )


def test_the_test_mask_has_eight_distinct_views():
    shape = torch.from_numpy(L_SHAPE)
    assert len({tta.to_view(shape, view).numpy().tobytes() for view in tta.VIEWS["dihedral"]}) == 8


def test_the_modes_are_the_views_the_cli_offers():
    assert tuple(tta.VIEWS) == TTA_MODES
    assert [len(tta.VIEWS[m]) for m in TTA_MODES] == [1, 4, 8]
    assert all(tta.VIEWS[m][0] == tta.View() for m in TTA_MODES)  # ViewDetections.plain
    assert len(set(tta.VIEWS["dihedral"])) == 8


@pytest.mark.parametrize("view", tta.VIEWS["dihedral"], ids=str)
def test_an_object_found_in_a_view_maps_back_onto_the_image(view):
    height, width, (x0, y0) = 40, 64, (21, 6)
    image = torch.zeros(1, height, width)
    image[0, y0 : y0 + 8, x0 : x0 + 8] = torch.from_numpy(L_SHAPE)
    seen = tta.to_view(image, view)[0]
    assert seen.shape == ((width, height) if view.transpose else (height, width))
    rows, cols = torch.nonzero(seen, as_tuple=True)
    top, left = int(rows.min()), int(cols.min())
    in_view = detections(
        [[left, top, left + 8, top + 8]], [0.9], grids=seen[top : top + 8, left : left + 8][None].clone()
    )
    back = tta.from_view(in_view, view, (height, width))
    assert back.boxes.tolist() == [[x0, y0, x0 + 8, y0 + 8]]
    assert torch.equal(back.mask_probs[0], torch.from_numpy(L_SHAPE))


def test_every_view_finding_the_same_object_fuses_to_that_object():
    one = detections([[10.0, 12.0, 30.0, 28.0], [50.0, 50.0, 60.0, 70.0]], [0.9, 0.7])
    fused = tta.fuse([one] * 4, score_threshold=0.5, max_detections=10)
    assert torch.allclose(fused.boxes, one.boxes)
    assert torch.allclose(fused.scores, one.scores)
    assert torch.allclose(fused.mask_probs, one.mask_probs, atol=1e-6)


def test_an_object_only_one_view_finds_scores_a_share_of_its_score():
    found = detections([[10.0, 10.0, 20.0, 20.0]], [0.9])
    nothing = detections([], [])
    alone = [found, nothing, nothing, nothing]
    assert len(tta.fuse(alone, score_threshold=0.5, max_detections=10).scores) == 0
    fused = tta.fuse(alone, score_threshold=0.2, max_detections=10)
    assert fused.scores.tolist() == pytest.approx([0.225])


def test_fusion_takes_one_detection_per_view_and_weights_boxes_by_score():
    # two overlapping objects in view 0 (IoU 0.6) stay two; view 1 sees the first one shifted
    view0 = detections([[0.0, 0.0, 20.0, 20.0], [0.0, 5.0, 20.0, 25.0]], [0.8, 0.6])
    view1 = detections([[2.0, 0.0, 22.0, 20.0]], [0.4])
    fused = tta.fuse([view0, view1], score_threshold=0.0, max_detections=10)
    assert fused.scores.tolist() == pytest.approx([0.6, 0.3])
    expected_x0 = (0.8 * 0.0 + 0.4 * 2.0) / 1.2
    assert fused.boxes[0].tolist() == pytest.approx([expected_x0, 0.0, expected_x0 + 20.0, 20.0])
    assert fused.boxes[1].tolist() == pytest.approx([0.0, 5.0, 20.0, 25.0])


def test_the_mask_is_the_mean_of_the_views_masks_on_the_fused_box():
    full = torch.ones(1, 8, 8)
    empty_left_half = torch.ones(1, 8, 8)
    empty_left_half[..., :4] = 0
    box = [[0.0, 0.0, 8.0, 8.0]]
    fused = tta.fuse(
        [detections(box, [0.9], grids=full), detections(box, [0.9], grids=empty_left_half)],
        score_threshold=0.5,
        max_detections=10,
    )
    assert torch.allclose(fused.mask_probs[0, :, :4], torch.full((8, 4), 0.5))
    assert torch.allclose(fused.mask_probs[0, :, 4:], torch.ones(8, 4))


def test_fused_detections_are_sorted_by_fused_score_and_capped():
    # view 0 scores a above b; both views together score b above a
    view0 = detections([[0.0, 0.0, 10.0, 10.0], [30.0, 30.0, 40.0, 40.0]], [0.9, 0.8])
    view1 = detections([[30.0, 30.0, 40.0, 40.0]], [0.8])
    fused = tta.fuse([view0, view1], score_threshold=0.0, max_detections=10)
    assert fused.scores.tolist() == pytest.approx([0.8, 0.45])
    assert fused.boxes[0].tolist() == [30.0, 30.0, 40.0, 40.0]
    capped = tta.fuse([view0, view1], score_threshold=0.0, max_detections=1)
    assert capped.scores.tolist() == pytest.approx([0.8])


def test_no_detection_in_any_view_fuses_to_none():
    fused = tta.fuse([detections([], [])] * 8, score_threshold=0.0, max_detections=10)
    assert fused.boxes.shape == (0, 4) and fused.mask_probs.shape == (0, 8, 8) and len(fused.labels) == 0


@pytest.fixture(scope="module")
def bundled_with_flips():
    loaded = resolve_model(None)
    settings = InferenceSettings(
        score_threshold=loaded.card.default_score_threshold("flips"),
        mask_threshold=loaded.card.mask_threshold,
        max_detections=loaded.card.max_detections,
        batch_size=2,
        max_pixels=10**8,
        preprocessing=loaded.card.preprocessing,
        tta="flips",
    )
    return ShardProcessor(loaded.card, loaded.module.state_dict(), settings)


def test_a_mirrored_image_gets_the_mirrored_instances(bundled_with_flips, archive):
    """The four mirror images of an image are those of its mirror image, so with ``flips`` the
    fused instances of a mirrored tile are the tile's mirrored (up to float rounding)."""
    processor = bundled_with_flips
    tile = prepared_tensor(str(tile_paths(archive)[0]), processor.settings.preprocessing)[:1].numpy().copy()
    views = processor.infer([tile, np.ascontiguousarray(tile[..., ::-1])])
    assert all(isinstance(v, tta.ViewDetections) and len(v.per_view) == 4 for v in views)
    found, mirrored = (v.fused(score_threshold=0.7, max_detections=100) for v in views)
    assert len(found.scores) >= 3
    width = tile.shape[-1]
    expected = found.boxes[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1, -1, 1]) + torch.tensor(
        [width, 0, width, 0]
    )
    assert torch.allclose(mirrored.scores, found.scores, atol=1e-4)
    assert torch.allclose(mirrored.boxes, expected, atol=1e-2)
    assert torch.allclose(mirrored.mask_probs, found.mask_probs.flip(-1), atol=1e-3)


def test_a_shard_with_tta_stores_the_fused_instances(bundled_with_flips, archive):
    processor = bundled_with_flips
    path = tile_paths(archive)[0]
    tile = prepared_tensor(str(path), processor.settings.preprocessing)[:1].numpy().copy()
    (views,) = processor.infer([tile])
    threshold = processor.card.tta_score_thresholds["flips"]
    fused = views.fused(score_threshold=threshold, max_detections=100)
    stored = processor.process([plain_image_row(str(path), 0, "s")]).instances
    assert processor.settings.score_threshold == threshold and processor.settings.overlap_threshold == 1.0
    assert np.allclose(sorted(stored.column("score").to_pylist()), sorted(fused.scores.tolist()))


def test_with_tta_an_image_cut_into_windows_gets_each_nucleus_once(bundled_with_flips, tmp_path):
    """Each window's views are fused, then the windows' instances joined: no nucleus lost or
    doubled, on the seams between windows either."""
    discs = painted_nuclei_png(tmp_path / "big.png", 1000, 600, seed=5)
    settings = replace(bundled_with_flips.settings, tile_size=512, tile_overlap=64, overlap_threshold=0.7)
    processor = ShardProcessor(bundled_with_flips.card, bundled_with_flips.model.state_dict(), settings)
    found = processor.process([plain_image_row(str(tmp_path / "big.png"), 0, "s")]).instances.to_pandas()
    for x, y, r in discs:
        near = (found["centroid_x"] - x) ** 2 + (found["centroid_y"] - y) ** 2 < r**2
        assert near.sum() == 1, (x, y)
    assert len(found) == len(discs) and found["width"].eq(1000).all()
