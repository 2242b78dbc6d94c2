"""Raw pixels (as decoded, native bit depth) -> the model's input. Preprocessing is part of the model.

One function, :func:`model_input`, turns what :mod:`pipeline.decode` returns
into what the network sees. Training (:mod:`pipeline.train`), evaluation and
inference (:mod:`pipeline.worker`) all call it with the
:class:`Preprocessing` stored in the model card, so a model never sees at
inference time anything prepared differently from what it was trained on.
Measurements (areas, intensities) use the raw pixels, never this output.

Two steps:

1. **Channel.** ``"rgb"``: the image's colour channels as stored (grey
   expanded to three, extra channels beyond three ignored); ``"max"``: the
   per-pixel maximum over the channels (a one-stain fluorescence image saved
   grey, or tinted blue, or as RGB, gives the same input); an integer: that
   channel; another string: the channel of that name (``red``, ``green``,
   ``blue``, ``gray``, ``c0``..., or an OME channel name).
2. **Normalisation.** ``"range"``: value / the type's full range (uint8 / 255,
   16-bit / 65535), floats clipped to [0, 1], through 8 bits (the behaviour
   of checkpoints written before preprocessing was part of the card);
   ``"percentile"``: ``(value - p_low) / scale`` clipped to [0, 1], with
   ``scale = max(p_high - p_low, floor_snr * noise)``. The percentiles (1 and
   99.8 by default, the StarDist / Cellpose convention) make 8-bit, 12-bit
   and 16-bit images alike; the floor (``noise`` is the image's pixel noise,
   estimated from neighbour differences, at least one grey level for integer
   types) keeps a background-only tile from being stretched until its noise
   looks like nuclei.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

RGB_NAMES = ("red", "green", "blue")
PERCENTILE_SAMPLE_PIXELS = 512 * 512
"""Percentiles and noise are computed on at most about this many pixels (a regular grid subsample)."""
MAD_TO_SIGMA = 1 / (0.6744897501960817 * math.sqrt(2))
"""Gaussian noise sigma per unit of median |a - b| of two independent neighbouring pixels."""


class PreprocessingError(ValueError):
    """A channel that the image does not have, or a preprocessing entry that makes no sense."""


@dataclass(frozen=True)
class Preprocessing:
    """How raw pixels become the model's input (see the module docstring).

    Attributes:
        channel: ``"rgb"``, ``"max"``, a channel index, or a channel name.
        normalize: ``"percentile"`` or ``"range"``.
        low, high: percentiles (0-100) of the image that map to 0 and 1.
        floor_snr: the smallest ``scale`` allowed, in units of the image's
            pixel noise (percentile mode only).
        note: free text carried in the card (where this entry came from).
    """

    channel: str | int = "max"
    normalize: str = "percentile"
    low: float = 1.0
    high: float = 99.8
    floor_snr: float = 20.0
    note: str = ""

    def __post_init__(self):
        if self.normalize not in ("percentile", "range"):
            raise PreprocessingError(f"normalize must be 'percentile' or 'range', got {self.normalize!r}")
        if not 0 <= self.low < self.high <= 100:
            raise PreprocessingError(f"need 0 <= low < high <= 100, got low {self.low}, high {self.high}")
        if self.floor_snr < 0:
            raise PreprocessingError(f"floor_snr must be >= 0, got {self.floor_snr}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise PreprocessingError(f"preprocessing has unknown keys {sorted(unknown)}")
        return cls(**data)

    @property
    def input_channels(self) -> int:
        """Channels of :func:`model_input`'s output: 3 for ``"rgb"``, else 1 (the model replicates it)."""
        return 3 if self.channel == "rgb" else 1


LEGACY = Preprocessing(
    channel="rgb",
    normalize="range",
    note="checkpoint written without a preprocessing entry: RGB as stored, scaled by the type's range "
    "through 8 bits (segpipe 0.1 behaviour)",
)
"""What checkpoints without a preprocessing entry get: exactly the pipeline's behaviour before it had one."""

DEFAULT = Preprocessing()
"""New models: per-pixel maximum over channels, percentiles 1 / 99.8 with a noise floor of 20 sigma."""


def with_channel(preprocessing: Preprocessing, channel: str | int | None) -> Preprocessing:
    """``preprocessing`` with its channel replaced (``--channel``); None keeps the card's."""
    if channel is None:
        return preprocessing
    return Preprocessing(**{**preprocessing.to_dict(), "channel": parse_channel(channel)})


def parse_channel(text: str | int) -> str | int:
    """A ``--channel`` value: an integer index when it is all digits, else a name (or rgb / max)."""
    if isinstance(text, int):
        return text
    return int(text) if text.strip().isdigit() else text.strip()


def default_channel_names(count: int, *, rgb: bool) -> tuple[str, ...]:
    """Names of ``count`` channels without names in the file: red/green/blue, gray, or c0, c1, ..."""
    if rgb and count in (3, 4):
        return RGB_NAMES
    if count == 1:
        return ("gray",)
    return tuple(f"c{i}" for i in range(count))


