"""Synthetic fluorescence-nuclei archive with exact instance ground truth, under domain randomisation.

The archive stands in for a lab's bucket of slide tiles: the demo, the tests,
the benchmarks and the bundled model's training all use it, and nothing has
to be downloaded. Real nuclei images differ from each other more than from
any one synthetic look, so every tile draws its look from wide ranges
(:class:`Appearance`); held-out *shifted* archives (:data:`SHIFTS`) draw from
ranges outside the training ones, to measure robustness.

Layout written by :func:`write_archive`::

    DEST/slide-000/tile-0000.png ...    8-bit grey or tinted RGB PNG, or
    DEST/slide-000/tile-0001.tif ...    16-bit grey TIFF (full range, or a low range: a 12-bit camera)
    DEST/annotations.json               COCO instances, one RLE per visible nucleus (class ``nucleus``)

What a tile holds (each range is per tile unless said):

* background: a camera offset, autofluorescence that varies smoothly across
  the tile, and uneven illumination (a smooth multiplicative field);
* nuclei: ellipses with irregular outlines (low-order radial harmonics),
  diameters about 8 to 50 px, elongation 1 to 2.2; per-nucleus brightness
  spread over a 10x range or more in one tile, down to dim nuclei near the
  background; each nucleus is textured (chromatin, nucleoli) or flat,
  sharp- or soft-edged (the mask boundary is the half-intensity contour),
  domed or rimmed;
* sparse scatter, touching clusters, and densely packed clumps. The ground
  truth is each nucleus's *visible* region (one owner per pixel, later nuclei
  on top); a nucleus that shares more than a third of its area with others,
  under them or over them, is left out of the tile altogether, so no
  fragment is drawn and no nucleus sits inside another's outline (which
  looks like a nucleolus and which no annotator would mark);
* out-of-focus light: a halo around the nuclei, as a wide-field microscope
  shows (a blurred copy of their emission, a tenth to a half of it, sigma 2
  to 10 px), which belongs to no nucleus;
* cell bodies, where asked (``Appearance.cytoplasm_fraction``, none by
  default): each nucleus sits off-centre in a faint cell body (a DNA dye's
  cytoplasmic background, 2-20% of its nucleus's brightness, 1.3-2.2 times
  its size), a dim crescent beside the nucleus that is not a nucleus (real
  wide-field images are full of them);
* things that are not nuclei: small bright specks, thin fibres, faint
  out-of-focus blobs; a tenth of the tiles hold nothing else (background
  only: after per-tile normalisation their specks are the brightest thing,
  which the model must learn to leave alone);
* defocus blur (Gaussian, sigma up to 3 px), Poisson shot noise and Gaussian
  read noise, then digitisation to the tile's file type.

Everything is deterministic per ``(seed, slide, tile)`` and appearance.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import tifffile
from pycocotools import mask as mask_utils

CLASSES = ("nucleus",)
"""Class names; COCO ``category_id`` and the model's label are index + 1."""

MAX_OVERLAP_FRACTION = 1 / 3
"""A nucleus sharing more than this fraction of its full area with other nuclei, under them or over
them, is dropped: neighbours touch and overlap a little, none is hidden or lies on another."""

FILE_TYPES = ("gray8", "rgb8", "gray16", "gray16_low")
"""How a tile is stored: 8-bit grey PNG, 8-bit tinted RGB PNG, 16-bit TIFF using most of its
range, 16-bit TIFF using a low range (the brightest pixel at ``low_range_max``)."""


