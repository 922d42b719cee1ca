"""RoI poolers for single-feature-map detectors (``mnist-small``), fast on CPU.

torchvision's C++ ``roi_align`` backward on CPU is a single-threaded scatter loop; on
``mnist-small`` it took over half of a training step. RoIAlign is separable, though: every
sample's bilinear weight is a product of a row weight and a column weight, the out-of-map test
is per axis, and torchvision's average over a ``grid_h x grid_w`` sample grid is an average
over rows times one over columns. So for the K RoIs of one image, with (K, P, H) row weights
``A`` and (K, P, W) column weights ``B`` (P = output size),
``out[k, c, i, j] = sum_{y, x} A[k, i, y] * B[k, j, x] * feature[c, y, x]``: two dense matrix
products whose backward are matrix products too, multi-threaded by BLAS.
:func:`roi_align_matmul` gives torchvision's ``roi_align(..., aligned=False)`` up to float
rounding, forward and backward, several times faster on CPU (docs/speed.md).
Its output stays in the products' (P, P, C) layout per RoI (channels_last), which
:class:`ChannelsLastTwoMLPHead` reads without transposing it.

This module must stay TorchScript-compatible: no ``from __future__ import annotations``.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign, roi_pool

from coorddet.fp32_boxes import box_dtype


def _axis_weights(
    start: Tensor, end: Tensor, size: int, pooled: int, sampling_ratio: int, scale: float
) -> Tensor:
    """(K, pooled, size) RoIAlign weights along one axis, as torchvision's CPU kernel samples.

    ``start``/``end``: (K,) box edges in image pixels; ``scale``: feature cells per pixel.
    """
    roi_start = start * scale
    roi_length = (end * scale - roi_start).clamp(min=1.0)  # aligned=False, as torchvision
    bin_size = roi_length / pooled
    if sampling_ratio > 0:
        grid = torch.full_like(bin_size, float(sampling_ratio))
        samples = sampling_ratio
    else:  # adaptive: ceil(roi / output) samples per bin, per RoI
        grid = torch.ceil(bin_size)
        samples = int(grid.max().item()) if grid.numel() > 0 else 1
    sample = torch.arange(samples, device=start.device, dtype=start.dtype)
    bins = torch.arange(pooled, device=start.device, dtype=start.dtype)
    position = (
        roi_start[:, None, None]
        + bins[None, :, None] * bin_size[:, None, None]
        + (sample[None, None, :] + 0.5) * (bin_size / grid)[:, None, None]
    )  # (K, pooled, samples)
    used = (position >= -1.0) & (position <= size) & (sample[None, None, :] < grid[:, None, None])
    position = position.clamp(min=0.0)
    low = position.floor()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    position = torch.where(at_edge, low, position)
    high = torch.where(at_edge, low, low + 1)
    fraction = position - low
    share = used.to(position.dtype) / grid[:, None, None]  # averages the samples of a bin
    weights = torch.zeros(start.shape[0], pooled, size, dtype=start.dtype, device=start.device)
    weights.scatter_add_(2, low.long(), (1.0 - fraction) * share)
    weights.scatter_add_(2, high.long(), fraction * share)
    return weights


def roi_align_matmul(
    features: Tensor,
    boxes: list[Tensor],
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
) -> Tensor:
    """torchvision's ``roi_align(features, boxes, output_size, spatial_scale, sampling_ratio,
    aligned=False)`` as matrix products.

    Args:
        features: (N, C, H, W) feature map, any memory format (channels_last is read in place).
        boxes: N tensors (K_i, 4), xyxy in image pixels (no gradient flows to them).
        output_size: side P of the pooled output.
        spatial_scale: feature cells per image pixel (0.25 for stride 4).
        sampling_ratio: samples per bin side; <= 0 adapts to the RoI size as torchvision.

    Returns:
        (sum K_i, C, P, P) pooled features, RoIs in the order of ``boxes``, in channels_last
        memory format: the products leave each RoI as (P, P, C), and a transpose to (C, P, P)
        would copy every pooled value again (the largest tensor of an inference batch).
        :class:`ChannelsLastTwoMLPHead` reads that layout without a copy.
    """
    N, C, H, W = features.shape
    P = output_size
    counts: list[int] = [int(image_boxes.shape[0]) for image_boxes in boxes]
    total = sum(counts)
    if total == 0:
        return features.new_zeros((0, C, P, P)).contiguous(memory_format=torch.channels_last)
    # Positions in float32 at least (bf16 would round a box edge above 512 px by pixels); only
    # the bilinear weights, fractions in [0, 1], take the features' dtype. No gradient to boxes.
    all_boxes = torch.cat(boxes).detach().to(box_dtype(features.dtype))
    rows = _axis_weights(all_boxes[:, 1], all_boxes[:, 3], H, P, sampling_ratio, spatial_scale)
    columns = _axis_weights(all_boxes[:, 0], all_boxes[:, 2], W, P, sampling_ratio, spatial_scale)
    rows, columns = rows.to(features.dtype), columns.to(features.dtype)
    maps = features.permute(0, 2, 3, 1).reshape(N, H, W * C)  # (N, H, W*C)
    if torch.is_grad_enabled() and features.requires_grad:
        # Training: one product for the whole batch keeps autograd to a few nodes (faster
        # than a loop). Images with fewer RoIs are padded with all-zero
        # weights (training samples the same number per image, so rarely).
        K = max(counts)
        padded = total < N * K
        slots = torch.empty(0, dtype=torch.long)  # each real RoI's row among the N*K
        if padded:
            slots = torch.cat(
                [torch.arange(n, device=rows.device) + image * K for image, n in enumerate(counts)]
            )
            rows = rows.new_zeros((N * K, P, H)).index_copy(0, slots, rows)
            columns = columns.new_zeros((N * K, P, W)).index_copy(0, slots, columns)
        by_rows = torch.bmm(rows.reshape(N, K * P, H), maps).reshape(N * K, P, W, C)
        pooled = torch.matmul(columns[:, None], by_rows)  # (N*K, P, P, C)
        if padded:
            pooled = pooled[slots]
    else:
        # Inference: image by image, so each image's (K, P, W, C) intermediate stays in cache
        # (faster than one product over the batch), each written straight into the output
        # (concatenating the pieces would cost a large part of the batch's time).
        pooled = features.new_empty((total, P, P, C))
        start = 0
        for image in range(N):
            K = counts[image]
            by_rows = (rows[start : start + K].reshape(K * P, H) @ maps[image]).reshape(K, P, W, C)
            torch.matmul(columns[start : start + K, None], by_rows, out=pooled[start : start + K])
            start += K
    return pooled.permute(0, 3, 1, 2)


def _stride_scale(feature: Tensor, image_shapes: list[tuple[int, int]]) -> float:
    """Feature cells per image pixel, a power of 2, inferred as MultiScaleRoIAlign does."""
    height = 1
    for shape in image_shapes:
        height = max(height, shape[0])
    return 2.0 ** round(math.log(feature.shape[-2] / height) / math.log(2.0))


class MatmulRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` for one feature map, computed by :func:`roi_align_matmul`.

    Same constructor and forward as torchvision's (so ``FasterRCNN`` accepts it), same
    numbers; ``featmap_names`` must name exactly one map. ``forward(features, boxes,
    image_shapes)``: boxes (K_i, 4) xyxy pixels per image -> (sum K_i, C, P, P).
    """

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int) -> None:
        if len(featmap_names) != 1:
            raise ValueError(f"MatmulRoIAlign pools one feature map, got {featmap_names}")
        super().__init__(featmap_names, output_size, sampling_ratio)

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        feature = x[self.featmap_names[0]]
        scale = _stride_scale(feature, image_shapes)
        return roi_align_matmul(feature, boxes, self.output_size[0], scale, self.sampling_ratio)


