"""Synthetic fluorescence-nuclei archive with exact instance ground truth.

The archive stands in for a lab's bucket of slide tiles: the demo, the tests,
the benchmarks and the bundled model's training all use it, and nothing has
to be downloaded.

Layout written by :func:`write_archive`::

    DEST/slide-000/tile-0000.png ...    8-bit RGB tiles (nuclei blue, DAPI-like)
    DEST/annotations.json               COCO instances, one RLE per visible nucleus

What a tile holds:

* a dark background with uneven illumination (a smooth random field);
* nuclei of class ``nucleus``: ellipses with an irregular outline (a few
  low-order radial harmonics), radius about 4 to 30 px, dim to medium
  brightness, chromatin texture;
* nuclei of class ``mitotic``: small (radius 4 to 8 px), compact, near-round,
  very bright and smooth;
* dense clusters where nuclei touch and overlap a little. The ground truth is
  each nucleus's *visible* region (one owner per pixel, later nuclei on top);
  a nucleus hidden by more than a third is left out of the tile altogether,
  so no fragment is ever drawn or annotated;
* debris that is not a nucleus: tiny specks, thin fibres, faint large blobs;
* optical blur, shot noise and read noise.

Everything is deterministic per ``(seed, slide, tile)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CLASSES = ("nucleus", "mitotic")
"""Class names; COCO ``category_id`` and the model's label are index + 1."""

MAX_HIDDEN_FRACTION = 1 / 3
"""A nucleus whose visible area is below (1 - this) of its full area is dropped."""


@dataclass(frozen=True)
class Nucleus:
    """One nucleus before occlusion: centre (px), semi-axes (px), shape and look."""

    label: int
    cx: float
    cy: float
    semi_major: float
    semi_minor: float
    angle: float
    harmonics: tuple[tuple[int, float, float], ...]
    brightness: float
    texture: float


def _shape_mask(n: Nucleus, height: int, width: int) -> tuple[np.ndarray, int, int]:
    """Rasterise one nucleus box-locally.

    Returns (mask, x0, y0): a bool array of the nucleus's bounding box, clipped
    to the tile, and the box's top-left pixel in tile coordinates.
    """
    reach = n.semi_major * 1.4 + 1
    x0, x1 = max(int(n.cx - reach), 0), min(int(n.cx + reach) + 1, width)
    y0, y1 = max(int(n.cy - reach), 0), min(int(n.cy + reach) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), bool), x0, y0
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xs + 0.5 - n.cx, ys + 0.5 - n.cy
    cos_a, sin_a = math.cos(n.angle), math.sin(n.angle)
    u = (dx * cos_a + dy * sin_a) / n.semi_major
    v = (-dx * sin_a + dy * cos_a) / n.semi_minor
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    boundary = np.ones_like(rho)
    for order, amplitude, phase in n.harmonics:
        boundary += amplitude * np.cos(order * theta + phase)
    return rho < boundary, x0, y0


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1] of shape (height, width): coarse noise upsampled."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    field -= field.min()
    return field / max(float(field.max()), 1e-6)


def _sample_nucleus(rng: np.random.Generator, cx: float, cy: float, mitotic: bool) -> Nucleus:
    if mitotic:
        radius = rng.uniform(4.0, 8.0)
        elongation = rng.uniform(1.0, 1.25)
        harmonics = ((3, rng.uniform(0.0, 0.05), rng.uniform(0, 2 * math.pi)),)
        brightness = rng.uniform(0.85, 1.0)
        texture = 0.03
    else:
        radius = math.exp(rng.uniform(math.log(5.0), math.log(30.0)))
        elongation = rng.uniform(1.0, 1.7)
        harmonics = tuple(
            (order, rng.uniform(0.0, 0.12 / order), rng.uniform(0, 2 * math.pi)) for order in (2, 3, 4, 5)
        )
        brightness = rng.uniform(0.22, 0.6)
        texture = rng.uniform(0.15, 0.4)
    return Nucleus(
        label=2 if mitotic else 1,
        cx=cx,
        cy=cy,
        semi_major=radius * math.sqrt(elongation),
        semi_minor=radius / math.sqrt(elongation),
        angle=rng.uniform(0, math.pi),
        harmonics=harmonics,
        brightness=brightness,
        texture=texture,
    )


