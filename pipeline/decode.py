"""Read and decode one image into RGB uint8, or say precisely why not.

We read bytes and decode ourselves (Pillow) rather than use Ray Data's
``read_images``, which keeps one channel of multichannel TIFFs.

Conversion policy (documented in the README):

* orientation: EXIF orientation is applied (a rotated JPEG comes out upright);
* multi-page files (TIFF): the first page;
* grayscale and palette images are expanded to RGB; alpha is dropped; CMYK is
  converted to RGB;
* 16-bit and 32-bit integer images are scaled by their type's full range
  (value / 65535 for 16-bit) to 8 bits; float images are taken as [0, 1] and
  clipped.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from pipeline import storage


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


def _to_rgb8(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image)
        full_range = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) <= 65535 else 2**31 - 1
        gray = np.clip(array.astype(np.float64) / full_range, 0, 1)
        return np.repeat((gray * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.nan_to_num(np.asarray(image, np.float64)), 0, 1)
        return np.repeat((gray * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"GIF8", "GIF"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format named by the file's magic bytes (PNG, JPEG, TIFF, BMP, GIF, WEBP), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def decode_image(data: bytes, *, max_pixels: int) -> np.ndarray | DecodeError:
    """Decode image bytes to uint8 (H, W, 3) RGB, or a :class:`DecodeError`.

    The pixel count is checked against ``max_pixels`` from the header, before
    any pixel is decoded (decompression bombs never allocate).
    """
    try:
        with warnings.catch_warnings():
            # Our own header check below is the limit; Pillow's hard limit
            # (DecompressionBombError, about 179 MP) still applies above it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                return DecodeError("too_large", f"{width}x{height} px exceeds --max-pixels {max_pixels}")
            if width == 0 or height == 0:
                return DecodeError("unsupported", f"zero-sized image ({width}x{height})")
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb8(image)
    except Image.DecompressionBombError as exc:
        return DecodeError("too_large", one_line(exc))
    except Image.UnidentifiedImageError:
        sniffed = sniff_format(data)
        if sniffed:
            # The bytes say image, but the decoder cannot open it: a zero-sized
            # image, or a compression or layout Pillow does not support.
            return DecodeError(
                "unsupported", f"a {sniffed} file the decoder cannot open (zero-sized or unusual)"
            )
        return DecodeError("decode", "not a recognised image format")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return DecodeError("decode", one_line(exc))


def read_and_decode(uri: str, *, max_pixels: int) -> np.ndarray | DecodeError:
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
