"""Whole-slide images: open, describe, read a region, find tissue. Local files and object stores alike.

Reader: `tiffslide <https://github.com/Bayer-Group/tiffslide>`_ (tifffile
underneath). It reads Aperio SVS, generic tiled / pyramidal TIFF and BigTIFF,
OME-TIFF pyramids, Hamamatsu NDPI and Leica SCN, and it reads from any
file-like object, so a slide on S3 is read through the project's own
``pyarrow.fs`` layer, range by range: opening a slide reads its header and
tile tables (a few tens of kB), a region reads the tiles it covers, never the
whole file and never a local copy. OpenSlide was not chosen: it reads local
paths only (its maintainers decline remote I/O), so a bucket of slides would
have to be downloaded first.

Known properties of the reader, which the pipeline works with:

* a handle cannot be pickled: each replica opens each slide itself, once
  (:class:`SlideCache`), never once per window;
* one open slide is read by one thread at a time (a lock in :class:`Slide`;
  the handle and its file position are shared), so windows of one slide are
  read one after the other within a replica, windows of different slides in
  parallel; on this project's CPU one reader runs at 113 times what the
  forward pass consumes (BENCHMARKS.md), on a fast GPU that margin is smaller;
* small reads: the file object handed to tiffslide caches 256 kB blocks
  (:class:`BlockCachedFile`, at most 16 MB per open slide, 4 open slides per
  replica), so the header's many small reads become a few range requests;
* tifffile parses every page header on open: the pipeline opens a slide once
  per replica, and the plan once per slide.

Coordinates: level-0 pixels, x to the right, y down, as in the tables.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from pipeline import storage
from pipeline.decode import ome_channel_names, tiff_pixel_size_um
from pipeline.preprocess import (
    Intensity,
    Preprocessing,
    PreprocessingError,
    intensity_map,
    noise_sigma,
    select_channels,
)
from pipeline.windows import Grid, Window, touches_mask

SLIDE_EXTENSIONS = frozenset({".svs", ".ndpi", ".scn", ".bif", ".btf"})
"""Files that are always whole slides."""
TIFF_EXTENSIONS = frozenset({".tif", ".tiff"})
TIFF_SLIDE_MIN_BYTES = 16 * 2**20
"""A .tif/.tiff this large or larger is opened at plan time and read as a slide if it is tiled
(smaller ones are tiles of an archive: opening each at plan time would cost a request per file)."""
PLAUSIBLE_MPP = (0.05, 20.0)
"""A slide's pixel size outside this range (µm/px) is flagged and not used."""
THUMBNAIL_MAX_SIDE = 2048
"""Tissue is found on the finest level whose longer side is at most this many pixels (or the coarsest)."""
THUMBNAIL_MAX_READ_SIDE = 8192
"""A slide whose coarsest level is longer than this on a side has no level to find tissue on."""
MAX_SLIDE_PIXELS = 10**11
"""Level-0 pixels above this are refused (the largest scanned slides are about 2 * 10^10)."""
BLOCK_BYTES = 256 * 2**10
CACHED_BLOCKS = 64
"""Per open slide: 64 blocks of 256 kB (16 MB) of cached file bytes."""


class SlideError(ValueError):
    """A slide that cannot be opened or read (corrupt, truncated, unsupported layout)."""


_READER_ERRORS = (ValueError, KeyError, IndexError, NotImplementedError, EOFError, OSError, RuntimeError)
"""What tifffile, tiffslide and the codecs raise on a file they cannot parse or a tile they cannot
decode (imagecodecs' errors are RuntimeErrors, tifffile's TiffFileError a ValueError)."""


