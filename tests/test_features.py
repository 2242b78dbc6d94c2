"""Shape and intensity features against scikit-image ``regionprops``, many instances encoded at once."""

from __future__ import annotations

import math

import cv2
import numba
import numpy as np
import pytest
from skimage.measure import regionprops

from pipeline.features import compiled
from pipeline.masks import Crop, encode_crops

SHAPE = ("axis_major_length", "axis_minor_length", "eccentricity", "orientation", "solidity")
INTENSITY = ("intensity_mean", "intensity_std", "intensity_min", "intensity_max")


def random_crops(rng: np.random.Generator, image_size: tuple[int, int], count: int) -> list[Crop]:
    """Random masks: noisy blobs, ellipses with holes, lines, single pixels; some touching the border."""
    height, width = image_size
    crops = []
    for k in range(count):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        kind = k % 4
        if kind == 0:
            mask = rng.random((h, w)) < rng.uniform(0.3, 0.95)
        elif kind == 1:
            mask = np.zeros((h, w), np.uint8)
            cv2.ellipse(
                mask, (w // 2, h // 2), (max(w // 2, 1), max(h // 3, 1)), rng.uniform(0, 180), 0, 360, 1, -1
            )
            if h > 8 and w > 8:
                cv2.circle(mask, (w // 2, h // 2), 2, 0, -1)  # a hole
            mask = mask.astype(bool)
        elif kind == 2:
            mask = np.zeros((h, w), bool)
            mask[rng.integers(h), :] = True  # a line
        else:
            mask = np.zeros((1, 1), bool)
            mask[0, 0] = True  # one pixel
        x0 = int(rng.integers(0, max(width - mask.shape[1], 1)))
        y0 = int(rng.integers(0, max(height - mask.shape[0], 1)))
        mask = mask[: height - y0, : width - x0]
        crops.append(Crop(mask, x0, y0))
    return crops


IMAGES = {
    "8-bit grey": lambda rng, size: rng.integers(0, 256, (*size, 1)).astype(np.uint8),
    "8-bit RGB": lambda rng, size: rng.integers(0, 256, (*size, 3)).astype(np.uint8),
    "16-bit, 3 channels": lambda rng, size: rng.integers(0, 65536, (*size, 3)).astype(np.uint16),
    "float, 2 channels": lambda rng, size: rng.normal(100, 30, (*size, 2)).astype(np.float32),
}


@pytest.mark.parametrize("kind", sorted(IMAGES))
@pytest.mark.parametrize("seed", range(6))
def test_features_equal_regionprops(kind, seed):
    rng = np.random.default_rng([seed, len(kind)])
    size = (90, 120)
    pixels = IMAGES[kind](rng, size)
    crops = random_crops(rng, size, 24)
    columns = encode_crops(crops, size, pixels)
    assert len(columns) == len(crops)
    for i, crop in enumerate(crops):
        label = np.zeros(size, np.uint8)
        h, w = crop.mask.shape
        label[crop.y0 : crop.y0 + h, crop.x0 : crop.x0 + w] = crop.mask
        if not label.any():
            assert np.isnan(columns["solidity"][i])
            continue
        (reference,) = regionprops(label, intensity_image=pixels)
        for name in SHAPE:
            assert columns[name][i] == pytest.approx(getattr(reference, name), abs=1e-9), (name, i)
        if reference.perimeter > 0:
            circularity = 4 * math.pi * reference.area / reference.perimeter**2
            assert columns["circularity"][i] == pytest.approx(circularity, rel=1e-12)
        for name in INTENSITY:
            # regionprops sums float32 images in float32; ours sums in float64.
            expected = np.atleast_1d(getattr(reference, name))
            np.testing.assert_allclose(columns[name][i], expected, rtol=1e-6, atol=1e-6, err_msg=name)
        integrated = pixels[label.astype(bool)].astype(np.float64).sum(axis=0)
        np.testing.assert_allclose(columns["intensity_integrated"][i], integrated, rtol=1e-12)
        assert len(columns["intensity_mean"][i]) == pixels.shape[2]


def test_circularity_uses_the_regionprops_perimeter_about_one_for_a_disc():
    disc = np.zeros((41, 41), np.uint8)
    cv2.circle(disc, (20, 20), 18, 1, -1)
    line = np.ones((2, 60), bool)
    crops = [Crop(disc.astype(bool), 0, 0), Crop(line, 0, 50)]
    columns = encode_crops(crops, (60, 60))
    for crop, circularity, area in zip(crops, columns["circularity"], columns["area"], strict=True):
        (reference,) = regionprops(crop.mask.astype(np.uint8))
        assert circularity == pytest.approx(4 * math.pi * area / reference.perimeter**2, rel=1e-12)
    assert 0.85 < columns["circularity"][0] < 1.0
    assert columns["circularity"][1] < 0.2


@pytest.mark.parametrize(
    "make_pixels",
    [
        lambda rng: rng.integers(-3000, 3000, (50, 60, 4)).astype(np.int16)[:, :, ::2],  # a strided view
        lambda rng: rng.normal(0, 1, (60, 50, 1)).astype(np.float64).transpose(1, 0, 2),  # column-major
        lambda rng: rng.random((50, 60, 1)) < 0.5,  # a binary image
    ],
    ids=["int16 strided", "float64 transposed", "bool"],
)
def test_intensity_of_any_dtype_and_memory_layout(make_pixels):
    rng = np.random.default_rng(7)
    pixels = make_pixels(rng)
    crops = random_crops(rng, pixels.shape[:2], 12)
    columns = encode_crops(crops, pixels.shape[:2], pixels)
    for i, crop in enumerate(crops):
        inside = np.zeros(pixels.shape[:2], bool)
        h, w = crop.mask.shape
        inside[crop.y0 : crop.y0 + h, crop.x0 : crop.x0 + w] = crop.mask
        values = pixels[inside].astype(np.float64)
        np.testing.assert_allclose(columns["intensity_mean"][i], values.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(columns["intensity_std"][i], values.std(axis=0), rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(columns["intensity_min"][i], values.min(axis=0))
        np.testing.assert_array_equal(columns["intensity_max"][i], values.max(axis=0))


def test_a_kernel_compiles_where_numba_cannot_cache_it():
    namespace = {}
    exec("def twice(values):\n    return values * 2\n", namespace)  # no source file: no cache location
    with pytest.raises(RuntimeError, match="cannot cache"):
        numba.njit(cache=True)(namespace["twice"])
    kernel = compiled(namespace["twice"])
    np.testing.assert_array_equal(kernel(np.arange(3)), [0, 2, 4])
