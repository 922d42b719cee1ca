"""The fast path behind :class:`coorddet.coordconv.CoordConv2d`: cached grids, one shared term.

What :mod:`coorddet.coordconv` computes, ``conv2d(cat([x, coords]), cat([weight,
coord_weight], 1))``, is done here in the cheaper form that gives the same sum:

- :func:`coordinate_grid` builds coordinate channels for a batch whose images may fill only
  part of the zero-padded map (their *extent*, as a fraction of the map: 1.0 is all of it);
- :func:`cached_grid` keeps one (1, C, H, W) grid per map size, extent, device and dtype, so
  a training run builds each grid once;
- :func:`coordinates` picks, for a layer and a batch, one shared grid (every image has the
  same extent, the usual case) or a grid per image;
- :func:`add_shared_term` adds a (1, C, H, W) coordinate term to the (N, C, H, W) output of
  the input's convolution in place, and backpropagates through a flat batch sum
  (:func:`batch_sum`), because torch's dim-0 reduction of a channels_last tensor is much
  slower (docs/speed.md).

This module must stay TorchScript-compatible: no ``from __future__ import annotations``.
"""

import torch
from torch import Tensor

from coorddet.device import to_device


def _axis(size: int, cells: Tensor) -> tuple[Tensor, Tensor]:
    """Coordinates of ``size`` cells for ``cells`` (N,) real cells: (N, size) values from
    -1 to 1 across the real cells, and (N, size) whether each cell is real (not padding)."""
    positions = torch.arange(size, device=cells.device, dtype=cells.dtype)
    span = (cells - 1.0).unsqueeze(1)  # (N, 1)
    # (2i - span) / span puts -1, 0 and 1 exactly on the first, middle and last real cells.
    coords = (2.0 * positions - span) / span.clamp(min=1.0)
    return torch.where(span > 0, coords, torch.zeros_like(coords)), positions < cells[:, None]


def coordinate_grid(height: int, width: int, extents: Tensor, with_r: bool) -> Tensor:
    """Coordinate channels for a batch of maps.

    Args:
        height, width: the map size ``H, W`` in cells.
        extents: (N, 2) each image's real ``(height, width)`` as a fraction of the map
            (``(1.0, 1.0)``: the whole map); any float dtype, on the result's device.
        with_r: append the radius channel.

    Returns:
        (N, 2 or 3, H, W) float32 tensor: channels ``x`` (varies along W), ``y`` (varies along
        H), then ``r`` with ``with_r``. Cells outside an image's extent (batch padding) are 0
        in every channel, as a convolution's zero padding would see them were the image alone.
    """
    return grid_of_cells(height, width, extent_cells(height, width, extents), with_r)


def extent_cells(height: int, width: int, extents: Tensor) -> Tensor:
    """(N, 2) float32 real cells per image for ``extents`` (N, 2) fractions of a ``height``
    x ``width`` map, computed where ``extents`` lies (as :func:`coordinate_grid` does)."""
    size = torch.tensor([[float(height), float(width)]], dtype=torch.float64)
    return (extents.to(torch.float64) * size.to(extents.device)).to(torch.float32)


def grid_of_cells(height: int, width: int, cells: Tensor, with_r: bool) -> Tensor:
    """:func:`coordinate_grid` for (N, 2) float32 real cells per image (rows, columns)."""
    n = cells.shape[0]
    y, real_rows = _axis(height, cells[:, 0])
    x, real_columns = _axis(width, cells[:, 1])
    y = y[:, :, None].expand(n, height, width)
    x = x[:, None, :].expand(n, height, width)
    channels = [x, y]
    if with_r:
        channels.append(torch.sqrt(x * x + y * y))
    grid = torch.stack(channels, dim=1)
    real = real_rows[:, :, None] & real_columns[:, None, :]  # (N, H, W)
    return torch.where(real[:, None], grid, torch.zeros_like(grid))


def cached_grid(
    cache: dict[str, Tensor],
    height: int,
    width: int,
    like: Tensor,
    with_r: bool,
    rows: float = 1.0,
    columns: float = 1.0,
) -> Tensor:
    """The (1, 2 or 3, height, width) grid for an extent of ``rows`` x ``columns`` (fractions
    of the map) on ``like``'s device and dtype, from ``cache`` or built and kept there."""
    key = f"{height}x{width}/{rows}x{columns}/{like.device}/{like.dtype}"
    cached = cache.get(key)
    if cached is not None:
        return cached
    extents = torch.tensor([[rows, columns]], dtype=torch.float64, device=like.device)
    if torch.jit.is_scripting():
        grid = coordinate_grid(height, width, extents, with_r).to(like.dtype)
    else:
        # A grid first built during validation under inference_mode must stay usable by
        # autograd when training resumes, so never cache an inference tensor.
        with torch.inference_mode(False):
            grid = coordinate_grid(height, width, extents, with_r).to(like.dtype)
    if len(cache) >= 32:  # bound the cache when shapes keep changing
        cache.clear()
    cache[key] = grid
    return grid


def coordinates(cache: dict[str, Tensor], image_extent: Tensor, x: Tensor, with_r: bool) -> Tensor:
    """Coordinate channels for ``x`` (N, C, H, W): (1, 2 or 3, H, W) when every image has the
    same extent (``image_extent`` (N, 2) fractions, or empty: the whole map), else (N, ...)."""
    N, C, H, W = x.shape
    if image_extent.numel() == 0:
        return cached_grid(cache, H, W, x, with_r, 1.0, 1.0)
    fractions: list[list[float]] = image_extent.tolist()
    if len(fractions) != N:
        raise RuntimeError(
            f"CoordConv2d: image_extent has {len(fractions)} rows for a batch of {N}"
        )
    first = fractions[0]
    uniform = True
    for row in fractions:
        uniform = uniform and row == first
    if uniform:
        return cached_grid(cache, H, W, x, with_r, first[0], first[1])
    # The (N, 2) cells are computed on the host and copied asynchronously: no host sync per
    # batch of mixed sizes on a GPU; the same numbers as coordinate_grid's on the CPU.
    cells = to_device(extent_cells(H, W, image_extent), x.device)
    return grid_of_cells(H, W, cells, with_r).to(x.dtype)


def batch_sum(grad: Tensor) -> Tensor:
    """``grad.sum(0, keepdim=True)``, summing over a flat view where the layout allows."""
    n, c, h, w = grad.shape
    if grad.is_contiguous(memory_format=torch.channels_last):
        flat = grad.permute(0, 2, 3, 1).reshape(n, -1).sum(0)
        return flat.view(1, h, w, c).permute(0, 3, 1, 2)
    if grad.is_contiguous():
        return grad.reshape(n, -1).sum(0).view(1, c, h, w)
    return grad.sum(0, keepdim=True)


class _AddSharedTerm(torch.autograd.Function):
    """``out += term``, in place, for a (1, C, H, W) ``term`` shared by the batch (N, C, H, W)."""

    @staticmethod
    def forward(ctx, out: Tensor, term: Tensor) -> Tensor:  # noqa: ANN001
        ctx.mark_dirty(out)
        return out.add_(term)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        return grad, batch_sum(grad)


@torch.jit.unused
def add_shared_term(out: Tensor, term: Tensor) -> Tensor:
    """``out + term`` computed in place in ``out``. Eager only: TorchScript cannot call an
    autograd.Function, so a scripted layer adds out of place instead."""
    return _AddSharedTerm.apply(out, term)