def select_channels(pixels: np.ndarray, channel: str | int, names: tuple[str, ...] = ()) -> np.ndarray:
    """The channel(s) the model sees, raw values: (H, W, 3) for ``"rgb"``, else (H, W).

    Args:
        pixels: (H, W, C) raw image, any numeric dtype.
        channel: see :class:`Preprocessing`.
        names: the image's channel names (length C); empty means the default names.

    Raises:
        PreprocessingError: the channel index or name does not exist in this image.
    """
    if pixels.ndim != 3:
        raise PreprocessingError(f"expected pixels (H, W, C), got shape {pixels.shape}")
    count = pixels.shape[2]
    if channel == "rgb":
        if count >= 3:
            return pixels[..., :3]
        return np.repeat(pixels[..., :1], 3, axis=2)
    if channel == "max":
        return pixels.max(axis=2) if count > 1 else pixels[..., 0]
    names = names or default_channel_names(count, rgb=count == 3)
    if isinstance(channel, int):
        index = channel
    elif channel in names:
        index = names.index(channel)
    else:
        raise PreprocessingError(f"no channel named {channel!r}; this image has {list(names)}")
    if not 0 <= index < count:
        raise PreprocessingError(f"channel index {index} out of range: this image has {count} channel(s)")
    return pixels[..., index]


def _sample(values: np.ndarray) -> np.ndarray:
    """``values`` (H, W[, 3]) subsampled on a regular grid to about PERCENTILE_SAMPLE_PIXELS pixels."""
    step = max(1, math.ceil(math.sqrt(values.shape[0] * values.shape[1] / PERCENTILE_SAMPLE_PIXELS)))
    return values[::step, ::step]


def noise_sigma(values: np.ndarray, where: np.ndarray | None = None) -> float:
    """Pixel noise of an image (H, W[, C]), from the median absolute difference of horizontal neighbours.

    Robust to the objects in the image (their edges are a minority of pixel
    pairs). For integer types it is at least one grey level, so a perfectly
    flat image still gets a finite floor. ``where`` (bool, H x W): only pairs
    of neighbours both inside it count (e.g. the background); none left gives
    the floor.
    """
    # Whole rows at a stride: neighbours stay adjacent in the original image.
    row_step = max(1, math.ceil(values.shape[0] * values.shape[1] / PERCENTILE_SAMPLE_PIXELS))
    rows = values[::row_step]
    rows = rows.astype(np.float32)
    differences = np.abs(rows[:, 1:] - rows[:, :-1])
    if where is not None:
        kept = where[::row_step]
        differences = differences[kept[:, 1:] & kept[:, :-1]]
    sigma = float(np.median(differences)) * MAD_TO_SIGMA if differences.size else 0.0
    quantum = 1.0 if np.issubdtype(values.dtype, np.integer) else 0.0
    return max(sigma, quantum)


@dataclass(frozen=True)
class Intensity:
    """The linear map of :func:`model_input`: ``(value - offset) / scale``, then clipped to [0, 1]."""

    offset: float
    scale: float


def intensity_map(values: np.ndarray, preprocessing: Preprocessing) -> Intensity:
    """The offset and scale that ``preprocessing`` gives these raw values (H, W[, 3]).

    For whole slides the caller computes this once per slide (on a low-resolution
    level) and passes it to :func:`model_input` for every tile.
    """
    if preprocessing.normalize == "range":
        return Intensity(0.0, _type_range(values))
    sample = _sample(values).astype(np.float32, copy=False)
    low, high = np.percentile(sample, (preprocessing.low, preprocessing.high))
    floor = preprocessing.floor_snr * noise_sigma(values)
    scale = max(float(high - low), floor, np.finfo(np.float32).tiny)
    return Intensity(float(low), scale)


def _type_range(values: np.ndarray) -> float:
    """Full range of the type as the pre-card pipeline used it: 255, 65535, 2**31 - 1 or 1 (floats)."""
    if values.dtype == np.uint8:
        return 255.0
    if np.issubdtype(values.dtype, np.floating):
        return 1.0
    if values.dtype.itemsize <= 2 or values.max(initial=0) <= 65535:
        return 65535.0
    return float(2**31 - 1)


def model_input(
    pixels: np.ndarray,
    preprocessing: Preprocessing,
    *,
    channel_names: tuple[str, ...] = (),
    intensity: Intensity | None = None,
) -> np.ndarray:
    """The model's input for one raw image: float32 (C, H, W) in [0, 1], C = ``input_channels`` (1 or 3).

    Args:
        pixels: (H, W, C) raw pixels as decoded (uint8, uint16, float32, ...).
        preprocessing: the model card's entry (possibly with ``--channel`` applied).
        channel_names: the image's channel names (see :func:`select_channels`).
        intensity: a precomputed map (per slide); None computes it from this image.

    A one-channel output is meant to be replicated to the network's three
    input channels (on the device, without a copy).
    """
    values = select_channels(pixels, preprocessing.channel, channel_names)
    intensity = intensity or intensity_map(values, preprocessing)
    if preprocessing.normalize == "range":
        if values.dtype == np.uint8:
            eight_bit = values
        else:
            unit = np.clip(np.nan_to_num(values.astype(np.float64)) / intensity.scale, 0, 1)
            eight_bit = (unit * 255 + 0.5).astype(np.uint8)
        out = eight_bit.astype(np.float32) / np.float32(255)
    else:
        out = values.astype(np.float32)
        out -= np.float32(intensity.offset)
        out /= np.float32(intensity.scale)
        np.clip(np.nan_to_num(out, copy=False), 0, 1, out=out)
    return out[None] if out.ndim == 2 else np.ascontiguousarray(out.transpose(2, 0, 1))
