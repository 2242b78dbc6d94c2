"""Preprocessing: one function from raw pixels (any bit depth, any channels) to the model's input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
import torch

from pipeline import preprocess
from pipeline.decode import decode_image
from pipeline.model import ModelCard, build_model, resolve_model, save_checkpoint
from pipeline.plan import plain_image_row
from pipeline.preprocess import (
    DEFAULT,
    LEGACY,
    Preprocessing,
    PreprocessingError,
    model_input,
    noise_sigma,
    select_channels,
    with_channel,
)
from pipeline.synth import tile_paths
from pipeline.train import CocoTiles
from pipeline.worker import InferenceSettings, ShardProcessor


def nuclei_scene(seed: int = 0, size: int = 128, noise: float = 0.01) -> np.ndarray:
    """A float scene about [0, 1]: dark background, a few bright discs of different brightness, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    scene = np.full((size, size), 0.05)
    for _ in range(8):
        cx, cy, r = [*rng.uniform(10, size - 10, 2).tolist(), rng.uniform(4, 10)]
        scene[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0.2, 1.0)
    return scene + rng.normal(0, noise, scene.shape)


def test_8_bit_12_bit_16_bit_and_float_give_the_same_input():
    scene = np.clip(nuclei_scene(), 0, 1)
    stored = {
        "uint8": (scene * 250 + 3).astype(np.uint8),
        "12-bit in uint16": (scene * 4000 + 100).astype(np.uint16),
        "low-range uint16 (max 235)": (scene * 230 + 5).astype(np.uint16),
        "uint16": (scene * 60000 + 1000).astype(np.uint16),
        "float32": scene.astype(np.float32),
    }
    reference = model_input(stored["float32"][..., None], DEFAULT)
    assert reference.shape == (1, 128, 128) and reference.dtype == np.float32
    assert reference.min() >= 0 and reference.max() <= 1 and reference.max() > 0.99
    for name, pixels in stored.items():
        prepared = model_input(pixels[..., None], DEFAULT)
        assert np.abs(prepared - reference).mean() < 0.01, name


def test_the_range_convention_of_older_checkpoints_is_kept_exactly():
    """LEGACY is the pipeline before preprocessing lived in the card: uint8 / 255, 16-bit through 8 bits."""
    rgb = np.random.default_rng(0).integers(0, 256, (8, 9, 3), np.uint8)
    legacy = model_input(rgb, LEGACY)
    assert legacy.shape == (3, 8, 9)
    assert np.array_equal(legacy, torch.from_numpy(rgb).permute(2, 0, 1).float().div(255).numpy())
    gray16 = np.array([[0, 65535, 32768, 257]], np.uint16)[..., None]
    expected = (np.round(gray16[..., 0] / 65535 * 255) / 255).astype(np.float32)
    assert np.allclose(model_input(gray16, LEGACY), np.repeat(expected[None], 3, axis=0))


def test_a_checkpoint_without_preprocessing_gets_the_legacy_entry_which_says_so(tmp_path):
    card = ModelCard(name="old", architecture="maskrcnn_resnet18_fpn_lite", classes=("x",))
    path = tmp_path / "old.pt"
    save_checkpoint(path, build_model(card), card)
    payload = torch.load(path, weights_only=True)
    del payload["card"]["preprocessing"]
    torch.save(payload, path)
    loaded = resolve_model(str(path))
    assert loaded.card.preprocessing == LEGACY
    assert "without a preprocessing entry" in loaded.card.preprocessing.note


def test_preprocessing_round_trips_through_a_checkpoint(tmp_path):
    entry = Preprocessing(channel="DAPI", low=2.0, high=99.5, floor_snr=10.0)
    card = ModelCard(name="m", architecture="maskrcnn_resnet18_fpn_lite", classes=("x",), preprocessing=entry)
    save_checkpoint(tmp_path / "m.pt", build_model(card), card)
    assert resolve_model(str(tmp_path / "m.pt")).card.preprocessing == entry
    with pytest.raises(PreprocessingError):
        Preprocessing.from_dict({"channel": "max", "gamma": 2})
    with pytest.raises(PreprocessingError):
        Preprocessing(low=50, high=10)


def test_channel_choice_by_max_index_and_name():
    pixels = np.zeros((4, 5, 3), np.uint16)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 10, 30, 20
    names = ("DAPI", "GFP", "RFP")
    assert (select_channels(pixels, "max") == 30).all()
    assert (select_channels(pixels, 2) == 20).all()
    assert (select_channels(pixels, "DAPI", names) == 10).all()
    assert (select_channels(pixels, "blue") == 20).all()  # default names of three channels
    assert select_channels(pixels, "rgb").shape == (4, 5, 3)
    assert select_channels(pixels[..., :1], "rgb").shape == (4, 5, 3)
    with pytest.raises(PreprocessingError, match="no channel named 'Cy5'"):
        select_channels(pixels, "Cy5", names)
    with pytest.raises(PreprocessingError, match="out of range"):
        select_channels(pixels, 3)
    assert with_channel(DEFAULT, "2").channel == 2 and with_channel(DEFAULT, None) == DEFAULT


