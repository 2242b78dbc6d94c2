"""The window grid: cores partition the slide, windows map to the slide, masks move onto it."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.windows import Grid, Window, touches_mask, window_mask_to_slide


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 3000),
    height=st.integers(1, 3000),
    size=st.sampled_from([128, 256, 512, 1024]),
    overlap_fraction=st.floats(0, 0.45),
    downsample=st.sampled_from([1.0, 1.5, 2.0, 3.7, 4.0]),
)
def test_cores_partition_the_slide_and_windows_hold_their_cores(
    width, height, size, overlap_fraction, downsample
):
    overlap = int(size * overlap_fraction) // 2 * 2
    grid = Grid(size, overlap, downsample)
    windows = grid.windows(width, height)
    rng = np.random.default_rng(width * 7919 + height)
    x = np.concatenate([rng.uniform(0, width, 400), [0, width - 1e-6, 0], rng.integers(0, width, 50)])
    y = np.concatenate(
        [rng.uniform(0, height, 400), [0, height - 1e-6, height - 1e-6], rng.integers(0, height, 50)]
    )
    owners = np.sum([w.owns(x, y) for w in windows], axis=0)
    assert (owners == 1).all()  # every point of the slide belongs to exactly one core
    margin, extent = grid.margin, grid.extent
    for w in windows:
        sides = ((w.x, w.core_x0, w.core_x1, width), (w.y, w.core_y0, w.core_y1, height))
        for start, core0, core1, length in sides:
            if length >= extent:  # inside the slide, holding its core and margin wherever the slide goes on
                assert start >= 0 and start + extent <= length
                assert start <= max(core0 - margin, 0) and min(core1 + margin, length) <= start + extent
                if core0 - margin >= 0 and core1 + margin <= length:
                    assert start == core0 - margin  # centred on its core away from the edges
            else:  # one window wider than the slide: padded
                assert start == core0 - margin and core1 + margin == start + extent
        assert Window.from_row(w.row()) == w


def test_a_window_row_maps_window_pixels_onto_the_slide():
    window = Grid(256, 64, 2.0).windows(2000, 2000)[5]
    x, y = window.to_slide(np.array([0.0, 10.5]), np.array([0.0, 3.0]))
    assert x.tolist() == [window.x, window.x + 21.0] and y.tolist() == [window.y, window.y + 6.0]
    square = shapely.box(0, 0, 10, 5)
    (moved,) = shapely.from_wkb(window.polygons_to_slide([shapely.to_wkb(square)]))
    assert moved.equals(shapely.box(window.x, window.y, window.x + 20, window.y + 10))


@pytest.mark.parametrize("downsample", [1.0, 2.0])
def test_a_window_mask_becomes_a_box_local_crop_in_slide_pixels(downsample):
    mask = np.zeros((64, 64), bool)
    mask[10:20, 30:34] = True
    crop = window_mask_to_slide(mask, -32.0, 100.0, downsample)
    assert (crop.x0, crop.y0) == (round(-32 + 30 * downsample), round(100 + 10 * downsample))
    assert crop.mask.shape == (round(10 * downsample), round(4 * downsample)) and crop.mask.all()


def test_windows_are_laid_only_where_their_core_touches_the_mask():
    mask = np.zeros((100, 100), bool)
    mask[10:20, 10:20] = True  # 10 level-0 px per mask pixel: tissue at [100, 200)^2
    windows = Grid(128, 16, 1.0).windows(1000, 1000, touches_mask(mask, 10.0))
    cores = {(w.core_x0, w.core_y0) for w in windows}
    assert cores == {(0, 0), (112, 0), (0, 112), (112, 112)}  # pitch 112: [0, 224) covers [100, 200)


def test_an_odd_or_too_large_overlap_is_refused():
    for overlap in (-2, 3, 256):
        with pytest.raises(ValueError, match="tile overlap"):
            Grid(256, overlap, 1.0)