@dataclass(frozen=True)
class Appearance:
    """The ranges a tile's look is drawn from (``(low, high)``: uniform, or log-uniform where said).

    Intensities are in units of the tile's brightest nucleus (1.0) before
    illumination; every other nucleus of the tile is dimmer, down to
    1 / ``spread``. ``snr`` is the shot-noise signal-to-noise ratio of one
    pixel of the brightest nucleus (its photon count is ``snr ** 2``), so a
    nucleus of brightness b has an SNR of about ``snr * sqrt(b)``.
    """

    radius: tuple[float, float] = (4.0, 25.0)
    """Nucleus equivalent radius in px (log-uniform; diameters 8 to 50 px)."""
    elongation: tuple[float, float] = (1.0, 2.2)
    spread: tuple[float, float] = (10.0, 15.0)
    """Brightest / dimmest nucleus brightness in a tile (each nucleus log-uniform in between)."""
    blur: tuple[float, float] = (0.3, 3.0)
    """Defocus blur sigma in px."""
    snr: tuple[float, float] = (10.0, 150.0)
    """Per-pixel SNR of the brightest nucleus (log-uniform): lower means noisier."""
    read_noise: tuple[float, float] = (0.5, 4.0)
    """Camera read noise sigma in photons."""
    background: tuple[float, float] = (0.01, 0.15)
    """Autofluorescence level."""
    unevenness: tuple[float, float] = (0.0, 0.6)
    """Illumination falls by up to this fraction across the tile."""
    density: tuple[float, float] = (3.0, 40.0)
    """Scattered nuclei per 256 x 256 px (log-uniform), besides clusters."""
    empty_fraction: float = 0.1
    """Fraction of tiles with no nucleus at all: background, debris and fibres only (negatives)."""
    file_types: tuple[str, ...] = FILE_TYPES
    low_range_max: tuple[float, float] = (150.0, 4095.0)
    """Brightest pixel value of a low-range 16-bit tile (log-uniform)."""
    halo: tuple[float, float] = (0.1, 0.5)
    """Out-of-focus light around the nuclei (a wide-field microscope's): a blurred copy of the
    nuclei's emission added at this fraction; not part of any nucleus."""
    halo_sigma: tuple[float, float] = (2.0, 10.0)
    """Width of that halo, Gaussian sigma in px (log-uniform)."""
    cytoplasm: tuple[float, float] = (0.02, 0.2)
    """Faint stain of each cell's body (a DNA dye's cytoplasmic background) as a fraction of its
    nucleus's brightness (log-uniform per cell). The body is 1.3-2.2 times the nucleus and off its
    centre, so it shows as a dim crescent on one side of the nucleus; it belongs to no nucleus."""
    cytoplasm_fraction: float = 0.0
    """Fraction of the tiles whose cells show that stain: none in :data:`TRAINING` (the bundled model's
    look; a model fine-tuned with 0.7 was not kept, see README), ``jobs.synth --cell-bodies F``."""


TRAINING = Appearance()
"""The ranges the bundled model is trained on (and in-distribution held-out archives use)."""

SHIFTS: dict[str, Appearance] = {
    "dim": replace(TRAINING, spread=(18.0, 30.0)),
    "blurry": replace(TRAINING, blur=(3.5, 4.5)),
    "large": replace(TRAINING, radius=(26.0, 34.0), density=(2.0, 6.0)),
    "small": replace(TRAINING, radius=(3.2, 3.9), density=(30.0, 80.0)),
    "noisy": replace(TRAINING, snr=(5.0, 9.0), read_noise=(4.0, 6.0)),
    "low_range16": replace(TRAINING, file_types=("gray16_low",), low_range_max=(40.0, 120.0)),
}
"""Held-out archives whose parameters lie outside the training ranges (robustness, never training):
dimmer nuclei (down to 1/30 of the brightest), blurrier (sigma 3.5-4.5), larger (diameters 52-68 px),
smaller (6.4-7.8 px), noisier (SNR 5-9 at the brightest nucleus), and 16-bit files whose brightest
pixel is 40 to 120 (coarser than any training tile)."""


@dataclass(frozen=True)
class Nucleus:
    """One nucleus before occlusion: centre (px), semi-axes (px), outline and look.

    ``edge``: width of the soft edge as a fraction of the radius; ``dome``: radial
    profile (> 0 brighter centre, < 0 brighter rim); ``texture``: chromatin contrast.
    """

    cx: float
    cy: float
    semi_major: float
    semi_minor: float
    angle: float
    harmonics: tuple[tuple[int, float, float], ...]
    brightness: float
    texture: float
    edge: float
    dome: float
    nucleoli: int


def _shape_field(n: Nucleus, height: int, width: int, reach: float) -> tuple[np.ndarray, int, int]:
    """The nucleus's normalised radius field box-locally: (r, x0, y0).

    ``r`` (float32, box clipped to the tile) is < 1 inside the outline, 1 on it;
    (x0, y0) is the box's top-left pixel in tile coordinates. The box reaches
    ``reach`` semi-major axes from the centre.
    """
    extent = n.semi_major * reach + 1
    x0, x1 = max(int(n.cx - extent), 0), min(int(n.cx + extent) + 1, width)
    y0, y1 = max(int(n.cy - extent), 0), min(int(n.cy + extent) + 1, height)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), np.float32), x0, y0
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xs + 0.5 - n.cx, ys + 0.5 - n.cy
    cos_a, sin_a = math.cos(n.angle), math.sin(n.angle)
    u = (dx * cos_a + dy * sin_a) / n.semi_major
    v = (-dx * sin_a + dy * cos_a) / n.semi_minor
    theta = np.arctan2(v, u)
    boundary = np.ones_like(u)
    for order, amplitude, phase in n.harmonics:
        boundary += amplitude * np.cos(order * theta + phase)
    return np.sqrt(u * u + v * v) / boundary, x0, y0


