"""Decoding policy: odd but valid images are handled, broken ones get the right error kind."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pipeline.decode import DecodeError, read_and_decode, sniff_format
from tests.corpus import MAX_PIXELS, exif_rotated_jpeg, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)


def test_every_corpus_file_gets_its_status_and_size(corpus):
    root, expected = corpus
    assert len(expected) >= 14
    for name, want in expected.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = read_and_decode(str(root / name), max_pixels=MAX_PIXELS)
        if want.status == "ok":
            assert isinstance(result, np.ndarray), (name, result)
            assert result.shape == (*want.size, 3) and result.dtype == np.uint8, name
        else:
            assert isinstance(result, DecodeError) and result.kind == want.status, (name, result)
            assert result.message and "\n" not in result.message


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "r.jpg"
    path.write_bytes(exif_rotated_jpeg())
    upright = read_and_decode(str(path), max_pixels=MAX_PIXELS)
    # Stored: red left half of a 40 x 20 image. Rotated 90° clockwise, red is the top half.
    assert upright.shape == (40, 20, 3)
    assert upright[:18, :, 0].mean() > 200 and upright[:18, :, 1].mean() < 50
    assert upright[22:, :, 0].mean() < 50


def test_high_bit_depth_and_float_policy(corpus):
    root, _ = corpus
    assert (read_and_decode(str(root / "odd/gray16.tif"), max_pixels=MAX_PIXELS) == 255).all()
    assert (read_and_decode(str(root / "odd/rgb16.tiff"), max_pixels=MAX_PIXELS) == 128).all()
    assert (read_and_decode(str(root / "odd/float.tif"), max_pixels=MAX_PIXELS) == 128).all()


def test_a_missing_file_is_unreadable_without_retries(tmp_path):
    result = read_and_decode(str(tmp_path / "gone.png"), max_pixels=MAX_PIXELS)
    assert isinstance(result, DecodeError) and result.kind == "unreadable"


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"\x89PNG\r\n\x1a\nrest", "PNG"),
        (b"II*\x00", "TIFF"),
        (b"RIFF\0\0\0\0WEBPVP8 ", "WEBP"),
        (b"<html>", None),
    ],
)
def test_sniff_format(data, name):
    assert sniff_format(data) == name