class BlockCachedFile(io.RawIOBase):
    """A read-only file object over a ``pyarrow`` random-access file, reading aligned blocks (LRU).

    tifffile parses a header with many small reads; on S3 each would be a
    request. Blocks of :data:`BLOCK_BYTES` make them a few range GETs.
    ``bytes_read`` counts the bytes fetched from storage.
    """

    def __init__(self, source, *, block_bytes: int = BLOCK_BYTES, blocks: int = CACHED_BLOCKS):
        self._source = source
        self._size = source.size()
        self._block = block_bytes
        self._capacity = blocks
        self._blocks: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._position = 0
        self._lock = threading.Lock()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(base + offset, 0)
        return self._position

    def _block_at(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is None:
            start = index * self._block
            block = self._source.read_at(min(self._block, self._size - start), start)
            self.bytes_read += len(block)
            self._blocks[index] = block
            if len(self._blocks) > self._capacity:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(index)
        return block

    def read(self, size: int = -1) -> bytes:
        end = self._size if size is None or size < 0 else min(self._size, self._position + size)
        if end <= self._position:
            return b""
        with self._lock:
            first, last = self._position // self._block, (end - 1) // self._block
            data = b"".join(self._block_at(i) for i in range(first, last + 1))
        offset = self._position - first * self._block
        out = data[offset : offset + end - self._position]
        self._position = end
        return out

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._source.close()
        super().close()


@dataclass(frozen=True)
class SlideInfo:
    """What a slide's header says.

    width, height: level-0 pixels; level_dimensions: (width, height) per level;
    level_downsamples: level-0 pixels per level pixel; mpp: µm per level-0
    pixel (None when the slide states none or an implausible one, see
    ``mpp_note``); vendor: tiffslide's vendor name or "generic";
    bounds_x, bounds_y: the offset of the scanned area that viewers such as
    QuPath crop away (0 when the vendor gives none); channels: channel names.
    """

    width: int
    height: int
    tiled: bool
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_note: str | None
    vendor: str
    bounds_x: int
    bounds_y: int
    channels: tuple[str, ...]
    dtype: str


class Slide:
    """An open slide (a tiffslide handle over a block-cached file). Thread-safe for reads."""

    def __init__(self, uri: str):
        from tiffslide import TiffSlide

        fs, path = storage.resolve(uri)
        try:
            self._file = BlockCachedFile(storage.retry_transient(lambda: fs.open_input_file(path)))
        except storage.PERMANENT_ERRORS as exc:
            raise SlideError(f"cannot open {storage.redact(uri)}: {exc}") from None
        try:
            self._slide = TiffSlide(self._file, tifffile_options={"name": path.rsplit("/", 1)[-1]})
            self.info = _describe(self._slide)
        except _READER_ERRORS as exc:
            self._file.close()
            raise SlideError(f"not a readable slide: {type(exc).__name__}: {exc}") from None
        self._lock = threading.Lock()

    @property
    def bytes_read(self) -> int:
        """Bytes fetched from storage since the slide was opened."""
        return self._file.bytes_read

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Pixels (height, width, C) of ``level`` whose top-left is level-0 (x, y), inside the slide.

        Native dtype and channels (RGB without alpha, grey, or an OME stack's channels).
        Raises :class:`SlideError` when the tiles cannot be read or decoded.
        """
        try:
            with self._lock:
                region = self._slide.read_region((x, y), level, (width, height), as_array=True)
        except _READER_ERRORS as exc:
            raise SlideError(
                f"cannot read level {level} at ({x}, {y}): {type(exc).__name__}: {exc}"
            ) from None
        region = np.asarray(region)
        return np.ascontiguousarray(region if region.ndim == 3 else region[..., None])

    @functools.cached_property
    def background(self) -> np.ndarray:
        """The glass's value per channel (median of the thumbnail's border), native dtype: what
        windows are padded with beyond the slide's edge."""
        thumbnail, _ = self.thumbnail
        return background_of(thumbnail).astype(thumbnail.dtype)

    def read_window(self, window: Window) -> np.ndarray:
        """The window's pixels (size, size, C), native dtype: its level's region resampled to
        ``window.size`` if the level is not at the window's scale; beyond the slide, the glass."""
        info = self.info
        level_downsample = info.level_downsamples[window.level]
        level_side = max(1, round(window.extent / level_downsample))
        x0, y0 = max(window.x, 0), max(window.y, 0)
        x1, y1 = min(window.x + window.extent, info.width), min(window.y + window.extent, info.height)
        ox, oy = round((x0 - window.x) / level_downsample), round((y0 - window.y) / level_downsample)
        width = min(round((x1 - x0) / level_downsample), level_side - ox)
        height = min(round((y1 - y0) / level_downsample), level_side - oy)
        inside = (ox, oy, width, height) == (0, 0, level_side, level_side)
        region = self.read_region(x0, y0, window.level, width, height) if width > 0 and height > 0 else None
        if inside:
            pixels = region
        else:
            channels = len(info.channels)
            pixels = np.empty((level_side, level_side, channels), np.dtype(info.dtype))
            pixels[...] = self.background
            if region is not None:
                pixels[oy : oy + region.shape[0], ox : ox + region.shape[1]] = region
        if level_side != window.size:
            interpolation = cv2.INTER_AREA if level_side > window.size else cv2.INTER_LINEAR
            resized = cv2.resize(pixels, (window.size, window.size), interpolation=interpolation)
            pixels = resized.reshape(window.size, window.size, -1)
        return pixels

    @functools.cached_property
    def thumbnail(self) -> tuple[np.ndarray, float]:
        """(pixels (h, w, C), level-0 pixels per thumbnail pixel): the level tissue is found on.

        The finest level whose longer side is at most :data:`THUMBNAIL_MAX_SIDE`,
        else the coarsest level, resized down to that side. Read once per open
        slide (the plan's tissue and the glass colour share it; a replica reads
        it only for a window that reaches beyond the slide).
        """
        dims, downsamples = self.info.level_dimensions, self.info.level_downsamples
        fitting = [k for k, (w, h) in enumerate(dims) if max(w, h) <= THUMBNAIL_MAX_SIDE]
        level = fitting[0] if fitting else len(dims) - 1
        w, h = dims[level]
        pixels = self.read_region(0, 0, level, w, h)
        scale = downsamples[level]
        if max(w, h) > THUMBNAIL_MAX_SIDE:
            factor = THUMBNAIL_MAX_SIDE / max(w, h)
            size = (max(1, round(w * factor)), max(1, round(h * factor)))
            pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA).reshape(size[1], size[0], -1)
            scale *= max(w, h) / THUMBNAIL_MAX_SIDE
        return pixels, scale

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._file.closed

    def close(self) -> None:
        self._slide.close()
        self._file.close()


