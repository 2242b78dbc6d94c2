"""Read and decode one image into its raw pixels (native bit depth, channels as stored), or say why not.

We read bytes and decode ourselves rather than use Ray Data's
``read_images``, which keeps one channel of multichannel TIFFs. The pixels
keep the file's own values: 8-bit stays uint8, 12- and 16-bit stay uint16,
floats stay float. Turning them into the model's input is the model card's
business (:mod:`pipeline.preprocess`); measurements use the raw values.

Conversion policy (documented in the README):

* TIFF (tifffile, with imagecodecs for compressed files): the first series;
  of a stack (time, z, ...) the first plane, all channels (``C`` and samples);
  OME-TIFF channel names are kept; integers and floats as stored (float64 to float32);
* 16-bit colour and grey-with-alpha PNG (imagecodecs; Pillow would keep only
  the high byte of each value): RGB as stored, grey+alpha as grey, alpha
  dropped, the eXIf chunk's orientation applied as Pillow applies it;
* other formats (Pillow): EXIF orientation applied (a rotated JPEG comes out
  upright); first frame; grey stays one channel (8- or 16-bit); palette and
  CMYK become RGB; alpha is dropped;
* the pixel count is checked against ``max_pixels`` from the header, before
  any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import imagecodecs
import numpy as np
import tifffile
from PIL import Image, ImageOps

from pipeline import storage
from pipeline.preprocess import default_channel_names

PLAUSIBLE_PIXEL_SIZE_UM = (0.01, 50.0)
"""A pixel size from file metadata outside this range (µm) is ignored (TIFF defaults, wrong units)."""
_UNIT_TO_UM = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "\\u00B5m": 1.0, "mm": 1e3, "cm": 1e4}


@dataclass(frozen=True)
class RawImage:
    """A decoded image.

    pixels: (H, W, C) in the file's own type; channel_names: length C;
    pixel_size_um: the file's own pixel size in µm (OME-TIFF PhysicalSizeX,
    ImageJ or centimetre TIFF resolution), None when it states none.
    """

    pixels: np.ndarray
    channel_names: tuple[str, ...]
    pixel_size_um: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.pixels.shape[0], self.pixels.shape[1]


@dataclass(frozen=True)
class DecodeError:
    """Why an image was not decoded: ``kind`` is an ``images.status`` value, ``message`` one line."""

    kind: str
    message: str


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An exception (or text) as one short line with credentials redacted."""
    text = str(exc) if not isinstance(exc, BaseException) else (str(exc) or type(exc).__name__)
    if isinstance(exc, BaseException) and type(exc).__name__ not in text:
        text = f"{type(exc).__name__}: {text}"
    text = " ".join(text.split())
    return storage.redact(text)[:limit]


def _pillow_pixels(image: Image.Image) -> RawImage:
    """Pixels of a Pillow image in its own bit depth; grey stays one channel, colour becomes RGB."""
    if image.mode in ("1", "L", "LA"):
        return RawImage(np.asarray(image.convert("L"))[..., None], ("gray",))
    if image.mode.startswith("I;16"):
        return RawImage(np.asarray(image).astype(np.uint16)[..., None], ("gray",))
    if image.mode == "I":
        values = np.asarray(image)
        if values.min(initial=0) >= 0 and values.max(initial=0) <= 65535:
            return RawImage(values.astype(np.uint16)[..., None], ("gray",))
        return RawImage(values.astype(np.float32)[..., None], ("gray",))
    if image.mode == "F":
        return RawImage(np.asarray(image, np.float32)[..., None], ("gray",))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return RawImage(np.asarray(image), default_channel_names(3, rgb=True))


def ome_channel_names(tif: tifffile.TiffFile, count: int) -> tuple[str, ...] | None:
    """Channel names from OME-XML when it names exactly ``count`` channels, else None."""
    if not tif.is_ome:
        return None
    try:
        image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
        image = image[0] if isinstance(image, list) else image
        channels = image["Pixels"]["Channel"]
    except (KeyError, TypeError, ValueError):
        return None
    channels = channels if isinstance(channels, list) else [channels]
    names = tuple(str(c.get("Name") or f"c{i}") for i, c in enumerate(channels))
    return names if len(names) == count else None


def _plausible(pixel_size_um: float | None) -> float | None:
    low, high = PLAUSIBLE_PIXEL_SIZE_UM
    return pixel_size_um if pixel_size_um is not None and low <= pixel_size_um <= high else None