def _place_nuclei(rng: np.random.Generator, size: int) -> list[Nucleus]:
    """Scatter nuclei: a sparse background population plus 0-3 dense clusters."""
    nuclei: list[Nucleus] = []
    area_scale = (size / 256) ** 2
    for _ in range(rng.poisson(12 * area_scale)):
        nuclei.append(_sample_nucleus(rng, rng.uniform(0, size), rng.uniform(0, size), rng.random() < 0.15))
    for _ in range(rng.integers(0, 4)):
        # A cluster grows by putting each new nucleus against a random member,
        # at a centre distance of 0.8-1.05 times the sum of their radii: touching,
        # sometimes overlapping a little.
        seed = _sample_nucleus(rng, rng.uniform(0, size), rng.uniform(0, size), False)
        members = [seed]
        for _ in range(rng.integers(4, 18)):
            anchor = members[rng.integers(len(members))]
            new = _sample_nucleus(rng, 0, 0, rng.random() < 0.1)
            distance = (anchor.semi_minor + new.semi_minor) * rng.uniform(0.8, 1.05)
            direction = rng.uniform(0, 2 * math.pi)
            new = Nucleus(
                **{
                    **new.__dict__,
                    "cx": anchor.cx + distance * math.cos(direction),
                    "cy": anchor.cy + distance * math.sin(direction),
                }
            )
            members.append(new)
        nuclei.extend(members)
    return nuclei


def _resolve_occlusion(nuclei: list[Nucleus], height: int, width: int) -> tuple[list[Nucleus], np.ndarray]:
    """Drop nuclei hidden by more than MAX_HIDDEN_FRACTION; return survivors and label map.

    The label map (int32, height x width) holds the survivor's index + 1 at each
    pixel it owns (later nuclei are on top), 0 for background. Removing a
    nucleus only uncovers others, so the loop drops one at a time, the most
    hidden first, until none is hidden too much.
    """
    shapes = [_shape_mask(n, height, width) for n in nuclei]
    full_area = np.array([m.sum() for m, _, _ in shapes])
    alive = full_area > 0
    while True:
        owner = np.zeros((height, width), np.int32)
        for i, (mask, x0, y0) in enumerate(shapes):
            if alive[i]:
                view = owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]]
                view[mask] = i + 1
        visible = np.bincount(owner.ravel(), minlength=len(nuclei) + 1)[1:]
        hidden = np.where(alive, 1 - visible / np.maximum(full_area, 1), 0)
        worst = int(np.argmax(hidden)) if len(nuclei) else 0
        if not len(nuclei) or hidden[worst] <= MAX_HIDDEN_FRACTION:
            break
        alive[worst] = False
    keep = np.flatnonzero(alive)
    remap = np.zeros(len(nuclei) + 1, np.int32)
    remap[keep + 1] = np.arange(1, len(keep) + 1)
    return [nuclei[i] for i in keep], remap[owner]


def _debris(rng: np.random.Generator, size: int) -> np.ndarray:
    """Intensity (float32, size x size) of things that are not nuclei."""
    layer = np.zeros((size, size), np.float32)
    for _ in range(rng.poisson(6 * (size / 256) ** 2)):
        centre = (int(rng.uniform(0, size)), int(rng.uniform(0, size)))
        cv2.circle(layer, centre, int(rng.integers(1, 3)), float(rng.uniform(0.3, 0.9)), -1)
    for _ in range(rng.poisson(1.5)):
        points = np.cumsum(rng.normal(0, 12, (6, 2)), axis=0) + rng.uniform(0, size, 2)
        cv2.polylines(layer, [points.astype(np.int32)], False, float(rng.uniform(0.15, 0.4)), 1, cv2.LINE_AA)
    for _ in range(rng.poisson(1.0)):
        centre = (int(rng.uniform(0, size)), int(rng.uniform(0, size)))
        blob = np.zeros_like(layer)
        cv2.circle(blob, centre, int(rng.integers(20, 45)), float(rng.uniform(0.06, 0.14)), -1)
        layer += cv2.GaussianBlur(blob, (0, 0), 10)
    return layer