def _describe(slide) -> SlideInfo:
    properties = slide.properties
    tif = slide.ts_tifffile
    series = tif.series[int(properties.get("tiffslide.series-index") or 0)]
    mpp, note = properties.get("tiffslide.mpp-x"), None
    if mpp is None:
        mpp = tiff_pixel_size_um(tif)  # OME PhysicalSizeX, which tiffslide does not read
    if mpp is None:
        note = "the slide states no pixel size"
    elif not PLAUSIBLE_MPP[0] <= float(mpp) <= PLAUSIBLE_MPP[1]:
        mpp, note = None, f"implausible pixel size {float(mpp):g} µm/px ignored"
    axes, shape = series.axes, series.levels[0].shape
    depth = shape[axes.index("S")] if "S" in axes else shape[axes.index("C")] if "C" in axes else 1
    if depth == 1:
        channels: tuple[str, ...] = ("gray",)
    elif "S" in axes and depth == 3:
        channels = ("red", "green", "blue")
    else:
        channels = ome_channel_names(tif, depth) or tuple(f"c{i}" for i in range(depth))
    return SlideInfo(
        width=int(slide.dimensions[0]),
        height=int(slide.dimensions[1]),
        tiled=bool(series.levels[0].keyframe.is_tiled),
        level_dimensions=tuple((int(w), int(h)) for w, h in slide.level_dimensions),
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
        mpp=float(mpp) if mpp is not None else None,
        mpp_note=note,
        vendor=str(properties.get("tiffslide.vendor") or "generic"),
        bounds_x=int(properties.get("tiffslide.bounds-x") or 0),
        bounds_y=int(properties.get("tiffslide.bounds-y") or 0),
        channels=channels,
        dtype=str(series.dtype),
    )


