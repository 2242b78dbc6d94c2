"""The window grid over a slide, window ownership, and the one mapping from a window to the slide.

A window is what the model sees: ``size`` x ``size`` pixels, read from one
pyramid level and resampled if needed, so one window pixel covers
``downsample`` level-0 pixels. Every window is laid out in whole level-0
pixels: its level-0 extent is ``size * downsample``, it overlaps each
neighbour by ``2 * margin`` level-0 pixels (``overlap`` window pixels), and
it owns a *core*, the window less ``margin`` on every side. The cores are the
cells of a grid of pitch ``extent - 2 * margin`` starting at the slide's
origin, so they partition the slide. A window is centred on its core, except
at the slide's edges: where the slide is at least one window wide (high), a
window that would reach past its edge is moved inside it, so the model sees
image there, not padding (zero-padded windows, which no training tile has,
made the bundled model find a nucleus in the padding's edge). It still holds
its core and ``margin`` beyond it wherever the slide goes on. Only a slide
narrower (lower) than one window is padded.

Ownership: an instance is kept only by the window whose core holds its
centroid (level-0 coordinates). Each object is decided by one window alone,
so there is no merge across windows or shards; an object that reaches at
most ``margin`` level-0 pixels beyond its owner's core (an object of up to
``overlap`` window pixels across, wherever its centroid lies in the core) is
seen whole. This is StarDist's ``predict_instances_big`` rule; TIAToolbox
re-runs tile borders and SAHI merges by NMS afterwards, both a global step
this pipeline does not have.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import shapely


@dataclass(frozen=True)
class Window:
    """One window. x, y: level-0 position of its pixel (0, 0) corner (whole pixels, may be
    negative); size: side in window pixels; downsample: level-0 pixels per window pixel;
    level: the pyramid level it is read from; core: [core_x0, core_x1) x [core_y0, core_y1), level-0.
    """

    x: int
    y: int
    size: int
    downsample: float
    level: int
    core_x0: int
    core_y0: int
    core_x1: int
    core_y1: int

    @property
    def extent(self) -> int:
        """The window's side in level-0 pixels."""
        return round(self.size * self.downsample)

    def to_slide(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window coordinates (x right, y down, pixel edges) -> level-0 slide coordinates (float64)."""
        x = self.x + np.asarray(x, np.float64) * self.downsample
        return x, self.y + np.asarray(y, np.float64) * self.downsample

    def polygons_to_slide(self, wkb: list[bytes]) -> list[bytes]:
        """WKB geometries in window coordinates -> WKB in level-0 slide coordinates."""
        if not len(wkb):
            return []
        scale, offset = self.downsample, np.array([self.x, self.y], np.float64)
        geometries = shapely.transform(shapely.from_wkb(wkb), lambda xy: xy * scale + offset)
        return list(shapely.to_wkb(geometries))

    def owns(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """bool: whether level-0 points (x, y) lie in this window's core."""
        x, y = np.asarray(x), np.asarray(y)
        return (x >= self.core_x0) & (x < self.core_x1) & (y >= self.core_y0) & (y < self.core_y1)

    def touches_inner_edge(self, crops: list, slide_width: int, slide_height: int) -> np.ndarray:
        """bool (N,): whether each box-local mask (window pixels) touches a side of the window that
        lies inside the slide (or image), i.e. its object may go on beyond the window."""
        extent = self.extent
        left, top = self.x > 0, self.y > 0
        right, bottom = self.x + extent < slide_width, self.y + extent < slide_height
        return np.array(
            [
                (left and c.x0 == 0)
                or (top and c.y0 == 0)
                or (right and c.x0 + c.mask.shape[1] >= self.size)
                or (bottom and c.y0 + c.mask.shape[0] >= self.size)
                for c in crops
            ],
            bool,
        ).reshape(len(crops))

    def row(self) -> dict:
        """The window's manifest columns (see ``schemas.MANIFEST``)."""
        return {
            "tile_x0": float(self.x),
            "tile_y0": float(self.y),
            "tile_downsample": self.downsample,
            "level": self.level,
            "tile_size": self.size,
            "core_x0": self.core_x0,
            "core_y0": self.core_y0,
            "core_x1": self.core_x1,
            "core_y1": self.core_y1,
        }

    @classmethod
    def from_row(cls, row: dict) -> Window:
        """Inverse of :meth:`row` (a manifest row of a window)."""
        return cls(
            x=int(row["tile_x0"]),
            y=int(row["tile_y0"]),
            size=int(row["tile_size"]),
            downsample=float(row["tile_downsample"]),
            level=int(row["level"]),
            core_x0=int(row["core_x0"]),
            core_y0=int(row["core_y0"]),
            core_x1=int(row["core_x1"]),
            core_y1=int(row["core_y1"]),
        )


@dataclass(frozen=True)
class Grid:
    """The window layout of one slide: ``size`` window pixels of ``downsample`` level-0 px each,
    ``margin`` level-0 px of overlap on each side, read from ``level``."""

    size: int
    overlap: int
    downsample: float
    level: int = 0

    def __post_init__(self):
        if self.overlap < 0 or self.overlap % 2 or self.overlap >= self.size:
            raise ValueError(f"tile overlap must be even and in [0, {self.size}), got {self.overlap}")

    @property
    def extent(self) -> int:
        """Window side in level-0 pixels (whole pixels)."""
        return max(1, round(self.size * self.downsample))

    @property
    def margin(self) -> int:
        """Level-0 pixels by which a window reaches beyond its core on each side."""
        return round(self.overlap / 2 * self.extent / self.size)

    @property
    def pitch(self) -> int:
        """Level-0 side of a core (the grid's step)."""
        return self.extent - 2 * self.margin

    def shape(self, width: int, height: int) -> tuple[int, int]:
        """(columns, rows) of cores covering a ``width`` x ``height`` level-0 slide."""
        return max(1, math.ceil(width / self.pitch)), max(1, math.ceil(height / self.pitch))

    def _position(self, core_start: int, length: int) -> int:
        """Level-0 start of the window of the core starting at ``core_start`` along a side of ``length``:
        ``margin`` before the core, moved inside ``[0, length)`` when the side holds a whole window."""
        start = core_start - self.margin
        if length < self.extent:
            return start
        return min(max(start, 0), length - self.extent)

    def windows(
        self, width: int, height: int, keep: Callable[[int, int, int, int], bool] | None = None
    ) -> list[Window]:
        """The windows over a ``width`` x ``height`` (level-0) slide, row by row.

        ``keep(x0, y0, x1, y1) -> bool`` on a window's core (level-0; the
        tissue test): windows whose core it rejects are left out. Objects are
        owned by cores, so a core without tissue has nothing to own.
        """
        columns, rows = self.shape(width, height)
        pitch = self.pitch
        downsample = self.extent / self.size
        found = []
        for row in range(rows):
            for column in range(columns):
                x0, y0 = column * pitch, row * pitch
                if keep is not None and not keep(x0, y0, x0 + pitch, y0 + pitch):
                    continue
                found.append(
                    Window(
                        self._position(x0, width),
                        self._position(y0, height),
                        self.size,
                        downsample,
                        self.level,
                        x0,
                        y0,
                        x0 + pitch,
                        y0 + pitch,
                    )
                )
        return found


def window_mask_to_slide(mask: np.ndarray, tile_x0: float, tile_y0: float, downsample: float):
    """A mask in a window's frame (bool (size, size), as decoded from ``instances.rle``) as a box-local
    :class:`pipeline.masks.Crop` in level-0 slide pixels (resampled, nearest, when ``downsample`` is
    not 1); for plain images (origin 0, downsample 1) the mask's own box.

    ``mask`` may also be a part of the window starting at window pixel (x, y): pass
    ``tile_x0 + x * downsample`` and ``tile_y0 + y * downsample`` as its origin."""
    from pipeline.masks import Crop

    rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return Crop(np.zeros((0, 0), bool), int(tile_x0), int(tile_y0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
    box = mask[r0:r1, c0:c1]
    x0, y0 = tile_x0 + c0 * downsample, tile_y0 + r0 * downsample
    if downsample != 1:
        size = (max(1, round((c1 - c0) * downsample)), max(1, round((r1 - r0) * downsample)))
        box = cv2.resize(box.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    return Crop(box, round(x0), round(y0))


def touches_mask(mask: np.ndarray, scale: float) -> Callable[[int, int, int, int], bool]:
    """``keep`` for :meth:`Grid.windows`: whether a level-0 rectangle touches a mask of ``scale``
    level-0 pixels per mask pixel (the mask's own pixels, not its bounding box)."""
    height, width = mask.shape
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def keep(x0: int, y0: int, x1: int, y1: int) -> bool:
        c0, r0 = max(int(x0 // scale), 0), max(int(y0 // scale), 0)
        c1, r1 = min(math.ceil(x1 / scale), width), min(math.ceil(y1 / scale), height)
        if c1 <= c0 or r1 <= r0:
            return False
        return bool(integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0] > 0)

    return keep


def cut_into_windows(array: np.ndarray, grid: Grid) -> list[tuple[Window, np.ndarray]]:
    """A model input (C, H, W) larger than one window, cut into ``grid``'s windows (inside the image
    along a side that holds a whole window, zero-padded along one that does not): (window, its input
    (C, size, size)) each, row by row. The image is prepared once; each piece is a copy of its part."""
    channels, height, width = array.shape
    pieces = []
    for window in grid.windows(width, height):
        piece = np.zeros((channels, window.size, window.size), array.dtype)
        x0, y0 = max(window.x, 0), max(window.y, 0)
        x1, y1 = min(window.x + window.size, width), min(window.y + window.size, height)
        piece[:, y0 - window.y : y1 - window.y, x0 - window.x : x1 - window.x] = array[:, y0:y1, x0:x1]
        pieces.append((window, piece))
    return pieces


def owned_crops_in_image(
    crops: list, window: Window, height: int, width: int
) -> tuple[list, np.ndarray, np.ndarray]:
    """A window's box-local masks (in window pixels, downsample 1) moved into the image it was cut
    from: (crops in image pixels, clipped to the image; bool (N,) owned: the mask's centroid lies in
    the window's core, or the mask is empty; bool (N,) touching an inner edge of the window)."""
    from pipeline.masks import Crop

    moved, owned = [], np.zeros(len(crops), bool)
    touching = window.touches_inner_edge(crops, width, height)
    for k, crop in enumerate(crops):
        h, w = crop.mask.shape
        x0, y0 = crop.x0 + window.x, crop.y0 + window.y
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, width), min(y0 + h, height)
        mask = crop.mask[cy0 - y0 : max(cy1 - y0, cy0 - y0), cx0 - x0 : max(cx1 - x0, cx0 - x0)]
        rows, columns = np.nonzero(mask)
        if len(rows):
            owned[k] = bool(window.owns(cx0 + columns.mean() + 0.5, cy0 + rows.mean() + 0.5))
        else:
            owned[k] = True
        moved.append(Crop(mask, cx0, cy0))
    return moved, owned, touching & owned