class SingleMapRoIPool(nn.Module):
    """RoIPool (max over quantised bins) on one feature map, with ``MultiScaleRoIAlign``'s
    forward signature: boxes (K_i, 4) xyxy pixels per image -> (sum K_i, C, P, P)."""

    def __init__(self, featmap_name: str, output_size: int) -> None:
        super().__init__()
        self.featmap_name = featmap_name
        self.output_size = output_size

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        feature = x[self.featmap_name]
        scale = _stride_scale(feature, image_shapes)
        return roi_pool(feature, boxes, [self.output_size, self.output_size], scale)


class ChannelsLastTwoMLPHead(TwoMLPHead):
    """torchvision's ``TwoMLPHead`` (same ``fc6``/``fc7``, same checkpoint keys, same numbers)
    that reads channels_last RoI features, as :func:`roi_align_matmul` returns them, in place.

    ``forward``: (K, C, P, P) pooled features in any memory format -> (K, representation).
    ``TwoMLPHead`` flattens its input in (C, P, P) order, which for channels_last features
    copies the largest tensor of a batch (80 MB for 64 images of 100 RoIs) into another layout;
    here ``fc6``'s weight (0.8 M values for ``mnist-small``) is reordered to the features'
    (P, P, C) layout instead.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.dim() == 4
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            K, C, P, Q = x.shape
            weight = self.fc6.weight.reshape(-1, C, P, Q).permute(0, 2, 3, 1).reshape(-1, P * Q * C)
            x = F.linear(x.permute(0, 2, 3, 1).reshape(K, -1), weight, self.fc6.bias)
        else:
            x = self.fc6(x.flatten(start_dim=1))
        # In place: ReLU's backward needs only its output, and each saves a (K, 256) tensor.
        return F.relu(self.fc7(F.relu(x, inplace=True)), inplace=True)
