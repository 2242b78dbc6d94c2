"""A corpus of odd and broken image files, each with the status and size the pipeline must give it."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

HUGE_SIDE = 400
"""Side of the image that exceeds :data:`MAX_PIXELS` (its header is read, its pixels never)."""
MAX_PIXELS = 300 * 300


@dataclass(frozen=True)
class Expected:
    """What ``images/`` must say about one file: status and, for ok images, (height, width)."""

    status: str
    size: tuple[int, int] | None = None


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode).save(out, format="PNG")
    return out.getvalue()


def exif_rotated_jpeg() -> bytes:
    """Stored 40 wide x 20 high with a red left half; EXIF orientation 6 (display rotated 90° clockwise)."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95, exif=exif)
    return out.getvalue()


def write_corpus(root: Path) -> dict[str, Expected]:
    """Write the odd files under ``root/odd/`` and return expectations by path relative to ``root``."""
    odd = root / "odd"
    (odd / "folder.png").mkdir(parents=True)  # a directory named like an image: never listed
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (24, 32, 3), np.uint8)
    files: dict[str, tuple[bytes, Expected]] = {}

    files["gray.png"] = (_png(rgb[..., 0]), Expected("ok", (24, 32)))
    palette = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(palette, format="PNG")
    files["palette.png"] = (palette.getvalue(), Expected("ok", (24, 32)))
    rgba = np.dstack([rgb, np.full((24, 32), 128, np.uint8)])
    files["rgba.png"] = (_png(rgba), Expected("ok", (24, 32)))
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, format="JPEG")
    files["cmyk.jpg"] = (cmyk.getvalue(), Expected("ok", (24, 32)))
    files["rotated.jpeg"] = (exif_rotated_jpeg(), Expected("ok", (40, 20)))
    gray16 = io.BytesIO()
    tifffile.imwrite(gray16, np.full((16, 16), 65535, np.uint16))
    files["gray16.tif"] = (gray16.getvalue(), Expected("ok", (16, 16)))
    rgb16 = io.BytesIO()
    tifffile.imwrite(rgb16, np.full((16, 16, 3), 32768, np.uint16), photometric="rgb")
    files["rgb16.tiff"] = (rgb16.getvalue(), Expected("ok", (16, 16)))
    float32 = io.BytesIO()
    tifffile.imwrite(float32, np.full((16, 16), 0.5, np.float32))
    files["float.tif"] = (float32.getvalue(), Expected("ok", (16, 16)))
    pages = io.BytesIO()
    with tifffile.TiffWriter(pages) as tif:
        tif.write(np.zeros((12, 18), np.uint8))
        tif.write(np.zeros((30, 30), np.uint8))
    files["pages.tif"] = (pages.getvalue(), Expected("ok", (12, 18)))
    webp = io.BytesIO()
    Image.fromarray(rgb).save(webp, format="WEBP")
    files["image.webp"] = (webp.getvalue(), Expected("ok", (24, 32)))
    files["UPPER.PNG"] = (_png(rgb), Expected("ok", (24, 32)))
    files["empty.png"] = (b"", Expected("decode"))
    files["noise.png"] = (rng.integers(0, 256, 2048, np.uint8).tobytes(), Expected("decode"))
    files["page.jpg"] = (b"<!doctype html><html><body>Not found</body></html>", Expected("decode"))
    files["truncated.png"] = (_png(rgb)[:100], Expected("decode"))
    zero = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "writing zero-size array": the point
        tifffile.imwrite(zero, np.zeros((0, 5), np.uint8))
    files["zero.tif"] = (zero.getvalue(), Expected("unsupported"))
    files["huge.png"] = (_png(np.zeros((HUGE_SIDE, HUGE_SIDE), np.uint8)), Expected("too_large"))

    for name, (data, _) in files.items():
        (odd / name).write_bytes(data)
    return {f"odd/{name}": expected for name, (_, expected) in files.items()}
