"""Whole-slide reading, tissue and planning: SVS / pyramidal TIFF / OME-TIFF, local and S3, bad slides."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import tifffile

from pipeline import storage
from pipeline.preprocess import DEFAULT
from pipeline.slides import Slide, SlideCache, SlideSettings, is_slide_candidate, plan_slide, slide_id_of
from pipeline.synth import write_slide
from pipeline.windows import Grid
from tests.helpers import painted_slide

NUCLEI_LEFT = [(60 + 90 * i, 60 + 90 * j, 14) for i in range(4) for j in range(8)]
"""Nuclei only in the left half (x < 400) of a 768 px slide."""


@pytest.fixture(scope="module")
def left_half_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "left.svs"
    painted_slide(path, NUCLEI_LEFT)
    return path


def test_an_svs_is_described_from_its_header(left_half_slide):
    slide = Slide(str(left_half_slide))
    info = slide.info
    assert (info.width, info.height, info.vendor, info.mpp) == (768, 768, "aperio", 0.5)
    assert info.level_dimensions == ((768, 768), (192, 192), (48, 48)) and info.level_downsamples == (
        1,
        4,
        16,
    )
    assert info.tiled and info.channels == ("red", "green", "blue") and info.dtype == "uint8"
    slide.close()


def test_a_window_is_the_slides_pixels_and_glass_beyond_its_edge(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (600, 700, 3), dtype=np.uint8)
    pixels[:8], pixels[-8:], pixels[:, :8], pixels[:, -8:] = 7, 7, 7, 7  # the glass, measured on the border
    write_slide(tmp_path / "s.svs", pixels, compression="zlib")
    slide = Slide(str(tmp_path / "s.svs"))
    windows = Grid(256, 32, 1.0).windows(700, 600)  # pitch 224: 4 columns, 3 rows
    inner, first, last = windows[5], windows[0], windows[-1]
    assert (inner.x, inner.y) == (208, 208)
    np.testing.assert_array_equal(slide.read_window(inner), pixels[208:464, 208:464])
    assert (first.x, first.y) == (0, 0) and (last.x, last.y) == (700 - 256, 600 - 256)  # moved inside
    np.testing.assert_array_equal(slide.read_window(first), pixels[:256, :256])
    np.testing.assert_array_equal(slide.read_window(last), pixels[-256:, -256:])
    (larger,) = Grid(1024, 32, 1.0).windows(700, 600)  # a window larger than the slide reads glass beyond it
    padded = slide.read_window(larger)
    assert (larger.x, larger.y) == (-16, -16) and padded.shape == (1024, 1024, 3)
    np.testing.assert_array_equal(padded[16:616, 16:716], pixels)
    assert (padded[:16] == 7).all() and (padded[:, :16] == 7).all() and (padded[616:] == 7).all()
    slide.close()


def test_tissue_detection_lays_no_window_on_empty_glass(left_half_slide, tmp_path):
    planned = plan_slide(str(left_half_slide), SlideSettings(tile_size=128, tile_overlap=32))
    assert planned.row["status"] == "ok" and planned.windows
    assert max(w.core_x0 for w in planned.windows) < 480  # nuclei end at x = 344
    assert planned.row["tiles_planned"] < planned.row["tiles_total"] == 64  # pitch 96: 8 x 8
    assert 0.02 < planned.row["tissue_fraction"] < 0.5
    painted_slide(tmp_path / "glass.svs", [])
    empty = plan_slide(str(tmp_path / "glass.svs"), SlideSettings(tile_size=128, tile_overlap=32))
    assert empty.row["status"] == "ok" and empty.windows == [] and empty.row["tiles_planned"] == 0


def test_the_slides_normalisation_does_not_depend_on_the_window_grid(left_half_slide):
    rows = [
        plan_slide(
            str(left_half_slide), SlideSettings(tile_size=t, tile_overlap=o, preprocessing=DEFAULT)
        ).row
        for t, o in ((128, 32), (384, 96))
    ]
    assert rows[0]["intensity_scale"] == rows[1]["intensity_scale"] > 0
    assert rows[0]["intensity_offset"] == rows[1]["intensity_offset"]


def test_mpp_asks_for_a_coarser_level_and_an_unknown_pixel_size_is_flagged(left_half_slide, tmp_path):
    planned = plan_slide(str(left_half_slide), SlideSettings(tile_size=64, tile_overlap=8, mpp=2.0))
    assert planned.row["level"] == 1 and planned.row["tile_downsample"] == 4.0
    tifffile.imwrite(tmp_path / "no-mpp.svs", np.zeros((512, 512), np.uint8), tile=(128, 128))
    unknown = plan_slide(str(tmp_path / "no-mpp.svs"), SlideSettings(tile_size=128, tile_overlap=8, mpp=2.0))
    assert unknown.row["status"] == "unsupported" and "--mpp-override" in unknown.row["error"]
    assert unknown.row["mpp"] is None and unknown.row["mpp_note"] == "the slide states no pixel size"
    override = SlideSettings(tile_size=128, tile_overlap=8, mpp=2.0, mpp_override=1.0, tissue="all")
    fixed = plan_slide(str(tmp_path / "no-mpp.svs"), override)
    assert fixed.row["status"] == "ok" and fixed.row["mpp"] == 1.0 and fixed.row["tile_downsample"] == 2.0


def test_a_slide_on_s3_is_read_by_byte_ranges(s3_bucket, tmp_path):
    pixels = np.random.default_rng(1).integers(0, 255, (2048, 2048, 3), dtype=np.uint8)
    write_slide(tmp_path / "big.svs", pixels, compression="zlib")
    uri = f"s3://{s3_bucket}/slides/big.svs"
    with open(tmp_path / "big.svs", "rb") as source:
        storage.write_bytes_atomic(uri, source.read())
    size = (tmp_path / "big.svs").stat().st_size
    slide = Slide(uri)
    opened = slide.bytes_read
    window = Grid(256, 0, 1.0).windows(2048, 2048)[9]
    np.testing.assert_array_equal(slide.read_window(window), pixels[256:512, 256:512])
    assert opened < 0.05 * size  # the header and tile tables only
    assert slide.bytes_read - opened < 0.1 * size  # the region's tiles, not the file
    slide.close()


def _forged_huge_tiff(path) -> None:
    """A tiled TIFF whose header claims 1,000,000 x 1,000,000 px (its tile table is a 512^2 image's)."""
    tifffile.imwrite(path, np.zeros((512, 512), np.uint8), tile=(256, 256), metadata=None)
    data = bytearray(path.read_bytes())
    offset = struct.unpack_from("<I", data, 4)[0]
    for index in range(struct.unpack_from("<H", data, offset)[0]):
        entry = offset + 2 + 12 * index
        tag = struct.unpack_from("<H", data, entry)[0]
        if tag in (256, 257):  # ImageWidth, ImageLength: made LONG 10^6
            struct.pack_into("<HII", data, entry + 2, 4, 1, 1_000_000)
    path.write_bytes(bytes(data))


def test_bad_slides_each_get_a_clear_row(tmp_path):
    painted_slide(tmp_path / "good.svs", NUCLEI_LEFT, compression="jpeg")
    whole = (tmp_path / "good.svs").read_bytes()
    (tmp_path / "truncated.svs").write_bytes(whole[: len(whole) * 6 // 10])
    _forged_huge_tiff(tmp_path / "huge.svs")
    tifffile.imwrite(tmp_path / "flat.tif", shape=(20000, 20000), dtype=np.uint8)  # sparse, not tiled
    (tmp_path / "text.svs").write_text("not a slide")
    settings = SlideSettings(tile_size=256, tile_overlap=32)
    rows = {p.name: plan_slide(str(p), settings).row for p in sorted(tmp_path.iterdir())}
    assert rows["good.svs"]["status"] == "ok"
    assert (
        rows["truncated.svs"]["status"] == "unreadable"
        and "low-resolution level" in rows["truncated.svs"]["error"]
    )
    assert rows["huge.svs"]["status"] in ("too_large", "unsupported") and rows["huge.svs"]["error"]
    assert rows["flat.tif"]["status"] == "too_large" and "not tiled" in rows["flat.tif"]["error"]
    assert rows["text.svs"]["status"] == "unsupported" and "not a readable slide" in rows["text.svs"]["error"]
    for name, row in rows.items():
        assert row["slide_id"] == name.rsplit(".", 1)[0]
        assert (row["tiles_planned"] > 0) == (row["status"] == "ok")


def test_an_ome_tiff_pyramid_keeps_its_channels_and_pixel_size(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 4000, (3, 1024, 1024), dtype=np.uint16)
    path = tmp_path / "stack.ome.tif"
    metadata = {"axes": "CYX", "Channel": {"Name": ["DAPI", "GFP", "RFP"]}, "PhysicalSizeX": 0.325}
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(data, tile=(256, 256), subifds=1, metadata=metadata)
        tif.write(data[:, ::2, ::2], tile=(256, 256), subfiletype=1)
    slide = Slide(str(path))
    assert slide.info.channels == ("DAPI", "GFP", "RFP") and slide.info.dtype == "uint16"
    assert slide.info.mpp == pytest.approx(0.325) and slide.info.level_dimensions[1] == (512, 512)
    window = Grid(256, 0, 1.0).windows(1024, 1024)[5]
    np.testing.assert_array_equal(slide.read_window(window), data[:, 256:512, 256:512].transpose(1, 2, 0))
    slide.close()
    assert slide_id_of(str(path)) == "stack"


def test_which_files_are_opened_as_slides():
    assert is_slide_candidate("a/b.svs", 10) and is_slide_candidate("x.NDPI", None)
    assert is_slide_candidate("big.tif", 64 * 2**20) and not is_slide_candidate("tile.tif", 2**20)
    assert not is_slide_candidate("tile.png", 10**9)


def test_a_bigtiff_pyramid_is_a_slide(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    path = tmp_path / "big.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(
            pixels,
            tile=(256, 256),
            subifds=1,
            photometric="rgb",
            resolution=(2e4, 2e4),
            resolutionunit="CENTIMETER",
        )
        tif.write(pixels[::4, ::4], tile=(128, 128), subfiletype=1, photometric="rgb")
    slide = Slide(str(path))
    assert slide.info.level_dimensions == ((1024, 1024), (256, 256)) and slide.info.mpp == pytest.approx(0.5)
    window = Grid(256, 0, 1.0).windows(1024, 1024)[3]
    np.testing.assert_array_equal(slide.read_window(window), pixels[0:256, 768:1024])
    slide.close()


def test_the_model_cards_pixel_size_is_the_default_for_slides_that_state_theirs(tmp_path):
    pixels = np.zeros((1024, 1024, 3), np.uint8)
    write_slide(tmp_path / "fine.svs", pixels, mpp=0.25, compression="zlib")
    tifffile.imwrite(tmp_path / "unknown.svs", pixels[..., 0], tile=(128, 128))
    settings = SlideSettings(tile_size=128, tile_overlap=8, default_mpp=0.5, tissue="all")
    fine = plan_slide(str(tmp_path / "fine.svs"), settings).row
    assert (fine["status"], fine["level"], fine["tile_downsample"]) == ("ok", 0, 2.0)
    unknown = plan_slide(str(tmp_path / "unknown.svs"), settings).row
    assert (unknown["status"], unknown["tile_downsample"]) == ("ok", 1.0)  # read as it is, not refused


def test_a_slide_pushed_out_of_the_cache_is_closed_only_after_its_last_reader(left_half_slide, tmp_path):
    painted_slide(tmp_path / "other.svs", NUCLEI_LEFT[:3])
    cache = SlideCache(capacity=1)
    window = Grid(128, 0, 1.0).windows(768, 768)[0]
    with cache.reading(str(left_half_slide)) as first:
        with cache.reading(str(tmp_path / "other.svs")) as second:  # pushes the first one out
            assert not first.closed  # pushed out, but still being read
            assert first.read_window(window).shape == second.read_window(window).shape == (128, 128, 3)
        assert not first.closed and not second.closed
    assert first.closed and not second.closed  # closed once its last reader was done
    with cache.reading(str(left_half_slide)) as again:  # opened anew
        assert again is not first and again.read_window(window).shape == (128, 128, 3)
    assert cache.opened == 3
    cache.close()


def test_tissue_on_a_bright_field_slide_is_found_pale_parts_included(tmp_path):
    """White glass, pink H&E-like tissue in the left half with a pale (eosin-only) strip: the same
    detector finds tissue darker than the glass, and not the glass's noise."""
    rng = np.random.default_rng(4)
    pixels = np.clip(rng.normal(242, 2.0, (1024, 1024, 3)), 0, 255)
    pixels[100:900, 80:380] = (200, 120, 170)  # stained tissue
    pixels[100:900, 380:460] = (232, 215, 228)  # pale tissue, 10-27 grey levels below the glass
    pixels[300:700:20, 100:360] = (90, 50, 120)  # nuclei rows
    write_slide(tmp_path / "he.svs", pixels.astype(np.uint8), compression="zlib")
    planned = plan_slide(str(tmp_path / "he.svs"), SlideSettings(tile_size=128, tile_overlap=16))
    assert planned.row["status"] == "ok"
    cores = {(w.core_x0, w.core_y0) for w in planned.windows}
    assert (448, 448) in cores  # the pale strip's core is kept
    assert max(x for x, _ in cores) < 600 and 0.2 < planned.row["tissue_fraction"] < 0.45