class SlideCache:
    """Open slides of one replica, by URI, at most ``capacity`` at once (least recently used closed).

    A slide pushed out while a thread still reads it is closed when the last
    reader is done, never under it.
    """

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._open: collections.OrderedDict[str, Slide] = collections.OrderedDict()
        self._readers: collections.Counter[Slide] = collections.Counter()
        self._retired: set[Slide] = set()
        self._lock = threading.Lock()
        self.opened = 0

    @contextlib.contextmanager
    def reading(self, uri: str) -> Iterator[Slide]:
        """The open slide at ``uri`` (opened now if needed) for the block. Raises :class:`SlideError`."""
        with self._lock:
            slide = self._open.get(uri)
            if slide is None:
                slide = Slide(uri)
                self.opened += 1
                self._open[uri] = slide
                while len(self._open) > self.capacity:
                    self._retire(self._open.popitem(last=False)[1])
            else:
                self._open.move_to_end(uri)
            self._readers[slide] += 1
        try:
            yield slide
        finally:
            with self._lock:
                self._readers[slide] -= 1
                if slide in self._retired and not self._readers[slide]:
                    self._retire(slide)

    def _retire(self, slide: Slide) -> None:
        """Close ``slide`` now if nobody reads it, else when its last reader is done (lock held)."""
        if self._readers[slide]:
            self._retired.add(slide)
            return
        self._retired.discard(slide)
        del self._readers[slide]
        slide.close()

    def close(self) -> None:
        """Close every open slide (no reader may be left)."""
        with self._lock:
            for slide in [*self._open.values(), *self._retired]:
                slide.close()
            self._open.clear()
            self._retired.clear()
            self._readers.clear()


def background_of(thumbnail: np.ndarray) -> np.ndarray:
    """The glass's value per channel (float64, C): the median of a thumbnail's (h, w, C) border."""
    border = np.concatenate([thumbnail[0], thumbnail[-1], thumbnail[:, 0], thumbnail[:, -1]], axis=0)
    return np.median(border.reshape(-1, thumbnail.shape[2]).astype(np.float64), axis=0)


def tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """bool mask (h, w) of tissue on a thumbnail (h, w, C) (``--tissue auto``).

    Works for bright-field (tissue darker than a white glass) and dark-field
    fluorescence (tissue brighter than a black background) alike: the glass
    is the median of the thumbnail's border, every pixel's distance from it
    (largest over channels) is thresholded at half its Otsu threshold or a
    tenth of the thumbnail's range, whichever is lower (pale tissue stays in),
    but never within 3 sigma of the glass's noise; then closed and cleared of
    specks.
    """
    pixels = thumbnail.astype(np.float32)
    span = float(np.percentile(pixels, 99.5) - np.percentile(pixels, 0.5)) or 1.0
    distance = np.abs(pixels - background_of(thumbnail).astype(np.float32)).max(axis=2)
    distance = cv2.GaussianBlur(distance, (0, 0), 1.0)
    eight_bit = np.clip(distance / span * 255, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(eight_bit, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Half of Otsu, and at most a tenth of the range, keeps pale tissue beside strongly stained
    # tissue; never within 3 sigma of the glass's noise (the thumbnail's own, before the blur),
    # so bare glass has no tissue.
    threshold = max(min(otsu / 2 / 255 * span, span / 10), 3 * noise_sigma(thumbnail))
    mask = (distance > threshold).astype(np.uint8)
    close = max(5, round(max(mask.shape) / 80))  # joins the nuclei of one piece of tissue
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((close, close), np.uint8))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    minimum = max(4, math.ceil(mask.size * 1e-4))
    keep = np.zeros(count, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= minimum
    return keep[labels]


@dataclass(frozen=True)
class SlideSettings:
    """How the plan lays windows on slides (the run's pinned settings).

    tile_size, tile_overlap: window side and overlap in window pixels; mpp:
    the pixel size (µm) the model should see (``--mpp``: a slide without a
    pixel size is refused); default_mpp: the model card's, used for slides
    that state their pixel size (the others are read at level 0 as they are);
    mpp_override: the slides' level-0 pixel size, replacing theirs; tissue:
    ``auto`` or ``all``; max_pixels: a slide file that is not tiled is read
    whole, so it must not have more pixels than this; preprocessing: see below.
    """

    tile_size: int = 1024
    tile_overlap: int = 64
    mpp: float | None = None
    default_mpp: float | None = None
    mpp_override: float | None = None
    tissue: str = "auto"
    max_pixels: int = 89_478_485
    preprocessing: Preprocessing | None = None
    """The model's (with ``--channel``): its normalisation is measured once per slide
    (:func:`slide_intensity`); None: each window is normalised on its own."""


@dataclass
class SlidePlan:
    """A slide's ``slides`` row (see ``schemas.SLIDES``) and its windows (empty when in error).

    ``is_slide`` False: a TIFF that turned out to be an ordinary image (not
    tiled, within ``max_pixels``), to be planned as a plain image.
    """

    row: dict
    windows: list[Window]
    is_slide: bool = True


def is_slide_candidate(name: str, size: int | None) -> bool:
    """Whether a listed file must be opened as a slide at plan time (by name and byte size)."""
    suffix = name[name.rfind(".") :].lower() if "." in name else ""
    if suffix in SLIDE_EXTENSIONS:
        return True
    return suffix in TIFF_EXTENSIONS and size is not None and size >= TIFF_SLIDE_MIN_BYTES


def slide_id_of(uri: str) -> str:
    """A slide file's id: its file name without extension(s) (``S12.ome.tif`` -> ``S12``)."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0] if "." in name else name


def choose_level(info: SlideInfo, downsample: float) -> int:
    """The coarsest level whose downsample is at most ``downsample`` (at or finer), else level 0."""
    fitting = [k for k, d in enumerate(info.level_downsamples) if d <= downsample * (1 + 1e-3)]
    return max(fitting, key=lambda k: info.level_downsamples[k]) if fitting else 0


INTENSITY_SAMPLES = 8
"""Patches read at plan time to measure a slide's normalisation (spread evenly over its tissue)."""
INTENSITY_PATCH = 256
"""Side of each patch, in the pixels the model sees."""


def slide_intensity(
    slide: Slide, tissue: np.ndarray, scale: float, grid: Grid, preprocessing: Preprocessing
) -> Intensity:
    """The model input's normalisation for a whole slide, measured on :data:`INTENSITY_SAMPLES`
    patches centred on tissue pixels evenly spread through the mask (``tissue``, ``scale`` level-0
    px per mask pixel), read as the model sees them (``grid``'s level and downsample).

    One map per slide, independent of the window grid: a window with little
    tissue is not stretched until its glass looks like nuclei, every window of
    a slide is scaled alike, and another ``--tile-size`` gives the same inputs.
    """
    found = np.flatnonzero(tissue)
    if not len(found):
        found = np.arange(tissue.size)
    picks = found[np.linspace(0, len(found) - 1, INTENSITY_SAMPLES).round().astype(int)]
    rows, columns = np.divmod(picks, tissue.shape[1])
    extent = round(INTENSITY_PATCH * grid.extent / grid.size)  # level-0 px
    values = []
    for row, column in zip(rows, columns, strict=True):
        x, y = round((column + 0.5) * scale) - extent // 2, round((row + 0.5) * scale) - extent // 2
        window = Window(
            x, y, INTENSITY_PATCH, extent / INTENSITY_PATCH, grid.level, x, y, x + extent, y + extent
        )
        values.append(select_channels(slide.read_window(window), preprocessing.channel, slide.info.channels))
    return intensity_map(np.concatenate(values, axis=0), preprocessing)


def plan_slide(uri: str, settings: SlideSettings) -> SlidePlan:
    """Open a slide, read its header and a low-resolution level, find tissue, lay its windows.

    Never raises for a bad slide: its row says why (status, error) and it gets no windows.
    """
    row: dict = {
        "uri": storage.redact(uri),
        "slide_id": slide_id_of(uri),
        "tiles_planned": 0,
        "tiles_total": 0,
    }
    try:
        slide = Slide(uri)
    except SlideError as exc:
        return SlidePlan({**row, "status": "unsupported", "error": str(exc)}, [])
    except OSError as exc:
        return SlidePlan({**row, "status": "unreadable", "error": f"{type(exc).__name__}: {exc}"}, [])
    try:
        return _plan_open_slide(slide, row, settings)
    finally:
        slide.close()


def _plan_open_slide(slide: Slide, row: dict, settings: SlideSettings) -> SlidePlan:
    info = slide.info
    mpp, note = info.mpp, info.mpp_note
    if settings.mpp_override is not None:
        mpp, note = settings.mpp_override, "set by --mpp-override"
    row.update(
        width=info.width,
        height=info.height,
        levels=len(info.level_dimensions),
        level_downsamples=list(info.level_downsamples),
        vendor=info.vendor,
        mpp=mpp,
        mpp_note=note,
        bounds_x=info.bounds_x,
        bounds_y=info.bounds_y,
    )

    def refuse(status: str, error: str) -> SlidePlan:
        return SlidePlan({**row, "status": status, "error": error}, [])

    pixels = info.width * info.height
    if pixels > MAX_SLIDE_PIXELS:
        return refuse(
            "too_large", f"{info.width} x {info.height} px is more than any slide ({MAX_SLIDE_PIXELS:.0e} px)"
        )
    if not info.tiled and len(info.level_dimensions) == 1:
        if pixels <= settings.max_pixels:
            return SlidePlan(row, [], is_slide=False)
        return refuse(
            "too_large",
            f"not tiled and not pyramidal ({info.width} x {info.height} px, more than --max-pixels "
            f"{settings.max_pixels}): it cannot be read region by region",
        )
    coarsest = info.level_dimensions[-1]
    if settings.tissue == "auto" and max(coarsest) > THUMBNAIL_MAX_READ_SIDE:
        return refuse(
            "unsupported",
            f"no pyramid level small enough to find tissue on (coarsest {coarsest[0]} x {coarsest[1]} px); "
            "--tissue all reads every window",
        )
    downsample = 1.0
    if settings.mpp is None and settings.default_mpp is not None and mpp is not None:
        downsample = settings.default_mpp / mpp
    if settings.mpp is not None:
        if mpp is None:
            return refuse(
                "unsupported",
                f"--mpp {settings.mpp} asked but the slide's pixel size is unknown ({note}); "
                "--mpp-override sets it",
            )
        downsample = settings.mpp / mpp
    level = choose_level(info, downsample)
    grid = Grid(settings.tile_size, settings.tile_overlap, downsample, level)
    columns, rows = grid.shape(info.width, info.height)
    row.update(level=level, tile_downsample=grid.extent / grid.size, tiles_total=columns * rows)
    if settings.tissue == "all":
        scale = max(info.width, info.height) / 64  # a coarse all-tissue mask
        tissue = np.ones((math.ceil(info.height / scale), math.ceil(info.width / scale)), bool)
        mask, fraction = tissue, 1.0
    else:
        try:
            thumbnail, scale = slide.thumbnail
        except SlideError as exc:
            return refuse("unreadable", f"low-resolution level: {exc}")
        tissue = tissue_mask(thumbnail)
        fraction = float(tissue.mean())
        # Cores next to tissue hold the centroids of objects on the tissue's edge.
        reach = 2 * math.ceil(grid.margin / scale) + 3
        mask = cv2.dilate(tissue.astype(np.uint8), np.ones((reach, reach), np.uint8)).astype(bool)
    windows = grid.windows(info.width, info.height, touches_mask(mask, scale))
    if settings.preprocessing is not None and windows:
        try:
            intensity = slide_intensity(slide, tissue, scale, grid, settings.preprocessing)
        except (SlideError, PreprocessingError) as exc:
            return refuse("unsupported" if isinstance(exc, PreprocessingError) else "unreadable", str(exc))
        row.update(intensity_offset=intensity.offset, intensity_scale=intensity.scale)
    row.update(
        status="ok",
        error=None,
        tiles_planned=len(windows),
        tissue_fraction=fraction,
        tissue_area_mm2=fraction * pixels * mpp**2 / 1e6 if mpp is not None else None,
    )
    return SlidePlan(row, windows)