def tiff_pixel_size_um(tif: tifffile.TiffFile) -> float | None:
    """Pixel size (µm) from OME PhysicalSizeX, ImageJ's unit and resolution, or a centimetre resolution."""
    if tif.is_ome:
        try:
            image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
            pixels = (image[0] if isinstance(image, list) else image)["Pixels"]
            size = float(pixels["PhysicalSizeX"])
            return _plausible(
                size * _UNIT_TO_UM.get(str(pixels.get("PhysicalSizeXUnit", "µm")), float("nan"))
            )
        except (KeyError, TypeError, ValueError):
            pass
    tags = tif.pages.first.tags
    if "XResolution" not in tags:
        return None
    numerator, denominator = tags["XResolution"].value
    if not numerator:
        return None
    per_pixel = denominator / numerator  # units per pixel
    unit = (tif.imagej_metadata or {}).get("unit") if tif.is_imagej else None
    if unit in _UNIT_TO_UM:
        return _plausible(per_pixel * _UNIT_TO_UM[unit])
    if "ResolutionUnit" in tags and tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER:
        return _plausible(per_pixel * 1e4)
    return None


def _size_error(width: int, height: int, max_pixels: int, *, empty: bool = False) -> DecodeError | None:
    """Why an image of this size (from its header, before any pixel is decoded) is not decoded:
    more than ``max_pixels`` pixels, or none (``empty``: another axis of the file has length 0);
    None when its size is fine."""
    if width * height > max_pixels:
        return DecodeError("too_large", f"{width}x{height} px exceeds --max-pixels {max_pixels}")
    if width == 0 or height == 0 or empty:
        return DecodeError("unsupported", f"zero-sized image ({width}x{height})")
    return None


def _tiff_pixels(data: bytes, max_pixels: int) -> RawImage | DecodeError:
    """First plane (all channels) of the first series of a TIFF."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        if not tif.series:
            return DecodeError("unsupported", "a TIFF file with no image series")
        series = tif.series[0]
        axes, shape = series.axes, series.shape
        sizes = dict(zip(axes, shape, strict=True))
        height, width = sizes.get("Y", 0), sizes.get("X", 0)
        if error := _size_error(width, height, max_pixels, empty=0 in shape):
            return error
        # Pages hold the planes of the leading axes in C order: keep every channel, the first of the rest.
        page_axes = [a for a in axes if a not in "YXS"]
        page_shape = [sizes[a] for a in page_axes]
        keep = [np.arange(sizes[a]) if a == "C" else np.zeros(1, int) for a in page_axes]
        grid = np.meshgrid(*keep, indexing="ij") if keep else []
        pages = np.ravel_multi_index([g.ravel() for g in grid], page_shape) if keep else np.zeros(1, int)
        planes = tif.asarray(key=[int(p) for p in pages], series=0) if keep else series.asarray()
        planes = planes.reshape(len(pages), *[sizes[a] for a in axes if a in "YXS"])
        inner = [a for a in axes if a in "YXS"]
        # Samples per pixel (contiguous YXS or planar SYX) become the last axis.
        planes = np.moveaxis(planes, 1 + inner.index("S"), -1) if "S" in inner else planes[..., None]
        pixels = np.moveaxis(planes, 0, 2).reshape(height, width, -1)
        photometric = tif.pages.first.photometric
        rgb = photometric == tifffile.PHOTOMETRIC.RGB and pixels.shape[2] in (3, 4)
        if rgb and pixels.shape[2] == 4:
            pixels = pixels[..., :3]  # alpha
        if pixels.dtype == np.float64:
            pixels = pixels.astype(np.float32)
        elif pixels.dtype == bool:
            pixels = pixels.astype(np.uint8) * 255
        names = ome_channel_names(tif, pixels.shape[2]) or default_channel_names(pixels.shape[2], rgb=rgb)
        return RawImage(np.ascontiguousarray(pixels), names, tiff_pixel_size_um(tif))


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"GIF8", "GIF"),
)


PNG_COLOUR_TYPES_PILLOW_TRUNCATES = frozenset({2, 4, 6})
"""PNG colour types (RGB, grey+alpha, RGBA) that Pillow decodes to 8 bits when the file stores 16 bits
per sample (its 16-bit grey, type 0, it reads whole)."""


def _png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk, None if it has none."""
    if len(data) < 26 or data[12:16] != b"IHDR":
        return None
    return (
        int.from_bytes(data[16:20], "big"),
        int.from_bytes(data[20:24], "big"),
        data[24],
        data[25],
    )


