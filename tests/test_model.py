"""Model cards, safe checkpoint loading, and inference that matches forward()."""

from __future__ import annotations

import pickle

import pytest
import torch

from pipeline.infer import detect
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
