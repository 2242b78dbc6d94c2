"""Overlap suppression and exclusive pixels, box-local, against full-canvas brute force (holes filled
by scipy's ``binary_fill_holes``)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import binary_fill_holes

from pipeline.masks import Crop
from pipeline.postprocess import exclusive_pixels, filled, suppress_overlaps

SIZE = (40, 50)


def canvas(crop: Crop) -> np.ndarray:
    full = np.zeros(SIZE, bool)
    h, w = crop.mask.shape
    full[crop.y0 : crop.y0 + h, crop.x0 : crop.x0 + w] = crop.mask
    return full


@st.composite
def crop_lists(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    crops = []
    for _ in range(draw(st.integers(0, 8))):
        h, w = int(rng.integers(1, 15)), int(rng.integers(1, 15))
        y0, x0 = int(rng.integers(0, SIZE[0] - h + 1)), int(rng.integers(0, SIZE[1] - w + 1))
        crops.append(Crop(rng.random((h, w)) < rng.uniform(0.2, 1.0), x0, y0))
    return crops


@settings(max_examples=300, deadline=None)
@given(crop_lists(), st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0]))
def test_suppression_equals_brute_force(crops, threshold):
    full = [canvas(c) for c in crops]
    expected = []
    for j, mask in enumerate(full):
        suppressed = (
            threshold < 1
            and mask.any()
            and any(
                expected[i]
                and full[i].any()
                and (binary_fill_holes(full[i]) & mask).sum() > threshold * min(full[i].sum(), mask.sum())
                for i in range(j)
            )
        )
        expected.append(not suppressed)
    assert suppress_overlaps(crops, threshold).tolist() == expected


@settings(max_examples=300, deadline=None)
@given(crop_lists())
def test_exclusive_pixels_equals_label_map(crops):
    owner = np.zeros(SIZE, np.int32)
    for k in range(len(crops), 0, -1):  # lower scores first, so higher scores overwrite
        owner[canvas(crops[k - 1])] = k
    result = exclusive_pixels(crops)
    for k, crop in enumerate(result, start=1):
        assert (crop.x0, crop.y0, crop.mask.shape) == (
            crops[k - 1].x0,
            crops[k - 1].y0,
            crops[k - 1].mask.shape,
        )
        assert np.array_equal(canvas(crop), owner == k)


def test_fragment_inside_a_whole_nucleus_is_suppressed_neighbours_are_not():
    whole = np.zeros((20, 20), bool)
    whole[2:18, 2:18] = True
    fragment = np.ones((6, 8), bool)
    neighbour = np.ones((16, 16), bool)
    crops = [Crop(whole, 0, 0), Crop(fragment, 5, 5), Crop(neighbour, 17, 2)]
    assert suppress_overlaps(crops, 0.5).tolist() == [True, False, True]


def test_an_instance_in_a_hole_of_a_higher_scoring_one_is_part_of_it():
    """A dark nucleolus detected inside a nucleus whose mask leaves it out: suppressed; the other
    way round (the small one scores higher) nothing lies inside a higher-scoring mask."""
    yy, xx = np.mgrid[:30, :30]
    distance = np.hypot(yy - 15, xx - 15)
    ring = distance < 13
    ring[distance < 5] = False  # the hole
    spot = np.ones((7, 7), bool)
    assert suppress_overlaps([Crop(ring, 0, 0), Crop(spot, 12, 12)], 0.7).tolist() == [True, False]
    assert suppress_overlaps([Crop(spot, 12, 12), Crop(ring, 0, 0)], 0.7).tolist() == [True, True]
    assert filled(ring).sum() == (distance < 13).sum() and filled(spot).all()


@settings(max_examples=200, deadline=None)
@given(crop_lists())
def test_holes_filled_in_a_crop_equal_scipys_on_the_whole_canvas(crops):
    for crop in crops:
        ours = canvas(Crop(filled(crop.mask), crop.x0, crop.y0))
        assert np.array_equal(ours, binary_fill_holes(canvas(crop)))