def _shape_mask(n: Nucleus, height: int, width: int) -> tuple[np.ndarray, int, int]:
    """The nucleus's pixels box-locally: (bool mask, x0, y0), see :func:`_shape_field`."""
    field, x0, y0 = _shape_field(n, height, width, reach=1.4)
    return field < 1, x0, y0


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1] of shape (height, width): coarse noise upsampled."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    field -= field.min()
    return field / max(float(field.max()), 1e-6)


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1])))


@dataclass(frozen=True)
class TileStyle:
    """One tile's draw from an :class:`Appearance`: brightness range, blur, noise, density, file type."""

    dimmest: float
    blur: float
    photons: float
    read_noise: float
    background: float
    unevenness: float
    density: float
    clusters: int
    flat_fraction: float
    file_type: str
    max_value: float

    @classmethod
    def draw(cls, rng: np.random.Generator, look: Appearance) -> TileStyle:
        file_type = str(rng.choice(look.file_types))
        max_value = {
            "gray8": rng.uniform(90, 250),
            "rgb8": rng.uniform(90, 250),
            "gray16": rng.uniform(12000, 60000),
            "gray16_low": _log_uniform(rng, look.low_range_max),
        }[file_type]
        return cls(
            dimmest=1 / rng.uniform(*look.spread),
            blur=rng.uniform(*look.blur),
            photons=_log_uniform(rng, look.snr) ** 2,
            read_noise=rng.uniform(*look.read_noise),
            background=rng.uniform(*look.background),
            unevenness=rng.uniform(*look.unevenness),
            density=_log_uniform(rng, look.density),
            clusters=int(rng.integers(0, 5)),
            flat_fraction=rng.uniform(0.0, 0.7),
            file_type=file_type,
            max_value=max_value,
        )


def _sample_nucleus(
    rng: np.random.Generator, look: Appearance, style: TileStyle, cx: float, cy: float
) -> Nucleus:
    radius = _log_uniform(rng, look.radius)
    elongation = rng.uniform(*look.elongation)
    flat = rng.random() < style.flat_fraction
    harmonics = tuple(
        (order, rng.uniform(0.0, 0.12 / order), rng.uniform(0, 2 * math.pi)) for order in (2, 3, 4, 5)
    )
    return Nucleus(
        cx=cx,
        cy=cy,
        semi_major=radius * math.sqrt(elongation),
        semi_minor=radius / math.sqrt(elongation),
        angle=rng.uniform(0, math.pi),
        harmonics=harmonics,
        brightness=math.exp(rng.uniform(math.log(style.dimmest), 0.0)),
        texture=0.0 if flat else rng.uniform(0.1, 0.45),
        edge=rng.uniform(0.08, 0.2) if flat else rng.uniform(0.01, 0.08),
        dome=rng.uniform(-0.4, 0.4),
        nucleoli=0 if flat else int(rng.integers(0, 4)),
    )


def _place_nuclei(rng: np.random.Generator, size: int, look: Appearance, style: TileStyle) -> list[Nucleus]:
    """Scatter nuclei: a sparse population plus touching clusters and packed clumps."""
    nuclei: list[Nucleus] = []
    area_scale = (size / 256) ** 2
    for _ in range(rng.poisson(style.density * area_scale)):
        nuclei.append(_sample_nucleus(rng, look, style, rng.uniform(0, size), rng.uniform(0, size)))
    for _ in range(style.clusters):
        # A cluster grows by putting each new nucleus against a random member, at a
        # centre distance of 0.75-1.05 times the sum of their short semi-axes:
        # touching, sometimes overlapping a little (a packed clump when many).
        seed = _sample_nucleus(rng, look, style, rng.uniform(0, size), rng.uniform(0, size))
        members = [seed]
        for _ in range(rng.integers(4, 30)):
            anchor = members[rng.integers(len(members))]
            new = _sample_nucleus(rng, look, style, 0, 0)
            distance = (anchor.semi_minor + new.semi_minor) * rng.uniform(0.75, 1.05)
            direction = rng.uniform(0, 2 * math.pi)
            members.append(
                replace(
                    new,
                    cx=anchor.cx + distance * math.cos(direction),
                    cy=anchor.cy + distance * math.sin(direction),
                )
            )
        nuclei.extend(members)
    return nuclei


