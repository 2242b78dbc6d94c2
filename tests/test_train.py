"""Training: the loss falls, an interrupted run resumes exactly, fine-tuning replaces predictors."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from torchvision.models.detection import roi_heads

from jobs import train as train_job
from pipeline import train as train_module
from pipeline.model import resolve_model
from pipeline.paste import paste_continuous
from pipeline.preprocess import Preprocessing
from pipeline.train import (
    PREFETCH_BATCHES,
    TrainConfig,
    aligned_mask_targets,
    augment,
    boxes_from_masks,
    diameter_range,
    mask_targets_at_continuous_coordinates,
    resized,
    train,
)


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory):
    from pipeline.synth import write_archive

    root = tmp_path_factory.mktemp("train-archive")
    return root, write_archive(root, slides=1, tiles_per_slide=4, size=96, seed=5)


def config(root, annotations, output, **overrides):
    values = dict(
        images=str(root),
        annotations=str(annotations),
        output=str(output),
        steps=12,
        batch_size=2,
        warmup_steps=2,
        checkpoint_every=2,
        seed=3,
    )
    return TrainConfig(**{**values, **overrides})


def test_loss_falls_and_checkpoint_loads_weights_only(tiny_archive, tmp_path):
    root, annotations = tiny_archive
    summary = train(config(root, annotations, tmp_path / "m.pt"), progress=False)
    assert summary["last.total"] < summary["first.total"]
    loaded = resolve_model(str(tmp_path / "m.pt"))
    assert loaded.card.classes == ("nucleus",)
    assert loaded.card.training["steps"] == 12
    assert loaded.card.preprocessing == Preprocessing(channel="max", normalize="percentile")
    areas = [a["area"] for a in json.loads(annotations.read_text())["annotations"]]
    assert loaded.card.object_diameter_px == diameter_range(areas)
    assert loaded.card.mask_paste == "continuous"
    assert not (tmp_path / "m.pt.train-state").exists()
    assert 0 <= summary["data_wait_fraction"] < 1


def test_batches_built_ahead_on_threads_train_to_the_same_weights_as_batches_built_in_line(
    tiny_archive, tmp_path
):
    root, annotations = tiny_archive
    for name, prefetch in (("inline", 0), ("ahead", 3)):
        train(config(root, annotations, tmp_path / f"{name}.pt", steps=5), progress=False, prefetch=prefetch)
    inline = resolve_model(str(tmp_path / "inline.pt")).module.state_dict()
    ahead = resolve_model(str(tmp_path / "ahead.pt")).module.state_dict()
    for name in inline:
        assert torch.allclose(inline[name].float(), ahead[name].float(), atol=1e-6), name


def test_the_train_job_reports_loss_and_waiting_and_refuses_a_wrong_flag_in_one_line(
    tiny_archive, tmp_path, capsys
):
    root, annotations = tiny_archive
    common = ["--images", str(root), "--annotations", str(annotations), "--output", str(tmp_path / "m.pt")]
    assert train_job.main([*common, "--steps", "2", "--batch-size", "1"]) == 0
    assert "waited for batches" in capsys.readouterr().out and (tmp_path / "m.pt").exists()
    for flag in ("--steps", "--batch-size", "--checkpoint-every", "--threads"):
        with pytest.raises(SystemExit) as exited:
            train_job.main([*common, flag, "0"])
        assert exited.value.code == 2, flag
        message = f"jobs.train: error: {flag} must be at least 1 (see --help)"
        assert capsys.readouterr().err.strip().splitlines() == [message]
    with pytest.raises(SystemExit) as exited:
        train_job.main([*common, "--prefetch", "-1"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "jobs.train: error: --prefetch must be at least 0 (see --help)"
    ]


def test_the_train_job_builds_as_many_batches_ahead_as_asked(tiny_archive, tmp_path, monkeypatch):
    root, annotations = tiny_archive
    asked = []
    monkeypatch.setattr(train_job, "train", lambda config, prefetch: asked.append(prefetch) or {})
    common = ["--images", str(root), "--annotations", str(annotations), "--output", str(tmp_path / "m.pt")]
    for argv in ([], ["--prefetch", "0"], ["--prefetch", "12"]):
        assert train_job.main([*common, *argv]) == 0
    assert asked == [PREFETCH_BATCHES, 0, 12]


def test_the_diameter_range_leaves_out_the_few_objects_cut_by_a_tile_edge():
    diameters = np.r_[np.full(5, 3.0), np.linspace(10, 40, 490), np.full(5, 90.0)]
    low, high = diameter_range(np.pi * (diameters / 2) ** 2)
    assert 10 <= low < 11 and 39 < high <= 40
    assert diameter_range([]) is None


def killed_from_step(kill_step: int):
    """``training_batch`` that raises KeyboardInterrupt (a kill) when asked for step ``kill_step`` or
    later: batches are built ahead on threads, so the kill is tied to a step, not to a call count."""
    real = train_module.training_batch

    def build(dataset, config, step):
        if step >= kill_step:
            raise KeyboardInterrupt("simulated kill")
        return real(dataset, config, step)

    return build


def test_interrupted_training_resumes_to_the_same_weights(tiny_archive, tmp_path, monkeypatch):
    root, annotations = tiny_archive
    straight = config(root, annotations, tmp_path / "straight.pt", steps=6)
    train(straight, progress=False)

    resumed = config(root, annotations, tmp_path / "resumed.pt", steps=6)
    monkeypatch.setattr(train_module, "training_batch", killed_from_step(4))
    with pytest.raises(KeyboardInterrupt):
        train(resumed, progress=False)
    assert torch.load(tmp_path / "resumed.pt.train-state", weights_only=True)["step"] == 4
    monkeypatch.undo()
    train(resumed, progress=False)

    a = resolve_model(str(tmp_path / "straight.pt")).module.state_dict()
    b = resolve_model(str(tmp_path / "resumed.pt")).module.state_dict()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-6), name


def test_a_training_state_resumes_on_another_device_but_not_under_another_config(
    tiny_archive, tmp_path, monkeypatch
):
    root, annotations = tiny_archive
    run = config(root, annotations, tmp_path / "m.pt", steps=4)
    monkeypatch.setattr(train_module, "training_batch", killed_from_step(2))
    with pytest.raises(KeyboardInterrupt):
        train(run, progress=False)
    monkeypatch.undo()
    state_path = tmp_path / "m.pt.train-state"
    state = torch.load(state_path, weights_only=True)
    assert state["step"] == 2
    state["config"]["device"] = "cuda"
    torch.save(state, state_path)

    with pytest.raises(ValueError, match="different training configuration"):
        train(replace(run, lr=run.lr / 2), progress=False)
    train(run, progress=False)
    assert not state_path.exists()
    assert resolve_model(str(tmp_path / "m.pt")).card.training["steps"] == 4


def test_fine_tuning_keeps_backbone_and_replaces_predictors(tiny_archive, tmp_path, random_model_path):
    root, annotations = tiny_archive
    import json

    coco = json.loads(annotations.read_text())
    coco["categories"] = [
        {"id": 1, "name": "cell"},
        {"id": 2, "name": "dividing"},
        {"id": 3, "name": "debris"},
    ]
    relabelled = tmp_path / "relabelled.json"
    relabelled.write_text(json.dumps(coco))
    before = resolve_model(str(random_model_path)).module.state_dict()
    train(
        config(root, relabelled, tmp_path / "ft.pt", init=str(random_model_path), steps=1, lr=0.0),
        progress=False,
    )
    tuned = resolve_model(str(tmp_path / "ft.pt"))
    assert tuned.card.classes == ("cell", "dividing", "debris")
    after = tuned.module.state_dict()
    assert after["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4
    assert after["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 4
    assert torch.equal(
        before["backbone.body.layer1.0.conv1.weight"], after["backbone.body.layer1.0.conv1.weight"]
    )


def test_augmentation_moves_masks_with_the_image_and_varies_appearance():
    """Each mask stays on its own bright object through flips, rotations and scale jitter."""
    image = np.zeros((64, 80, 1), np.float32)
    masks = np.zeros((2, 64, 80), np.uint8)
    image[10:20, 10:30] = 0.9
    masks[0, 10:20, 10:30] = 1
    image[40:60, 50:70] = 0.5
    masks[1, 40:60, 50:70] = 1
    looks = set()
    for seed in range(20):
        out, out_masks = augment(image, masks, np.random.default_rng(seed))
        assert out.shape[:2] == out_masks.shape[1:] and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 1
        inside = [out[..., 0][m.astype(bool)].mean() for m in out_masks]
        outside = out[..., 0][~out_masks.any(0)].mean()
        assert min(inside) > outside + 0.1, seed
        assert out_masks[0].sum() > 0.4 * 200 and out_masks[1].sum() > 0.4 * 400
        looks.add(round(float(inside[0]), 2))
    assert len(looks) > 10  # gamma, contrast, noise and blur change the appearance


def centroid(weights: np.ndarray) -> np.ndarray:
    """(x, y) of a 2-D array's weighted pixel centres, pixel (x, y) centred at (x + 0.5, y + 0.5)."""
    yy, xx = np.mgrid[0 : weights.shape[0], 0 : weights.shape[1]] + 0.5
    return np.array([(weights * xx).sum(), (weights * yy).sum()]) / weights.sum()


