"""A faster CPU kernel for the backward pass of torchvision's RoIAlign, used while training on CPU.

torchvision's CPU kernel for ``torchvision::_roi_align_backward`` adds each
sampling point's gradient into the feature map one channel at a time, on one
thread: a third of a training step of the bundled architecture on a
2-core machine (BENCHMARKS.md, "Training"). Here the same arithmetic is one
sparse matrix product: a (pixel, output bin) matrix holding the bilinear
weights of each bin's sampling points at their four neighbouring pixels,
times the output gradient (bins x channels), which PyTorch's sparse kernel
runs vectorised. The gradient equals torchvision's to float rounding
(``tests/test_roi_align_grad.py`` compares the two kernels).

:func:`faster_backward` registers it for the CPU dispatch key while a
training run lasts and removes it after, so torchvision's own kernel serves
every other caller. It covers fixed sampling grids (``sampling_ratio > 0``,
what every architecture of :mod:`pipeline.model` uses); a model with an
adaptive grid, or a torchvision whose op takes other arguments, keeps
torchvision's kernel.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torchvision.ops import MultiScaleRoIAlign


def _sample_axis(
    start: torch.Tensor, bin_size: torch.Tensor, pooled: int, grid: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbouring pixel indices and bilinear weights along one axis of every RoI's sampling points.

    ``start``, ``bin_size``: (K,) in feature-map pixels. Returns ``index`` int64 and ``weight``
    (K, pooled, grid, 2): the lower and upper neighbour of each point and its weight, zero for a
    point more than a pixel outside the map (torchvision's ``bilinear_interpolate_gradient``).
    """
    bins = torch.arange(pooled, dtype=start.dtype)[None, :, None]
    within = (torch.arange(grid, dtype=start.dtype)[None, None, :] + 0.5) / grid
    point = start[:, None, None] + (bins + within) * bin_size[:, None, None]
    inside = (point >= -1.0) & (point <= size)
    point = point.clamp(min=0)
    low = point.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, low, low + 1)
    upper_weight = torch.where(at_edge, 0.0, point - low)
    weight = torch.stack([1 - upper_weight, upper_weight], dim=-1) * inside[..., None]
    return torch.stack([low, high], dim=-1), weight


def roi_align_backward(
    grad: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    batch_size: int,
    channels: int,
    height: int,
    width: int,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """The gradient of RoIAlign's input: torchvision's ``_roi_align_backward``, same arguments.

    ``grad``: (K, channels, pooled_height, pooled_width); ``rois``: (K, 5) rows of ``(batch index,
    x1, y1, x2, y2)`` in input-image pixels, scaled by ``spatial_scale`` to the feature map. Returns
    (batch_size, channels, height, width) in ``grad``'s dtype.
    """
    if sampling_ratio <= 0:
        raise NotImplementedError("adaptive sampling grids (sampling_ratio <= 0) are not covered")
    dtype = grad.dtype
    grad, rois = grad.float(), rois.float()
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * spatial_scale - offset, rois[:, 2] * spatial_scale - offset
    roi_width = rois[:, 3] * spatial_scale - offset - x1
    roi_height = rois[:, 4] * spatial_scale - offset - y1
    if not aligned:
        roi_width, roi_height = roi_width.clamp(min=1.0), roi_height.clamp(min=1.0)
    rows, row_weight = _sample_axis(y1, roi_height / pooled_height, pooled_height, sampling_ratio, height)
    cols, col_weight = _sample_axis(x1, roi_width / pooled_width, pooled_width, sampling_ratio, width)
    # Dimensions: (K, bin row, bin column, grid row, grid column, neighbour row, neighbour column).
    first_pixel = rois[:, 0].long() * (height * width)
    pixel = (
        first_pixel[:, None, None, None, None, None, None]
        + rows[:, :, None, :, None, :, None] * width
        + cols[:, None, :, None, :, None, :]
    )
    weight = row_weight[:, :, None, :, None, :, None] * col_weight[:, None, :, None, :, None, :]
    weight = weight / (sampling_ratio * sampling_ratio)
    bins = rois.shape[0] * pooled_height * pooled_width
    per_bin = 4 * sampling_ratio * sampling_ratio
    bin_index = torch.arange(bins).repeat_interleave(per_bin)
    # Uncoalesced: entries for the same (pixel, bin) are summed, as the scatter would add them.
    pixel_by_bin = torch.sparse_coo_tensor(
        torch.stack([pixel.reshape(-1), bin_index]),
        weight.reshape(-1),
        size=(batch_size * height * width, bins),
        check_invariants=True,
    )
    grad_by_bin = grad.permute(0, 2, 3, 1).reshape(bins, channels)
    grad_by_pixel = torch.sparse.mm(pixel_by_bin, grad_by_bin)
    grad_input = grad_by_pixel.reshape(batch_size, height, width, channels).permute(0, 3, 1, 2)
    return grad_input.contiguous().to(dtype)


def _fixed_grids(model: nn.Module) -> bool:
    poolers = [m for m in model.modules() if isinstance(m, MultiScaleRoIAlign)]
    return all(pooler.sampling_ratio > 0 for pooler in poolers)


def _on_cpu(model: nn.Module) -> bool:
    return all(parameter.device.type == "cpu" for parameter in model.parameters())


def _same_arguments() -> bool:
    """Whether this torchvision's op takes the arguments :func:`roi_align_backward` does."""
    schema = torch.ops.torchvision._roi_align_backward.default._schema
    return [argument.name for argument in schema.arguments] == list(
        inspect.signature(roi_align_backward).parameters
    )


@contextmanager
def faster_backward(model: nn.Module) -> Iterator[bool]:
    """While the block runs, :func:`roi_align_backward` serves torchvision's backward of RoIAlign on
    CPU tensors, when ``model`` is on the CPU (on CUDA torchvision's kernel serves, nothing is
    registered), every RoIAlign of it has a fixed sampling grid and torchvision's op takes the same
    arguments; yields whether it does. torchvision's CPU kernel is back when the block ends."""
    if not (_on_cpu(model) and _fixed_grids(model) and _same_arguments()):
        yield False
        return
    library = torch.library.Library("torchvision", "IMPL")
    library.impl("_roi_align_backward", roi_align_backward, "CPU")
    try:
        yield True
    finally:
        del library  # its finaliser removes the registration
