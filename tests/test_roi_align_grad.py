"""The CPU backward of RoIAlign against torchvision's own kernel, and its registration while training."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from pipeline.roi_align_grad import faster_backward, roi_align_backward


def random_rois(count: int, batch_size: int, extent: float, generator: torch.Generator) -> torch.Tensor:
    """(count, 5) RoIs over an image of ``extent`` px: most inside, some across or beyond its edges,
    some under a pixel wide, and one exactly on the bottom-right corner."""
    corner = (torch.rand(count, 2, generator=generator) * 1.3 - 0.15) * extent
    size = torch.rand(count, 2, generator=generator) ** 2 * extent * 0.6
    size[: count // 8] = torch.rand(count // 8, 2, generator=generator) * 0.8
    boxes = torch.cat([corner, corner + size], dim=1)
    boxes[-1] = torch.tensor([extent - 4, extent - 4, extent, extent])
    batch = torch.randint(0, batch_size, (count, 1), generator=generator).float()
    return torch.cat([batch, boxes], dim=1)


def torchvision_grad(features, rois, output_size, scale, sampling_ratio, aligned, grad_output):
    features = features.detach().requires_grad_(True)
    pooled = roi_align(features, rois, output_size, scale, sampling_ratio, aligned)
    (grad,) = torch.autograd.grad(pooled, features, grad_output)
    return grad


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize(
    ("output_size", "scale", "sampling_ratio", "count"),
    [((7, 7), 0.25, 2, 300), ((14, 14), 0.125, 2, 80), ((5, 3), 0.5, 1, 50), ((4, 6), 0.25, 3, 40)],
)
def test_the_gradient_equals_torchvisions_kernel(output_size, scale, sampling_ratio, count, aligned):
    generator = torch.Generator().manual_seed(count)
    batch_size, channels, height, width = 3, 8, 23, 31
    features = torch.randn(batch_size, channels, height, width, generator=generator)
    rois = random_rois(count, batch_size, extent=max(height, width) / scale, generator=generator)
    grad_output = torch.randn(count, channels, *output_size, generator=generator)
    expected = torchvision_grad(features, rois, output_size, scale, sampling_ratio, aligned, grad_output)
    found = roi_align_backward(
        grad_output, rois, scale, *output_size, batch_size, channels, height, width, sampling_ratio, aligned
    )
    assert found.shape == expected.shape and found.dtype == expected.dtype
    assert expected.abs().sum() > 0
    torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-4)


def test_no_rois_give_a_zero_gradient_and_bad_input_is_an_error_not_a_crash():
    grad = roi_align_backward(torch.zeros(0, 4, 7, 7), torch.zeros(0, 5), 0.25, 7, 7, 2, 4, 9, 9, 2, False)
    assert grad.shape == (2, 4, 9, 9) and not grad.any()
    beyond_the_batch = torch.tensor([[5.0, 1.0, 1.0, 9.0, 9.0]])
    with pytest.raises(RuntimeError, match="size is inconsistent with indices"):
        roi_align_backward(torch.ones(1, 4, 7, 7), beyond_the_batch, 0.25, 7, 7, 2, 4, 9, 9, 2, False)
    with pytest.raises(NotImplementedError, match="adaptive"):
        roi_align_backward(torch.zeros(1, 4, 7, 7), torch.zeros(1, 5), 0.25, 7, 7, 2, 4, 9, 9, 0, False)


def test_the_kernel_serves_autograd_only_inside_the_block_and_only_for_fixed_grids():
    features = torch.randn(1, 2, 8, 8, requires_grad=True)
    rois = torch.tensor([[0.0, 1.0, 1.0, 20.0, 20.0]])

    def backward_with_adaptive_grid():
        roi_align(features, rois, (2, 2), 0.25, sampling_ratio=0).sum().backward()

    fixed = torch.nn.Sequential(MultiScaleRoIAlign(["0"], 7, sampling_ratio=2))
    with faster_backward(fixed) as active:
        assert active
        with pytest.raises(NotImplementedError):  # this module's kernel answered
            backward_with_adaptive_grid()
    backward_with_adaptive_grid()  # torchvision's kernel is back
    adaptive = torch.nn.Sequential(MultiScaleRoIAlign(["0"], 7, sampling_ratio=0))
    with faster_backward(adaptive) as active:
        assert not active
        backward_with_adaptive_grid()
    off_the_cpu = torch.nn.Sequential(MultiScaleRoIAlign(["0"], 7, sampling_ratio=2), torch.nn.Linear(2, 2))
    with faster_backward(off_the_cpu.to("meta")) as active:
        assert not active
        backward_with_adaptive_grid()


def test_an_op_with_other_arguments_keeps_torchvisions_kernel(monkeypatch):
    from pipeline import roi_align_grad

    def with_another_signature(grad, rois, spatial_scale, pooled_height, pooled_width):
        raise AssertionError("must not be registered")

    monkeypatch.setattr(roi_align_grad, "roi_align_backward", with_another_signature)
    fixed = torch.nn.Sequential(MultiScaleRoIAlign(["0"], 7, sampling_ratio=2))
    with faster_backward(fixed) as active:
        assert not active
