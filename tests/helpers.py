"""Small helpers shared by tests."""

from __future__ import annotations

import torch

from pipeline.decode import RawImage, read_and_decode
from pipeline.preprocess import Preprocessing, model_input


def prepared_tensor(uri: str, preprocessing: Preprocessing) -> torch.Tensor:
    """The image at ``uri`` as the model sees it: float (3, H, W), via the card's preprocessing."""
    raw = read_and_decode(uri, max_pixels=10**8)
    assert isinstance(raw, RawImage), raw
    prepared = model_input(raw.pixels, preprocessing, channel_names=raw.channel_names)
    return torch.from_numpy(prepared).expand(3, -1, -1)