def _resolve_occlusion(nuclei: list[Nucleus], height: int, width: int) -> tuple[list[Nucleus], np.ndarray]:
    """Drop nuclei that share more than MAX_OVERLAP_FRACTION of their area; return survivors and label map.

    Shared pixels are those another surviving nucleus's full shape also
    covers, whichever lies on top, so both a nucleus mostly hidden under others
    and a small one lying on a larger one are dropped. Dropping one only lowers
    the others' overlap, so the loop drops one at a time, the worst first.

    The label map (int32, height x width) holds the survivor's index + 1 at each
    pixel it owns (later nuclei are on top), 0 for background.
    """
    shapes = [_shape_mask(n, height, width) for n in nuclei]
    full_area = np.array([m.sum() for m, _, _ in shapes])
    alive = full_area > 0
    boxes = np.array([(x0, y0, x0 + m.shape[1], y0 + m.shape[0]) for m, x0, y0 in shapes]).reshape(-1, 4)
    cover = np.zeros((height, width), np.int32)
    for i in np.flatnonzero(alive):
        mask, x0, y0 = shapes[i]
        cover[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] += mask

    def shared(i: int) -> int:
        """Pixels of nucleus ``i`` that another alive nucleus also covers."""
        mask, x0, y0 = shapes[i]
        return int((cover[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] > 1).sum())

    def overlapping(box: np.ndarray) -> np.ndarray:
        """Indices of alive nuclei whose boxes overlap ``box`` (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = box
        hits = alive & (boxes[:, 0] < x1) & (boxes[:, 2] > x0) & (boxes[:, 1] < y1) & (boxes[:, 3] > y0)
        return np.flatnonzero(hits)

    overlap = np.array([shared(i) if alive[i] else 0 for i in range(len(nuclei))], np.int64)
    while len(nuclei):
        fraction = np.where(alive, overlap / np.maximum(full_area, 1), 0)
        worst = int(np.argmax(fraction))
        if fraction[worst] <= MAX_OVERLAP_FRACTION:
            break
        alive[worst] = False
        mask, x0, y0 = shapes[worst]
        cover[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] -= mask
        for i in overlapping(boxes[worst]):
            overlap[i] = shared(i)

    owner = np.zeros((height, width), np.int32)
    keep = np.flatnonzero(alive)
    for label, i in enumerate(keep, start=1):
        mask, x0, y0 = shapes[i]
        owner[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = label
    return [nuclei[i] for i in keep], owner


def _nuclei_signal(rng: np.random.Generator, nuclei: list[Nucleus], owner: np.ndarray) -> np.ndarray:
    """Emitted intensity (float32, H x W) of the nuclei: each owned pixel from its owner's profile,
    background pixels from the soft edges (glow) of the nuclei around them.

    A nucleus's profile is a sigmoid of its radius field, 0.5 on the outline
    (the annotated boundary is the half-intensity contour), times a dome or
    rim, chromatin texture and nucleoli.
    """
    height, width = owner.shape
    chromatin = sum(
        cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0), sigma)
        for sigma in (0.8, 2.0)
    )
    chromatin /= max(float(np.std(chromatin)), 1e-6)
    owned = np.zeros((height, width), np.float32)
    glow = np.zeros((height, width), np.float32)
    for index, n in enumerate(nuclei, start=1):
        r, x0, y0 = _shape_field(n, height, width, reach=1.4 + 4 * n.edge)
        if r.size == 0:
            continue
        h, w = r.shape
        profile = 1 / (1 + np.exp(np.minimum((r - 1) / n.edge, 50)))
        profile *= 1 + n.dome * (0.5 - np.minimum(r, 1) ** 2)
        profile *= np.clip(1 + n.texture * chromatin[y0 : y0 + h, x0 : x0 + w], 0.2, None)
        ys, xs = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float32)
        for _ in range(n.nucleoli):
            angle, distance = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.6) * n.semi_minor
            spot_x, spot_y = n.cx + distance * math.cos(angle), n.cy + distance * math.sin(angle)
            spot = np.exp(
                -((xs + 0.5 - spot_x) ** 2 + (ys + 0.5 - spot_y) ** 2) / (2 * rng.uniform(0.8, 2.2) ** 2)
            )
            profile *= 1 + rng.choice([-0.6, 0.6]) * spot
        value = n.brightness * profile
        mine = owner[y0 : y0 + h, x0 : x0 + w] == index
        owned[y0 : y0 + h, x0 : x0 + w][mine] = value[mine]
        glow[y0 : y0 + h, x0 : x0 + w] += np.where(r >= 1, value, 0)
    return np.where(owner > 0, owned, glow)


def _with_halo(rng: np.random.Generator, signal: np.ndarray, look: Appearance) -> np.ndarray:
    """``signal`` plus its out-of-focus halo (float32, same shape); ``rng`` is the halo's own stream,
    so adding the halo changes nothing else of a tile."""
    strength = rng.uniform(*look.halo)
    if strength <= 0:
        return signal
    return signal + strength * cv2.GaussianBlur(signal, (0, 0), _log_uniform(rng, look.halo_sigma))


def _with_cytoplasm(
    rng: np.random.Generator, signal: np.ndarray, nuclei: list[Nucleus], look: Appearance
) -> np.ndarray:
    """``signal`` plus each nucleus's cell body (float32, same shape): a soft ellipse 1.3-2.2 times
    the nucleus, its centre moved off the nucleus's so the part outside the nucleus is a crescent,
    at a fraction :attr:`Appearance.cytoplasm` of the nucleus's brightness. ``rng`` is the
    cytoplasm's own stream, so adding it changes nothing else of a tile."""
    if not nuclei or rng.random() >= look.cytoplasm_fraction or look.cytoplasm[1] <= 0:
        return signal
    height, width = signal.shape
    bodies = np.zeros_like(signal)
    for n in nuclei:
        scale, direction = rng.uniform(1.3, 2.2), rng.uniform(0, 2 * math.pi)
        shift = rng.uniform(0.3, 0.9) * (scale - 1) * n.semi_minor
        cell = replace(
            n,
            cx=n.cx + shift * math.cos(direction),
            cy=n.cy + shift * math.sin(direction),
            semi_major=n.semi_major * scale * rng.uniform(1.0, 1.3),
            semi_minor=n.semi_minor * scale,
            angle=rng.uniform(0, math.pi),
        )
        r, x0, y0 = _shape_field(cell, height, width, reach=1.6)
        if r.size == 0:
            continue
        h, w = r.shape
        level = n.brightness * _log_uniform(rng, look.cytoplasm)
        bodies[y0 : y0 + h, x0 : x0 + w] += level / (1 + np.exp(np.minimum((r - 1) / 0.12, 50)))
    return signal + bodies


