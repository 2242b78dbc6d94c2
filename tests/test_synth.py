"""The synthetic archive: deterministic, exact ground truth, visible-region ownership, randomised looks."""

from __future__ import annotations

import json
from dataclasses import replace

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from pipeline.decode import decode_image
from pipeline.slides import Slide
from pipeline.synth import (
    FILE_TYPES,
    MAX_OVERLAP_FRACTION,
    SHIFTS,
    TRAINING,
    Nucleus,
    TileStyle,
    _place_nuclei,
    _resolve_occlusion,
    _sample_nucleus,
    _shape_mask,
    _with_cytoplasm,
    render_tile,
    write_archive,
)
from tests.helpers import run_job


def test_an_archive_written_by_several_processes_is_the_one_written_by_one(tmp_path):
    one = write_archive(tmp_path / "one", slides=2, tiles_per_slide=5, size=64, seed=4)
    three = write_archive(tmp_path / "three", slides=2, tiles_per_slide=5, size=64, seed=4, workers=3)

    def files(root):
        return sorted(path.relative_to(root) for path in root.rglob("*") if path.is_file())

    assert len(files(one.parent)) == 11 and files(one.parent) == files(three.parent)
    for name in files(one.parent):
        assert (one.parent / name).read_bytes() == (three.parent / name).read_bytes(), name


def test_ground_truth_round_trips_to_the_drawn_masks(tmp_path):
    coco_path = write_archive(tmp_path, slides=2, tiles_per_slide=3, size=128, seed=3)
    coco = json.loads(coco_path.read_text())
    assert [c["name"] for c in coco["categories"]] == ["nucleus"]
    assert len(coco["images"]) == 6
    for info in coco["images"]:
        slide, tile = (int(part.split("-")[1].split(".")[0]) for part in info["file_name"].split("/"))
        rendered = render_tile(3, slide, tile, 128)
        assert info["file_name"].endswith(rendered.suffix)
        on_disk = decode_image((tmp_path / info["file_name"]).read_bytes(), max_pixels=10**6).pixels
        expected = rendered.pixels if rendered.pixels.ndim == 3 else rendered.pixels[..., None]
        assert on_disk.dtype == expected.dtype and np.array_equal(on_disk, expected)
        anns = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
        assert len(anns) == len(rendered.labels)
        union = np.zeros((128, 128), np.uint8)
        for k, ann in enumerate(anns, start=1):
            decoded = mask_utils.decode(ann["segmentation"])
            assert np.array_equal(decoded.astype(bool), rendered.instances == k)
            assert ann["area"] == decoded.sum() and ann["category_id"] == 1
            union += decoded
        assert union.max(initial=0) <= 1  # one owner per pixel


def test_tiles_are_deterministic_per_seed():
    a = render_tile(0, 1, 2, 96)
    b = render_tile(0, 1, 2, 96)
    c = render_tile(1, 1, 2, 96)
    assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.instances, b.instances)
    assert not np.array_equal(a.instances, c.instances)


def test_tiles_vary_in_file_type_size_brightness_and_touch():
    """Domain randomisation: every file type, nuclei 8-50 px across, a 10x brightness range, clumps."""
    types, diameters, touching, ratios = set(), [], 0, []
    for tile in range(40):
        rendered = render_tile(0, 0, tile, 256)
        types.add(rendered.file_type)
        instances = rendered.instances
        right = (instances[:, 1:] != instances[:, :-1]) & (instances[:, 1:] > 0) & (instances[:, :-1] > 0)
        touching += int(right.any())
        areas = np.bincount(instances.ravel())[1:]
        diameters += list(2 * np.sqrt(areas[areas > 0] / np.pi))
        gray = rendered.pixels.max(axis=2) if rendered.pixels.ndim == 3 else rendered.pixels
        means = np.array([gray[instances == k].mean() for k in range(1, len(areas) + 1) if areas[k - 1] > 30])
        if len(means) >= 8:
            background = np.percentile(gray[instances == 0], 20)
            above = np.sort(means - background)
            ratios.append(above[-1] / max(above[0], 1e-9))
    assert types == set(FILE_TYPES)
    assert touching >= 20
    assert np.percentile(diameters, 2) < 10 and np.percentile(diameters, 99.5) > 40
    # Mean intensities include blur, glow and background, so the drawn 10-15x spread shows somewhat less.
    assert np.median(ratios) >= 5, ratios


def _disk(cx: float, cy: float, radius: float) -> Nucleus:
    return Nucleus(cx, cy, radius, radius, 0.0, (), 1.0, 0.0, 0.1, 0.0, 0)


def _shared_fractions(nuclei: list[Nucleus], size: int) -> np.ndarray:
    """Per nucleus: the fraction of its full shape that another one's full shape also covers."""
    shapes = [_shape_mask(n, size, size) for n in nuclei]
    cover = np.zeros((size, size), np.int32)
    for mask, x0, y0 in shapes:
        cover[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] += mask
    return np.array(
        [
            (cover[y0 : y0 + m.shape[0], x0 : x0 + m.shape[1]][m] > 1).mean() if m.any() else 0.0
            for m, x0, y0 in shapes
        ]
    )


