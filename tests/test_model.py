"""Model cards, safe checkpoint loading, and inference that matches forward()."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.infer import automatic_scale, detect
from pipeline.model import ModelCard, ModelLoadError, build_model, load_model, resolve_model, save_checkpoint


def test_checkpoint_round_trip_gives_identical_outputs(random_model_path, tmp_path):
    first = load_model(str(random_model_path))
    second_path = tmp_path / "again.pt"
    loaded = resolve_model(str(random_model_path))
    save_checkpoint(second_path, loaded.module, loaded.card)
    second = load_model(str(second_path))
    torch.manual_seed(1)
    images = [torch.rand(3, 64, 64)]
    with torch.inference_mode():
        a, b = first(images)[0], second(images)[0]
    assert len(a["boxes"]) > 0
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(a[key], b[key])


def test_card_settings_reach_the_model(random_model_path):
    loaded = resolve_model(str(random_model_path))
    assert loaded.card.input_size == "native"
    assert loaded.module.roi_heads.detections_per_img == loaded.card.max_detections
    assert loaded.module.roi_heads.score_thresh == loaded.card.score_threshold
    with torch.inference_mode():
        out = loaded.module([torch.rand(3, 50, 70)])[0]
    assert out["masks"].shape[-2:] == (50, 70)  # native size: no 800 px resize
    assert loaded.fingerprint.startswith("sha256:")


def test_detect_matches_forward_without_pasting(random_model_path):
    model = load_model(str(random_model_path))
    torch.manual_seed(2)
    images = [torch.rand(3, 64, 96), torch.rand(3, 64, 96)]
    with torch.inference_mode():
        reference = model(images)
    ours = detect(model, images)
    for ref, det in zip(reference, ours, strict=True):
        assert torch.equal(ref["boxes"], det.boxes)
        assert torch.equal(ref["scores"], det.scores)
        assert torch.equal(ref["labels"], det.labels)
        assert det.mask_probs.shape == (len(det.boxes), 28, 28)


@pytest.mark.parametrize("scale", [2.0, 1.5, 0.5])
def test_detect_at_a_scale_is_detect_on_the_resampled_image_with_boxes_in_the_images_pixels(
    random_model_path, scale
):
    model = load_model(str(random_model_path))
    torch.manual_seed(3)
    images = [torch.rand(3, 64, 96), torch.rand(3, 64, 96)]
    resampled = F.interpolate(
        torch.stack(images),
        scale_factor=scale,
        mode="bilinear",
        antialias=scale < 1,
        recompute_scale_factor=True,
    )
    reference = detect(model, list(resampled))
    ours = detect(model, images, scale=scale)
    assert sum(len(d.boxes) for d in ours) > 0
    for ref, det in zip(reference, ours, strict=True):
        assert torch.allclose(det.boxes, ref.boxes / scale, atol=1e-4)
        assert det.boxes[:, 2].max() <= 96 and det.boxes[:, 3].max() <= 64
        assert torch.equal(ref.scores, det.scores) and torch.equal(ref.mask_probs, det.mask_probs)


@pytest.mark.parametrize(
    ("diameters", "expected"),
    [
        ([4.0] * 7, 1.0),  # too few objects to judge their size (specks)
        ([12.0, 13.0, 20.0, 30.0] * 2, 1.0),  # median 16.5 >= 1.5 x 8: trained sizes
        ([6.0, 7.0, 8.0, 40.0] * 2, 2.0),  # median 7.5: 16 / 7.5 = 2.13 -> 2.0
        ([5.0, 6.0, 6.5, 0.0] * 2 + [6.0] * 4, 2.5),  # empty masks ignored; median 6: 2.67 -> 2.5
        ([2.0, 2.0, 3.0] * 3, 3.0),  # 8x asked, capped
        ([11.0, 11.0, 11.5] * 3, 1.5),  # just under 12: at least 1.5
    ],
)
def test_automatic_scale_enlarges_only_images_of_objects_well_below_the_trained_sizes(diameters, expected):
    assert automatic_scale(np.array(diameters), smallest_trained=8.0) == expected


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil.write_bytes(pickle.dumps({"format": "segpipe-checkpoint", "card": Evil()}))
    with pytest.raises(ModelLoadError, match="not a weights-only checkpoint"):
        resolve_model(str(evil))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("spec", "weights", "message"),
    [
        ("/no/such/model.pt", None, "cannot read model"),
        ("torchvision:resnet50", None, "unknown torchvision model"),
        ("/no/such/model.pt", "DEFAULT", "only applies to torchvision"),
    ],
)
def test_unusable_specs_are_clear_errors(spec, weights, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve_model(spec, weights=weights)


def test_default_weights_are_never_downloaded(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ModelLoadError, match="not in torchvision's cache"):
        resolve_model("torchvision:maskrcnn_resnet50_fpn", weights="DEFAULT")


def test_card_rejects_unknown_keys():
    card = ModelCard(name="x", architecture="maskrcnn_resnet18_fpn_lite", classes=("a",))
    assert ModelCard.from_dict(card.to_dict()) == card
    with pytest.raises(ModelLoadError, match="unknown keys"):
        ModelCard.from_dict({**card.to_dict(), "thresh": 1})
    with pytest.raises(ModelLoadError, match="unknown architecture"):
        build_model(ModelCard(name="x", architecture="nope", classes=("a",)))


def test_a_card_says_how_its_masks_are_pasted_and_older_cards_keep_torchvisions_paste():
    written_before = ModelCard(name="x", architecture="maskrcnn_resnet18_fpn_lite", classes=("a",)).to_dict()
    del written_before["mask_paste"]
    assert ModelCard.from_dict(written_before).mask_paste == "torchvision"
    assert ModelCard.from_dict({**written_before, "mask_paste": "continuous"}).mask_paste == "continuous"
    with pytest.raises(ModelLoadError, match="mask_paste 'centre' is not one of"):
        ModelCard.from_dict({**written_before, "mask_paste": "centre"})
    assert resolve_model(None).card.mask_paste == "continuous"


def test_a_card_may_give_each_test_time_augmentation_its_own_score_threshold():
    card = ModelCard(
        name="x",
        architecture="maskrcnn_resnet18_fpn_lite",
        classes=("a",),
        score_threshold=0.8,
        tta_score_thresholds={"flips": 0.7},
    )
    assert [card.default_score_threshold(m) for m in ("none", "flips", "dihedral")] == [0.8, 0.7, 0.8]
    assert ModelCard.from_dict(card.to_dict()) == card