def _emitted_light(
    rng: np.random.Generator,
    nuclei: list[Nucleus],
    owner: np.ndarray,
    look: Appearance,
    stream: tuple[int, ...],
) -> np.ndarray:
    """All light the sample emits (float32, like ``owner``): the nuclei (drawn from ``rng``), their
    cell bodies and their out-of-focus halo, each of these two from its own random stream
    (``stream`` + 3 and + 2), so that turning either on or off changes nothing else."""
    signal = _nuclei_signal(rng, nuclei, owner)
    signal = _with_cytoplasm(np.random.default_rng([*stream, 3]), signal, nuclei, look)
    return _with_halo(np.random.default_rng([*stream, 2]), signal, look)


def _debris(rng: np.random.Generator, size: int) -> np.ndarray:
    """Intensity (float32, size x size) of things that are not nuclei."""
    layer = np.zeros((size, size), np.float32)
    for _ in range(rng.poisson(6 * (size / 256) ** 2)):
        centre = (int(rng.uniform(0, size)), int(rng.uniform(0, size)))
        cv2.circle(layer, centre, int(rng.integers(1, 3)), float(rng.uniform(0.3, 2.0)), -1)
    for _ in range(rng.poisson(1.5)):
        points = np.cumsum(rng.normal(0, 12, (6, 2)), axis=0) + rng.uniform(0, size, 2)
        brightness = float(rng.uniform(0.15, 0.5))
        cv2.polylines(layer, [points.astype(np.int32)], False, brightness, 1, cv2.LINE_AA)
    for _ in range(rng.poisson(1.0)):
        centre = (int(rng.uniform(0, size)), int(rng.uniform(0, size)))
        blob = np.zeros_like(layer)
        cv2.circle(blob, centre, int(rng.integers(20, 45)), float(rng.uniform(0.06, 0.15)), -1)
        layer += cv2.GaussianBlur(blob, (0, 0), 10)
    return layer