def test_a_nucleus_lying_on_another_is_dropped_and_touching_ones_are_kept():
    """A small nucleus inside a large one's outline looks like a nucleolus: it is never drawn or annotated,
    whichever lies on top; neighbours that overlap a little at their rims both stay."""
    large, small = _disk(60, 60, 25), _disk(55, 62, 6)
    for order in ([large, small], [small, large]):
        survivors, owner = _resolve_occlusion(order, 128, 128)
        assert survivors == [large]
        assert (owner == 1).sum() == _shape_mask(large, 128, 128)[0].sum()
    rim = _disk(60 + 25 + 6 - 3, 60, 6)  # overlaps the large one by 3 px of its 12 px width
    survivors, owner = _resolve_occlusion([large, rim], 128, 128)
    assert survivors == [large, rim] and set(np.unique(owner)) == {0, 1, 2}


def test_no_surviving_nucleus_shares_more_than_the_allowed_fraction_of_its_area():
    """Over the clumps of many training tiles; the rule drops some nuclei there, so it is exercised."""
    dropped = 0
    for tile in range(12):
        rng = np.random.default_rng([5, 0, tile])
        style = TileStyle.draw(rng, TRAINING)
        placed = _place_nuclei(rng, 256, TRAINING, style)
        survivors, owner = _resolve_occlusion(placed, 256, 256)
        dropped += len(placed) - len(survivors)
        assert _shared_fractions(survivors, 256).max(initial=0) <= MAX_OVERLAP_FRACTION
        assert owner.max() == len(survivors)
    assert dropped > 0


def test_low_range_16_bit_tiles_use_a_small_part_of_the_type():
    for tile in range(30):
        rendered = render_tile(0, 0, tile, 128)
        if rendered.file_type == "gray16_low":
            assert rendered.pixels.dtype == np.uint16 and rendered.pixels.max() <= TRAINING.low_range_max[1]
    shifted = render_tile(0, 0, 0, 128, SHIFTS["low_range16"])
    assert shifted.file_type == "gray16_low" and shifted.pixels.max() <= 120


def test_shifts_lie_outside_the_training_ranges():
    for name, look in SHIFTS.items():
        outside = [
            field
            for field in ("radius", "spread", "blur", "snr", "low_range_max")
            if getattr(look, field)[0] > getattr(TRAINING, field)[1]
            or getattr(look, field)[1] < getattr(TRAINING, field)[0]
        ]
        assert outside, f"shift {name} lies inside the training ranges"
    assert 0 < MAX_OVERLAP_FRACTION < 0.5


def test_some_training_tiles_are_background_only_and_the_others_do_not_depend_on_the_fraction():
    none_empty = replace(TRAINING, empty_fraction=0.0)
    empty = 0
    for tile in range(40):
        drawn = render_tile(5, 0, tile, 96)
        if not drawn.labels:
            empty += 1
            assert not drawn.instances.any()
            continue
        same = render_tile(5, 0, tile, 96, none_empty)
        assert np.array_equal(drawn.pixels, same.pixels) and np.array_equal(drawn.instances, same.instances)
    assert 1 <= empty <= 12  # about TRAINING.empty_fraction of 40


def _ring_contrast(pixels: np.ndarray, instances: np.ndarray) -> float:
    """Mean of the 4 px ring around the nuclei over the nuclei's mean, both above the far background."""
    nuclei = (instances > 0).astype(np.uint8)
    ring = cv2.dilate(nuclei, np.ones((9, 9), np.uint8)).astype(bool) & ~nuclei.astype(bool)
    far = ~cv2.dilate(nuclei, np.ones((41, 41), np.uint8)).astype(bool)
    grey = pixels.astype(np.float64).reshape(*instances.shape, -1).mean(axis=2)
    return (grey[ring].mean() - grey[far].mean()) / (grey[nuclei.astype(bool)].mean() - grey[far].mean())


_CLEAN = replace(
    TRAINING,
    snr=(1000.0, 1000.0),
    read_noise=(0.0, 0.0),
    unevenness=(0.0, 0.0),
    empty_fraction=0.0,
    halo=(0.0, 0.0),
)


@pytest.mark.parametrize(
    "light",
    [
        pytest.param({"halo": (0.3, 0.3), "halo_sigma": (6.0, 6.0)}, id="out-of-focus halo"),
        pytest.param({"cytoplasm_fraction": 1.0, "cytoplasm": (0.15, 0.15)}, id="cell bodies"),
    ],
)
def test_light_around_the_nuclei_brightens_the_ring_around_them_and_belongs_to_none(light):
    for tile in range(6):
        plain, lit = (
            render_tile(9, 0, tile, 128, _CLEAN),
            render_tile(9, 0, tile, 128, replace(_CLEAN, **light)),
        )
        assert np.array_equal(plain.instances, lit.instances) and plain.labels == lit.labels
        rise = _ring_contrast(lit.pixels, lit.instances) - _ring_contrast(plain.pixels, plain.instances)
        assert rise > 0.02, (tile, rise)