def test_channel_choice_on_an_ome_tiff_picks_the_named_channel():
    scene = np.clip(nuclei_scene(1), 0, 1)
    stack = np.stack([np.full_like(scene, 0.5), scene, scene[::-1]]).astype(np.float32)
    out = io.BytesIO()
    tifffile.imwrite(
        out, stack, ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["GFP", "DAPI", "RFP"]}}
    )
    raw = decode_image(out.getvalue(), max_pixels=10**6)
    by_name = model_input(raw.pixels, with_channel(DEFAULT, "DAPI"), channel_names=raw.channel_names)
    by_index = model_input(raw.pixels, with_channel(DEFAULT, 1), channel_names=raw.channel_names)
    alone = model_input(scene.astype(np.float32)[..., None], DEFAULT)
    assert np.array_equal(by_name, by_index) and np.array_equal(by_name, alone)


def test_a_background_only_tile_is_not_stretched_into_noise():
    rng = np.random.default_rng(0)
    for offset, sigma, dtype in ((100, 4.0, np.uint16), (12, 2.0, np.uint8), (0.02, 0.003, np.float32)):
        background = (offset + rng.normal(0, sigma, (256, 256))).astype(dtype)[..., None]
        floored = model_input(background, DEFAULT)
        stretched = model_input(background, Preprocessing(floor_snr=0))
        assert stretched.max() == 1.0 and np.percentile(stretched, 50) > 0.3
        assert floored.max() < 0.35 and np.percentile(floored, 50) < 0.15, (dtype, floored.max())
    # With nuclei, the floor does not bind: the brightest nucleus still reaches 1.
    scene = (nuclei_scene() * 1000 + 100).astype(np.uint16)[..., None]
    assert model_input(scene, DEFAULT).max() == 1.0


def test_noise_sigma_reads_the_noise_not_the_objects():
    rng = np.random.default_rng(0)
    noisy = nuclei_scene(noise=0) * 1000 + rng.normal(0, 7.0, (128, 128))
    assert noise_sigma(noisy) == pytest.approx(7.0, rel=0.1)
    flat = np.full((64, 64), 10, np.uint8)
    assert noise_sigma(flat) == 1.0  # one grey level at least for integers


def test_noise_sigma_of_a_region_ignores_the_rest_of_the_image():
    """``where``: only pairs inside it count, so texture covering most of an image does not leak in."""
    rng = np.random.default_rng(1)
    image = rng.normal(100, 4.0, (128, 128))
    image[:, 40:] += rng.normal(0, 60.0, (128, 88))  # a textured object over two thirds of the image
    background = np.zeros((128, 128), bool)
    background[:, :40] = True
    assert noise_sigma(image) > 20
    assert noise_sigma(image, where=background) == pytest.approx(4.0, rel=0.1)
    assert noise_sigma(image.astype(np.uint16), where=np.zeros((128, 128), bool)) == 1.0


def test_training_and_inference_prepare_images_with_the_same_function(archive, random_model_path):
    """The bytes a replica prepares and the bytes training prepares are the same array."""
    coco = CocoTiles(archive, archive / "annotations.json", DEFAULT)
    loaded = resolve_model(str(random_model_path))
    assert loaded.card.preprocessing == DEFAULT
    settings = InferenceSettings(
        score_threshold=0.5,
        mask_threshold=0.5,
        max_detections=10,
        batch_size=1,
        max_pixels=10**6,
        preprocessing=loaded.card.preprocessing,
    )
    processor = ShardProcessor(loaded.card, loaded.module.state_dict(), settings)
    paths = tile_paths(archive)
    assert {p.suffix for p in paths} >= {".png", ".tif"}
    for index, info in enumerate(coco.images):
        found, inference_input = processor.prepare(plain_image_row(str(archive / info["file_name"])))
        raw = found.raw
        training_input = coco.model_input(index).transpose(2, 0, 1)
        assert np.array_equal(inference_input, training_input)
        direct = model_input(raw.pixels, DEFAULT, channel_names=raw.channel_names)
        assert np.array_equal(inference_input, direct)


def test_a_missing_channel_makes_the_image_unsupported_not_the_shard(archive, random_model_path):
    loaded = resolve_model(str(random_model_path))
    settings = InferenceSettings(
        score_threshold=0.5,
        mask_threshold=0.5,
        max_detections=10,
        batch_size=1,
        max_pixels=10**6,
        preprocessing=preprocess.with_channel(DEFAULT, "GFP"),
    )
    processor = ShardProcessor(loaded.card, loaded.module.state_dict(), settings)
    rows = [plain_image_row(str(p), i, "s") for i, p in enumerate(tile_paths(archive))]
    output = processor.process(rows)
    assert set(output.images.column("status").to_pylist()) == {"unsupported"}
    assert "no channel named 'GFP'" in output.images.column("error").to_pylist()[0]