@dataclass(frozen=True)
class Tile:
    """A rendered tile.

    pixels: the stored image, (size, size) uint8 or uint16 grey, or (size, size, 3) uint8 RGB.
    instances: int32 (size, size) label map, 0 background, k for instance k.
    labels: class label (1 = nucleus) of instance k at index k - 1.
    file_type: one of :data:`FILE_TYPES`; suffix: the file's extension (".png" or ".tif").
    """

    pixels: np.ndarray
    instances: np.ndarray
    labels: list[int]
    file_type: str

    @property
    def suffix(self) -> str:
        return ".tif" if self.file_type.startswith("gray16") else ".png"

    def encoded(self) -> bytes:
        """The tile's file bytes (PNG or TIFF)."""
        if self.suffix == ".tif":
            out = io.BytesIO()
            tifffile.imwrite(out, self.pixels, compression="zlib")
            return out.getvalue()
        pixels = self.pixels[..., ::-1] if self.pixels.ndim == 3 else self.pixels
        ok, data = cv2.imencode(".png", pixels)
        if not ok:
            raise ValueError("PNG encoding failed")
        return data.tobytes()


def _camera(
    rng: np.random.Generator,
    style: TileStyle,
    signal: np.ndarray,
    height: int,
    width: int,
    field_cells: int = 0,
) -> np.ndarray:
    """The stored pixels of an emitted ``signal`` (float32, height x width): background, debris,
    uneven illumination, blur, shot and read noise, digitisation to the style's file type.

    ``field_cells``: cells of the illumination and background fields along the
    longer side (0: 3 and 6, one microscope field per tile).
    """
    size = max(height, width)
    light_cells, background_cells = (field_cells, 2 * field_cells) if field_cells else (3, 6)
    illumination = 1 - style.unevenness * _smooth_field(rng, size, size, light_cells)[:height, :width]
    autofluorescence = style.background * (
        0.5 + _smooth_field(rng, size, size, background_cells)[:height, :width]
    )
    debris = _debris(rng, size)[:height, :width]
    intensity = (autofluorescence + signal + debris) * illumination
    intensity = cv2.GaussianBlur(intensity, (0, 0), style.blur)

    expected = np.clip(intensity, 0, None) * style.photons
    counts = rng.poisson(expected).astype(np.float32) + rng.normal(0, style.read_noise, expected.shape)
    counts = counts.astype(np.float32)
    dtype_max = 255 if style.file_type in ("gray8", "rgb8") else 65535
    offset = rng.uniform(0, 0.08) * style.max_value
    gain = (style.max_value - offset) / max(float(np.percentile(expected, 99.95)) * 1.15, 1.0)
    digital = np.clip(offset + gain * counts, 0, dtype_max)
    dtype = np.uint8 if dtype_max == 255 else np.uint16
    if style.file_type == "rgb8":
        tint = np.array([rng.uniform(0, 0.6), rng.uniform(0, 0.6), 1.0], np.float32)
        if rng.random() < 0.3:
            tint[:] = 1.0
        return (digital[..., None] * tint + 0.5).astype(dtype)
    return (digital + 0.5).astype(dtype)


def render_tile(seed: int, slide: int, tile: int, size: int = 256, look: Appearance = TRAINING) -> Tile:
    """Render one tile with its ground truth; deterministic per arguments."""
    rng = np.random.default_rng([seed, slide, tile])
    style = TileStyle.draw(rng, look)
    placed = _place_nuclei(rng, size, look, style)
    if np.random.default_rng([seed, slide, tile, 1]).random() < look.empty_fraction:
        placed = []  # a separate stream, so a tile with nuclei is the same whatever the fraction
    nuclei, owner = _resolve_occlusion(placed, size, size)
    signal = _emitted_light(rng, nuclei, owner, look, stream=(seed, slide, tile))

    pixels = _camera(rng, style, signal, size, size)
    return Tile(pixels, owner, [1] * len(nuclei), style.file_type)


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