@pytest.mark.parametrize("scale", [0.7, 0.85, 1.2, 1.4])
def test_scale_jitter_keeps_each_mask_on_its_object(scale):
    """Resized, a disc's mask keeps the bilinear image's centroid (within 0.15 px; cv2's plain
    INTER_NEAREST moved it 0.5-0.7 px right and down at these scales)."""
    yy, xx = np.mgrid[0:256, 0:256] + 0.5
    disc = ((xx - 100.8) ** 2 + (yy - 121.1) ** 2 < 15**2).astype(np.uint8)
    side = round(256 * scale)
    image, masks = resized(disc[..., None].astype(np.float32), disc[None], (side, side))
    assert image.shape == (side, side, 1) and masks.shape == (1, side, side)
    assert np.abs(centroid(masks[0].astype(float)) - centroid(image[..., 0])).max() < 0.15


def test_mask_targets_are_sampled_at_the_boxes_continuous_coordinates():
    """A disc's target grid over its own box, pasted back at the box's continuous coordinates, is the
    disc again; torchvision's targets (``aligned=False``) land it half a pixel up and left."""
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    disc = ((xx - 30.3) ** 2 + (yy - 28.7) ** 2 < 9.5**2).astype(np.uint8)
    masks = torch.from_numpy(disc[None])
    box = torch.from_numpy(boxes_from_masks(disc[None]))
    matched = torch.zeros(1, dtype=torch.int64)
    offsets = {}
    for name, targets in (
        ("continuous", mask_targets_at_continuous_coordinates),
        ("torchvision", roi_heads.project_masks_on_boxes),
    ):
        crop = paste_continuous(targets(masks, box, matched, 28), box, (64, 64), 0.5)[0]
        pasted = np.zeros((64, 64))
        h, w = crop.mask.shape
        pasted[crop.y0 : crop.y0 + h, crop.x0 : crop.x0 + w] = crop.mask
        offsets[name] = centroid(pasted) - centroid(disc.astype(float))
        if name == "continuous":
            assert (pasted.astype(bool) & disc.astype(bool)).sum() / (pasted + disc > 0).sum() > 0.97
    assert np.abs(offsets["continuous"]).max() < 0.05
    assert (offsets["torchvision"] < -0.3).all()


def test_training_takes_its_mask_targets_at_continuous_coordinates(tiny_archive, tmp_path, monkeypatch):
    """Every image of every step (2 x 2 here) gets its mask targets from our function, and
    torchvision's is back in place after training."""
    calls = []

    def counted(*args):
        calls.append(len(args[1]))
        return mask_targets_at_continuous_coordinates(*args)

    original = roi_heads.project_masks_on_boxes
    monkeypatch.setattr(train_module, "mask_targets_at_continuous_coordinates", counted)
    root, annotations = tiny_archive
    train(config(root, annotations, tmp_path / "m.pt", steps=2), progress=False)
    assert len(calls) == 4 and min(calls) > 0
    assert roi_heads.project_masks_on_boxes is original
    with aligned_mask_targets():
        assert roi_heads.project_masks_on_boxes is counted
