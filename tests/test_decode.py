"""Decoding policy: odd but valid images are handled, broken ones get the right error kind."""

from __future__ import annotations

import io
import warnings
import zlib

import cv2
import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.decode import (
    EXIF_ORIENTATION_TAG,
    DecodeError,
    RawImage,
    decode_image,
    read_and_decode,
    sniff_format,
)
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
            assert isinstance(result, RawImage), (name, result)
            assert result.size == want.size and result.pixels.ndim == 3, name
            assert len(result.channel_names) == result.pixels.shape[2] in (1, 3), name
        else:
            assert isinstance(result, DecodeError) and result.kind == want.status, (name, result)
            assert result.message and "\n" not in result.message


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "r.jpg"
    path.write_bytes(exif_rotated_jpeg())
    upright = read_and_decode(str(path), max_pixels=MAX_PIXELS).pixels
    # Stored: red left half of a 40 x 20 image. Rotated 90° clockwise, red is the top half.
    assert upright.shape == (40, 20, 3)
    assert upright[:18, :, 0].mean() > 200 and upright[:18, :, 1].mean() < 50
    assert upright[22:, :, 0].mean() < 50


def test_native_bit_depth_is_kept(corpus):
    root, _ = corpus
    gray16 = read_and_decode(str(root / "odd/gray16.tif"), max_pixels=MAX_PIXELS)
    assert gray16.pixels.dtype == np.uint16 and gray16.pixels.shape == (16, 16, 1)
    assert (gray16.pixels == 65535).all() and gray16.channel_names == ("gray",)
    rgb16 = read_and_decode(str(root / "odd/rgb16.tiff"), max_pixels=MAX_PIXELS)
    assert rgb16.pixels.dtype == np.uint16 and (rgb16.pixels == 32768).all()
    assert rgb16.channel_names == ("red", "green", "blue")
    floats = read_and_decode(str(root / "odd/float.tif"), max_pixels=MAX_PIXELS)
    assert floats.pixels.dtype == np.float32 and (floats.pixels == 0.5).all()
    gray8 = read_and_decode(str(root / "odd/gray.png"), max_pixels=MAX_PIXELS)
    assert gray8.pixels.dtype == np.uint8 and gray8.pixels.shape == (24, 32, 1)


def _tiff(array: np.ndarray, **kwargs) -> bytes:
    out = io.BytesIO()
    tifffile.imwrite(out, array, **kwargs)
    return out.getvalue()


def test_a_12_bit_camera_png_keeps_its_values(tmp_path):
    values = (np.arange(40 * 50).reshape(40, 50) % 4096).astype(np.uint16)
    path = tmp_path / "camera.png"
    cv2.imwrite(str(path), values)
    raw = read_and_decode(str(path), max_pixels=MAX_PIXELS)
    assert raw.pixels.dtype == np.uint16 and np.array_equal(raw.pixels[..., 0], values)


def test_16_bit_colour_pngs_keep_their_low_byte():
    """OpenCV (BGR order) and imagecodecs write them; Pillow alone would keep only each value's high byte."""
    red = (np.arange(30 * 40).reshape(30, 40) * 37 % 65536).astype(np.uint16)
    green, blue = red // 2, red // 3
    for channels in ([blue, green, red], [blue, green, red, np.full_like(red, 65535)]):
        data = cv2.imencode(".png", np.dstack(channels))[1].tobytes()
        raw = decode_image(data, max_pixels=MAX_PIXELS)
        assert raw.pixels.dtype == np.uint16 and raw.channel_names == ("red", "green", "blue")
        assert np.array_equal(raw.pixels, np.dstack([red, green, blue]))
    grey_alpha = imagecodecs.png_encode(np.dstack([red, np.full_like(red, 65535)]))
    raw = decode_image(grey_alpha, max_pixels=MAX_PIXELS)
    assert raw.channel_names == ("gray",) and np.array_equal(raw.pixels[..., 0], red)
    too_large = decode_image(data, max_pixels=30 * 40 - 1)
    assert isinstance(too_large, DecodeError) and too_large.kind == "too_large"
    truncated = decode_image(data[: len(data) // 2], max_pixels=MAX_PIXELS)
    assert isinstance(truncated, DecodeError) and truncated.kind == "decode"


def _with_exif_orientation(png: bytes, orientation: int) -> bytes:
    """``png`` with an eXIf chunk (EXIF orientation ``orientation``) inserted after its IHDR."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    body = b"eXIf" + exif.tobytes().removeprefix(b"Exif\x00\x00")
    chunk = (len(body) - 4).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    return png[:33] + chunk + png[33:]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_16_bit_colour_pngs_are_turned_upright_as_pillow_turns_8_bit_ones(orientation):
    values = (np.arange(30 * 40 * 3).reshape(30, 40, 3) * 41 % 65536).astype(np.uint16)
    eight_bit = io.BytesIO()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    Image.fromarray((values >> 8).astype(np.uint8)).save(eight_bit, format="PNG", exif=exif)
    reference = decode_image(eight_bit.getvalue(), max_pixels=MAX_PIXELS).pixels
    png = _with_exif_orientation(imagecodecs.png_encode(values), orientation)
    sixteen_bit = decode_image(png, max_pixels=MAX_PIXELS)
    assert sixteen_bit.pixels.dtype == np.uint16
    assert np.array_equal(sixteen_bit.pixels >> 8, reference)
    assert (sixteen_bit.pixels.shape[:2] == (30, 40)) == (orientation < 5)


def test_ome_tiff_channels_keep_their_names_and_values():
    stack = np.arange(3 * 20 * 30, dtype=np.uint16).reshape(3, 20, 30)
    data = _tiff(stack, ome=True, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP", "RFP"]}})
    raw = decode_image(data, max_pixels=MAX_PIXELS)
    assert raw.channel_names == ("DAPI", "GFP", "RFP")
    assert np.array_equal(raw.pixels, stack.transpose(1, 2, 0))


def test_a_hyperstack_gives_its_first_plane_with_every_channel():
    stack = np.random.default_rng(0).integers(0, 4096, (2, 4, 3, 20, 30), dtype=np.uint16)
    raw = decode_image(_tiff(stack, imagej=True, metadata={"axes": "TZCYX"}), max_pixels=MAX_PIXELS)
    assert raw.channel_names == ("c0", "c1", "c2")
    assert np.array_equal(raw.pixels, stack[0, 0].transpose(1, 2, 0))


def test_planar_rgb_and_compressed_tiffs():
    rgb = np.random.default_rng(1).integers(0, 65535, (20, 30, 3), dtype=np.uint16)
    planar = _tiff(rgb.transpose(2, 0, 1).copy(), photometric="rgb", planarconfig="separate")
    assert np.array_equal(decode_image(planar, max_pixels=MAX_PIXELS).pixels, rgb)
    for compression in ("lzw", "zlib", "zstd"):
        data = _tiff(rgb[..., 0], compression=compression)
        assert np.array_equal(decode_image(data, max_pixels=MAX_PIXELS).pixels[..., 0], rgb[..., 0])


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