def tile_paths(dest: str | Path) -> list[Path]:
    """The tile files of an archive written by :func:`write_archive`, sorted (PNG and TIFF)."""
    return sorted(p for p in Path(dest).rglob("tile-*") if p.suffix in (".png", ".tif"))


def _write_tile(
    dest: Path, seed: int, size: int, look: Appearance, slide_and_index: tuple[int, int]
) -> tuple[str, list[dict]]:
    """Render and write one tile; return its path relative to ``dest`` and its annotations."""
    slide, index = slide_and_index
    tile = render_tile(seed, slide, index, size, look)
    file_name = f"slide-{slide:03d}/tile-{index:04d}{tile.suffix}"
    (dest / file_name).write_bytes(tile.encoded())
    return file_name, tile_annotations(tile.instances, tile.labels)


def write_archive(
    dest: str | Path,
    *,
    slides: int = 4,
    tiles_per_slide: int = 16,
    size: int = 256,
    seed: int = 0,
    look: Appearance = TRAINING,
    workers: int = 1,
) -> Path:
    """Write the archive and its COCO ground truth; return the annotations path.

    Image ``file_name`` in the COCO file is the tile path relative to ``dest``
    (``slide-000/tile-0000.png`` or ``.tif``); image ids count from 1 in that order.
    ``workers`` processes render the tiles (each tile is a function of its
    ``(seed, slide, tile)``, so the archive is the same for any number).
    """
    dest = Path(dest)
    for slide in range(slides):
        (dest / f"slide-{slide:03d}").mkdir(parents=True, exist_ok=True)
    keys = [(slide, index) for slide in range(slides) for index in range(tiles_per_slide)]
    write = partial(_write_tile, dest, seed, size, look)
    workers = min(workers, len(keys))
    if workers > 1:
        # Spawned, not forked: a caller may hold threads (torch, Ray) that a fork would copy mid-lock.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            written = list(pool.map(write, keys, chunksize=max(1, len(keys) // (4 * workers))))
    else:
        written = [write(key) for key in keys]
    images, annotations = [], []
    for file_name, tile_objects in written:
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for annotation in tile_objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    coco = {
        "info": {"description": f"synthetic nuclei, seed {seed}", "version": "2"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)],
    }
    path = dest / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


SLIDE_MPP = 0.5
"""µm per level-0 pixel stated by synthetic slides (the nuclei are drawn at the training sizes)."""


