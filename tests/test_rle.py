"""Stored COCO RLEs read back inside a box, against pycocotools' full-canvas decode."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils

from pipeline.rle import decode_box, decode_in_own_box


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([(1, 1), (7, 3), (31, 50), (64, 257), (100, 1000)]),
    st.sampled_from(["random", "zeros", "ones", "sparse"]),
    st.integers(0, 2**31 - 1),
)
def test_a_box_of_an_rle_decodes_as_pycocotools_does_on_the_full_canvas(size, kind, seed):
    """decode_box = mask_utils.decode(rle)[box], for compressed and plain counts, runs that wrap
    from one column into the next, masks on the border, empty and full boxes; decode_in_own_box
    = the mask inside pycocotools' toBbox box."""
    rng = np.random.default_rng(seed)
    height, width = size
    full = {
        "random": rng.random(size) < 0.5,
        "zeros": np.zeros(size, bool),
        "ones": np.ones(size, bool),
        "sparse": rng.random(size) < 0.02,
    }[kind].astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(full))
    x0, x1 = np.sort(rng.integers(0, width + 1, 2))
    y0, y1 = np.sort(rng.integers(0, height + 1, 2))
    expected = mask_utils.decode(rle)[y0:y1, x0:x1]
    np.testing.assert_array_equal(decode_box(rle, x0, y0, x1, y1), expected)
    as_text = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    np.testing.assert_array_equal(decode_box(as_text, 0, 0, width, height), full)
    plain = {"size": [height, width], "counts": _run_lengths(full)}
    np.testing.assert_array_equal(decode_box(plain, x0, y0, x1, y1), expected)
    bx, by, bw, bh = (int(v) for v in mask_utils.toBbox(rle))
    own, own_x0, own_y0 = decode_in_own_box(rle)
    assert (own_x0, own_y0, own.shape) == (bx, by, (bh, bw))
    np.testing.assert_array_equal(own, full[by : by + bh, bx : bx + bw])


def _run_lengths(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO counts of a mask: column-major runs, background first."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    lengths = np.diff(bounds).tolist()
    return [0, *lengths] if flat[0] else lengths
