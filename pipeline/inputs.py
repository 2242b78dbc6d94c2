"""The one seam between a manifest row and pixels: a plain image file or a window of a slide.

:meth:`InputReader.read` turns any manifest row into a :class:`Input` (raw
pixels and, for a window, where it lies on its slide) or a
:class:`~pipeline.decode.DecodeError`. The worker never asks which kind a row
is; only :mod:`pipeline.windows` maps window coordinates to the slide.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.decode import DecodeError, RawImage, one_line, read_and_decode
from pipeline.slides import SlideCache, SlideError
from pipeline.windows import Window


@dataclass(frozen=True)
class Input:
    """What one manifest row gives: its raw pixels, and its window (None for a plain image).

    ``slide_size``: the slide's level-0 (width, height) for a window, else None.
    """

    raw: RawImage
    window: Window | None = None
    slide_size: tuple[int, int] | None = None


class InputReader:
    """Reads manifest rows of one replica; slides stay open between windows (at most ``open_slides``).

    Args:
        max_pixels: a plain image with more pixels is ``too_large`` (checked from its header).
        mpp_override: µm per level-0 pixel for every slide (``--mpp-override``), else each slide's own.
    """

    def __init__(self, *, max_pixels: int, mpp_override: float | None = None, open_slides: int = 4):
        self.max_pixels = max_pixels
        self.mpp_override = mpp_override
        self.slides = SlideCache(open_slides)

    def read(self, row: dict) -> Input | DecodeError:
        """The row's pixels (a window when ``row["level"]`` is set), or why they could not be read."""
        if row.get("level") is None:
            raw = read_and_decode(row["uri"], max_pixels=self.max_pixels)
            return raw if isinstance(raw, DecodeError) else Input(raw)
        window = Window.from_row(row)
        try:
            with self.slides.reading(row["uri"]) as slide:
                try:
                    pixels = slide.read_window(window)
                except SlideError as exc:
                    return DecodeError("decode", one_line(exc))
                info = slide.info
        except SlideError as exc:  # the slide could not be opened
            return DecodeError("unreadable", one_line(exc))
        mpp = self.mpp_override or info.mpp
        raw = RawImage(pixels, info.channels, mpp * window.downsample if mpp else None)
        return Input(raw, window, (info.width, info.height))

    def close(self) -> None:
        """Close every open slide."""
        self.slides.close()