def _tissue(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A bool mask of 1 to 3 irregular tissue pieces covering roughly a third of the slide."""
    small = _smooth_field(rng, 64, 64, 5) + 0.35 * _smooth_field(rng, 64, 64, 12)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    # Pieces stay off the slide's border, so the border is glass (where the background is measured).
    vignette = np.minimum.reduce([xx, 1 - xx, yy, 1 - yy]) > 0.08
    threshold = np.quantile(small[vignette], 0.62)
    coarse = ((small > threshold) & vignette).astype(np.uint8)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR).astype(bool)


@dataclass(frozen=True)
class SyntheticSlide:
    """A rendered slide: RGB pixels (H, W, 3) uint8, the label map int32 (H, W), the tissue mask."""

    pixels: np.ndarray
    instances: np.ndarray
    tissue: np.ndarray


def render_slide(seed: int, slide: int, size: int = 3072, look: Appearance = TRAINING) -> SyntheticSlide:
    """A fluorescence slide: tissue pieces packed with nuclei, glass (dark, noisy, specks) elsewhere.

    Nuclei are placed over the whole slide at once (so they cross any window
    seam), with the training looks; stored as tinted 8-bit RGB like a scanner's.
    """
    rng = np.random.default_rng([seed, slide, 999_999])
    style = replace(TileStyle.draw(rng, look), file_type="rgb8", unevenness=rng.uniform(0.0, 0.3))
    tissue = _tissue(rng, size, size)
    ys, xs = np.nonzero(tissue[::4, ::4])
    count = int(len(ys) * 16 / 900)  # about one nucleus per 900 px^2 of tissue
    picks = rng.integers(0, len(ys), count) if len(ys) else np.zeros(0, int)
    nuclei = [
        _sample_nucleus(
            rng, look, style, float(xs[i] * 4 + rng.uniform(0, 4)), float(ys[i] * 4 + rng.uniform(0, 4))
        )
        for i in picks
    ]
    nuclei, owner = _resolve_occlusion(nuclei, size, size)
    signal = _emitted_light(rng, nuclei, owner, look, stream=(seed, slide))
    pixels = _camera(rng, style, signal, size, size, field_cells=max(3, size // 1024 * 3))
    return SyntheticSlide(pixels, owner, tissue)


def write_slide(
    path: str | Path,
    pixels: np.ndarray,
    *,
    mpp: float = SLIDE_MPP,
    levels: int = 3,
    compression: str = "jpeg",
) -> None:
    """Write RGB ``pixels`` as an Aperio-style SVS: tiled level 0 (JPEG quality 90, or ``compression``),
    a thumbnail page, then levels downsampled 4x each, the pixel size in the ImageDescription."""
    height, width = pixels.shape[:2]
    description = (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] (256x256) JPEG/RGB Q=90"
        f"|AppMag = 20|MPP = {mpp}|Filename = {Path(path).stem}"
    )
    options = {
        "photometric": "rgb",
        "compression": compression,
        "compressionargs": {"level": 90} if compression == "jpeg" else {},
        "metadata": None,
    }
    pyramid = [pixels]
    for _ in range(levels - 1):
        last = pyramid[-1]
        pyramid.append(
            cv2.resize(
                last, (max(1, last.shape[1] // 4), max(1, last.shape[0] // 4)), interpolation=cv2.INTER_AREA
            )
        )
    with tifffile.TiffWriter(path) as tif:
        tif.write(pyramid[0], tile=(256, 256), description=description, **options)
        thumbnail = cv2.resize(
            pixels, (max(1, width // 32), max(1, height // 32)), interpolation=cv2.INTER_AREA
        )
        tif.write(
            thumbnail,
            description=f"Aperio Image Library v12.0.15 \r\n{width}x{height} -> thumbnail",
            **options,
        )
        for level in pyramid[1:]:
            tif.write(level, tile=(256, 256), description=description, **options)


def _label_boxes(instances: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """(row0, row1, col0, col1) of every label > 0 of a label map (end-exclusive)."""
    flat = np.flatnonzero(instances)
    labels = instances.flat[flat]
    order = np.argsort(labels, kind="stable")
    flat, labels = flat[order], labels[order]
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]]) if len(labels) else np.zeros(0, int)
    rows, cols = np.divmod(flat, instances.shape[1])
    boxes = zip(
        np.minimum.reduceat(rows, starts) if len(starts) else [],
        np.maximum.reduceat(rows, starts) + 1 if len(starts) else [],
        np.minimum.reduceat(cols, starts) if len(starts) else [],
        np.maximum.reduceat(cols, starts) + 1 if len(starts) else [],
        strict=True,
    )
    return {int(labels[s]): tuple(int(v) for v in box) for s, box in zip(starts, boxes, strict=True)}


def slide_annotations(instances: np.ndarray) -> list[dict]:
    """COCO annotations (without ids) of a slide's label map, in level-0 slide coordinates."""
    from pipeline.masks import Crop, encode_crops

    crops = [
        Crop(instances[r0:r1, c0:c1] == label, c0, r0)
        for label, (r0, r1, c0, c1) in _label_boxes(instances).items()
    ]
    encoded = encode_crops(crops, instances.shape)
    annotations = []
    for i, crop in enumerate(crops):
        h, w = crop.mask.shape
        annotations.append(
            {
                "category_id": 1,
                "segmentation": {"size": list(instances.shape), "counts": encoded["rle"][i]},
                "area": float(encoded["area"][i]),
                "bbox": [float(crop.x0), float(crop.y0), float(w), float(h)],
                "iscrowd": 0,
            }
        )
    return annotations


def write_slide_archive(dest: str | Path, *, slides: int = 2, size: int = 3072, seed: int = 0) -> Path:
    """Write ``slides`` SVS slides (``DEST/slide-NNN.svs``) and their COCO ground truth in level-0
    slide coordinates (``DEST/annotations.json``, one image per slide); return its path."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(slides):
        rendered = render_slide(seed, index, size)
        file_name = f"slide-{index:03d}.svs"
        write_slide(dest / file_name, rendered.pixels)
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
        for annotation in slide_annotations(rendered.instances):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    coco = {
        "info": {"description": f"synthetic slides, seed {seed}, {SLIDE_MPP} um/px", "version": "2"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "nucleus"}],
    }
    path = dest / "annotations.json"
    path.write_text(json.dumps(coco))
    return path