def render_tile(
    seed: int, slide: int, tile: int, size: int = 256
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Render one tile.

    Returns:
        image: uint8 (size, size, 3) RGB.
        instances: int32 (size, size) label map, 0 background, k for instance k.
        labels: class label (1 = nucleus, 2 = mitotic) of instance k at index k - 1.
    """
    rng = np.random.default_rng([seed, slide, tile])
    nuclei, owner = _resolve_occlusion(_place_nuclei(rng, size), size, size)

    nucleus_intensity = np.zeros(len(nuclei) + 1, np.float32)
    nucleus_intensity[1:] = [n.brightness for n in nuclei]
    texture_strength = np.zeros(len(nuclei) + 1, np.float32)
    texture_strength[1:] = [n.texture for n in nuclei]
    chromatin = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 1.2)
    chromatin /= max(float(chromatin.std()), 1e-6)
    signal = nucleus_intensity[owner] * (1 + texture_strength[owner] * chromatin)

    illumination = 0.6 + 0.4 * _smooth_field(rng, size, size, 4)
    background = 0.03 + 0.05 * _smooth_field(rng, size, size, 6)
    intensity = (background + signal + _debris(rng, size)) * illumination
    intensity = cv2.GaussianBlur(intensity, (0, 0), rng.uniform(0.6, 1.4))

    photons = rng.uniform(150, 600)
    intensity = rng.poisson(np.clip(intensity, 0, None) * photons) / photons
    intensity += rng.normal(0, rng.uniform(0.005, 0.02), intensity.shape)
    gray = np.clip(intensity, 0, 1)
    tint = np.array([0.25, 0.5, 1.0], np.float32)
    image = (gray[..., None] * tint * 255 + 0.5).astype(np.uint8)
    return image, owner, [n.label for n in nuclei]


def tile_annotations(instances: np.ndarray, labels: list[int]) -> list[dict]:
    """COCO annotations (without ids) for one tile's label map.

    Each has ``category_id``, ``segmentation`` (compressed RLE, counts as str),
    ``area`` (pixels), ``bbox`` ([x, y, w, h] in pixels) and ``iscrowd`` 0.
    """
    annotations = []
    for k, label in enumerate(labels, start=1):
        mask = np.asfortranarray(instances == k, dtype=np.uint8)
        rle = mask_utils.encode(mask)
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append(
            {
                "category_id": int(label),
                "segmentation": rle,
                "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    return annotations


def write_archive(
    dest: str | Path, *, slides: int = 4, tiles_per_slide: int = 16, size: int = 256, seed: int = 0
) -> Path:
    """Write the archive and its COCO ground truth; return the annotations path.

    Image ``file_name`` in the COCO file is the tile path relative to ``dest``
    (``slide-000/tile-0000.png``); image ids count from 1 in that order.
    """
    dest = Path(dest)
    images, annotations = [], []
    for slide in range(slides):
        (dest / f"slide-{slide:03d}").mkdir(parents=True, exist_ok=True)
        for tile in range(tiles_per_slide):
            image, instances, labels = render_tile(seed, slide, tile, size)
            file_name = f"slide-{slide:03d}/tile-{tile:04d}.png"
            cv2.imwrite(str(dest / file_name), image[..., ::-1])
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for annotation in tile_annotations(instances, labels):
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    coco = {
        "info": {"description": f"synthetic nuclei, seed {seed}", "version": "1"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)],
    }
    path = dest / "annotations.json"
    path.write_text(json.dumps(coco))
    return path