EXIF_ORIENTATION_TAG = 0x0112
_UPRIGHT = {
    2: lambda p: p[:, ::-1],
    3: lambda p: p[::-1, ::-1],
    4: lambda p: p[::-1],
    5: lambda p: p.swapaxes(0, 1),
    6: lambda p: np.rot90(p, -1),
    7: lambda p: np.rot90(p, 2).swapaxes(0, 1),
    8: lambda p: np.rot90(p, 1),
}
"""EXIF orientation -> the turn that makes (H, W, C) pixels upright (Pillow's ``exif_transpose``)."""


def _png_exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) in a PNG's eXIf chunk; 1 (as stored) without one or if unreadable."""
    offset = 8
    while offset + 8 <= len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        kind = data[offset + 4 : offset + 8]
        if kind == b"eXIf":
            exif = Image.Exif()
            try:
                exif.load(data[offset + 8 : offset + 8 + length])
            except (SyntaxError, ValueError, OSError):
                return 1
            return int(exif.get(EXIF_ORIENTATION_TAG, 1))
        if kind == b"IEND":
            break
        offset += 12 + length
    return 1


def _png16_pixels(data: bytes, max_pixels: int) -> RawImage | DecodeError | None:
    """A 16-bit colour or grey+alpha PNG decoded at full depth, or None for every other PNG.

    Pillow reads these as 8-bit images (the high byte of each value); a
    microscope's 16-bit RGB export would lose its low byte.
    """
    header = _png_header(data)
    if header is None or header[2] != 16 or header[3] not in PNG_COLOUR_TYPES_PILLOW_TRUNCATES:
        return None
    width, height, _, colour_type = header
    if error := _size_error(width, height, max_pixels):
        return error
    try:
        pixels = imagecodecs.png_decode(data)
    except imagecodecs.PngError as exc:
        return DecodeError("decode", one_line(exc))
    if upright := _UPRIGHT.get(_png_exif_orientation(data)):
        pixels = upright(pixels)
    if colour_type == 4:
        return RawImage(np.ascontiguousarray(pixels[..., :1]), ("gray",))
    return RawImage(np.ascontiguousarray(pixels[..., :3]), default_channel_names(3, rgb=True))


def sniff_format(data: bytes) -> str | None:
    """The image format named by the file's magic bytes (PNG, JPEG, TIFF, BMP, GIF, WEBP), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def decode_image(data: bytes, *, max_pixels: int) -> RawImage | DecodeError:
    """Decode image bytes to a :class:`RawImage` (native bit depth), or a :class:`DecodeError`.

    The pixel count is checked against ``max_pixels`` from the header, before
    any pixel is decoded (decompression bombs never allocate).
    """
    kind = sniff_format(data)
    if kind == "TIFF":
        try:
            return _tiff_pixels(data, max_pixels)
        except tifffile.TiffFileError as exc:
            return DecodeError("decode", one_line(exc))
        except (ValueError, NotImplementedError) as exc:
            # Codecs tifffile lacks, layouts it cannot map to an image.
            return DecodeError("unsupported", one_line(exc))
        except (OSError, EOFError, IndexError, KeyError) as exc:
            return DecodeError("decode", one_line(exc))
    if kind == "PNG" and (png16 := _png16_pixels(data, max_pixels)) is not None:
        return png16
    try:
        with warnings.catch_warnings():
            # Our own header check below is the limit; Pillow's hard limit
            # (DecompressionBombError, about 179 MP) still applies above it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if error := _size_error(*image.size, max_pixels):
                return error
            image.load()
            image = ImageOps.exif_transpose(image)
            return _pillow_pixels(image)
    except Image.DecompressionBombError as exc:
        return DecodeError("too_large", one_line(exc))
    except Image.UnidentifiedImageError:
        if kind:
            # The bytes say image, but the decoder cannot open it: a zero-sized
            # image, or a compression or layout Pillow does not support.
            return DecodeError(
                "unsupported", f"a {kind} file the decoder cannot open (zero-sized or unusual)"
            )
        return DecodeError("decode", "not a recognised image format")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return DecodeError("decode", one_line(exc))


def read_and_decode(uri: str, *, max_pixels: int) -> RawImage | DecodeError:
    """Read ``uri`` and decode it; a bad image becomes a ``DecodeError``, never an exception.

    A missing or forbidden object is the image's own fault (``unreadable``).
    Other storage errors (connection refused, throttling) are retried with
    backoff and then raised: an outage fails the shard attempt, which is
    retried and, at worst, left for ``--resume``, instead of committing
    images as unreadable.
    """
    try:
        data = storage.retry_transient(lambda: storage.read_bytes(uri), attempts=4, base_delay_s=0.5)
    except (*storage.PERMANENT_ERRORS, storage.UnsafeURIError) as exc:
        return DecodeError("unreadable", one_line(exc))
    return decode_image(data, max_pixels=max_pixels)