def test_a_cell_body_is_a_crescent_beside_its_nucleus_at_the_drawn_fraction_of_its_brightness():
    look = replace(TRAINING, cytoplasm_fraction=1.0, cytoplasm=(0.1, 0.1))
    offsets = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        nucleus = _sample_nucleus(rng, look, TileStyle.draw(rng, look), 64.0, 64.0)
        inside, x0, y0 = _shape_mask(nucleus, 128, 128)
        mask = np.zeros((128, 128), bool)
        mask[y0 : y0 + inside.shape[0], x0 : x0 + inside.shape[1]] = inside
        body = _with_cytoplasm(np.random.default_rng(seed), np.zeros((128, 128), np.float32), [nucleus], look)
        assert body.max() == pytest.approx(0.1 * nucleus.brightness, rel=0.05)
        outside = np.where(mask, 0, body)
        ys, xs = np.mgrid[:128, :128]
        centre = np.array([np.average(ys, weights=outside), np.average(xs, weights=outside)])
        radius = np.sqrt(mask.sum() / np.pi)
        offsets.append(np.hypot(*(centre - np.argwhere(mask).mean(axis=0))) / radius)
    assert np.median(offsets) > 0.2, offsets  # on one side, not a ring around the nucleus
    unstained = replace(look, cytoplasm_fraction=0.0)
    signal = np.ones((128, 128), np.float32)
    assert _with_cytoplasm(np.random.default_rng(0), signal, [nucleus], unstained) is signal


def test_synth_command_writes_background_only_archives_and_refuses_a_bad_fraction(tmp_path):
    done = run_job(
        "jobs.synth",
        str(tmp_path / "a"),
        *("--slides", "1", "--tiles-per-slide", "3", "--size", "64", "--empty-fraction", "1"),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    coco = json.loads((tmp_path / "a" / "annotations.json").read_text())
    assert len(coco["images"]) == 3 and coco["annotations"] == []
    wrong = run_job("jobs.synth", str(tmp_path / "b"), "--empty-fraction", "2", timeout=120)
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines() == [
        "jobs.synth: error: --empty-fraction must be in [0, 1] (see --help)"
    ]
    no_workers = run_job("jobs.synth", str(tmp_path / "c"), "--workers", "0", timeout=120)
    assert no_workers.returncode == 2 and no_workers.stderr.strip().splitlines() == [
        "jobs.synth: error: --workers must be at least 1 (see --help)"
    ]


def test_synth_command_adds_cell_bodies_where_asked_and_leaves_the_truth_alone(tmp_path):
    common = (
        "--slides",
        "1",
        "--tiles-per-slide",
        "4",
        "--size",
        "96",
        "--empty-fraction",
        "0",
        "--seed",
        "3",
    )
    for name, extra in (("plain", ()), ("cells", ("--cell-bodies", "1"))):
        done = run_job("jobs.synth", str(tmp_path / name), *common, *extra, timeout=120)
        assert done.returncode == 0, done.stderr
    plain, cells = (json.loads((tmp_path / n / "annotations.json").read_text()) for n in ("plain", "cells"))
    assert plain == cells
    with_nuclei = {a["image_id"] for a in plain["annotations"]}
    tiles = [image["file_name"] for image in plain["images"] if image["id"] in with_nuclei]
    changed = [(tmp_path / "plain" / t).read_bytes() != (tmp_path / "cells" / t).read_bytes() for t in tiles]
    assert len(tiles) >= 2 and all(changed), changed
    wrong = run_job("jobs.synth", str(tmp_path / "b"), "--cell-bodies", "-0.5", timeout=120)
    assert wrong.returncode == 2 and wrong.stderr.strip().splitlines() == [
        "jobs.synth: error: --cell-bodies must be in [0, 1] (see --help)"
    ]


def test_whole_slides_have_truth_in_level_0_coordinates(tmp_path):
    result = run_job(
        "jobs.synth", str(tmp_path), "--whole-slides", "--slides", "1", "--size", "1024", timeout=120
    )
    assert result.returncode == 0, result.stderr
    coco = json.loads((tmp_path / "annotations.json").read_text())
    assert coco["images"] == [{"id": 1, "file_name": "slide-000.svs", "width": 1024, "height": 1024}]
    slide = Slide(str(tmp_path / "slide-000.svs"))
    assert (slide.info.vendor, slide.info.mpp, len(slide.info.level_dimensions)) == ("aperio", 0.5, 3)
    pixels = slide.read_region(0, 0, 0, 1024, 1024).max(axis=2).astype(float)
    inside = np.zeros((1024, 1024), bool)
    for annotation in coco["annotations"]:
        mask = mask_utils.decode(annotation["segmentation"]).astype(bool)
        assert mask.sum() == annotation["area"] > 0
        x, y, w, h = annotation["bbox"]
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1 - x, ys.max() + 1 - y) == (x, y, w, h)
        inside |= mask
    outside = ~inside
    assert len(coco["annotations"]) > 50
    assert pixels[inside].mean() > 2 * pixels[outside].mean()  # the truth lies on the drawn nuclei
    slide.close()
