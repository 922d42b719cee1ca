"""CoordConv: convolutions that see where they are.

Liu et al., "An intriguing failing of convolutional neural networks and the CoordConv
solution", NeurIPS 2018, arXiv:1807.03247. A CoordConv layer is a convolution over the input
concatenated with coordinate channels.

Coordinate channels, in this order after the input's own channels:

* ``x``: the column index, scaled linearly so the first column is -1 and the last 1;
* ``y``: the row index, scaled the same way (first row -1, last row 1);
* ``r`` (only with ``with_r``): ``sqrt(x**2 + y**2)``, the distance from the map's centre.

A map (or real extent) of size 1 gets 0. When a layer knows the real extent of each image
inside a zero-padded batch (:attr:`CoordConv2d.image_extent`, set by
:func:`coorddet.inject.inject_coordconv`), -1..1 spans the image, not the padded map, and the
padding gets 0 in every coordinate channel, which is what the layer's own zero padding would
give the image batched alone.

This module must stay TorchScript-compatible: no ``from __future__ import annotations``.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair


def _axis(size: int, extent: Tensor) -> tuple[Tensor, Tensor]:
    """Coordinates of ``size`` cells for ``extent`` (N,) real cells: (N, size) values from
    -1 to 1 across the real cells, and (N, size) whether each cell is real (not padding)."""
    positions = torch.arange(size, device=extent.device, dtype=extent.dtype)
    span = (extent - 1.0).unsqueeze(1)  # (N, 1)
    # (2i - span) / span puts -1, 0 and 1 exactly on the first, middle and last real cells.
    coords = (2.0 * positions - span) / span.clamp(min=1.0)
    return torch.where(span > 0, coords, torch.zeros_like(coords)), positions < extent[:, None]


def coordinate_grid(height: int, width: int, extents: Tensor, with_r: bool) -> Tensor:
    """Coordinate channels for a batch of maps.

    Args:
        height, width: the map size ``H, W`` in cells.
        extents: (N, 2) float tensor, each image's real ``(rows, columns)`` in cells
            (``(H, W)`` for an unpadded map). Sets the device and dtype of the result.
        with_r: append the radius channel.

    Returns:
        (N, 2 or 3, H, W) tensor: channels ``x`` (varies along W), ``y`` (varies along H),
        then ``r`` with ``with_r``. Cells outside an image's extent (batch padding) are 0 in
        every channel, as a convolution's zero padding would see them were the image alone.
    """
    n = extents.shape[0]
    y, real_rows = _axis(height, extents[:, 0])
    x, real_columns = _axis(width, extents[:, 1])
    y = y[:, :, None].expand(n, height, width)
    x = x[:, None, :].expand(n, height, width)
    channels = [x, y]
    if with_r:
        channels.append(torch.sqrt(x * x + y * y))
    grid = torch.stack(channels, dim=1)
    real = real_rows[:, :, None] & real_columns[:, None, :]  # (N, H, W)
    return torch.where(real[:, None], grid, torch.zeros_like(grid))


def _batch_sum(grad: Tensor) -> Tensor:
    """``grad.sum(0, keepdim=True)``, summing over a flat view where the layout allows (torch's
    dim-0 reduction of a channels_last tensor measured ~25x slower than this)."""
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
        return grad, _batch_sum(grad)


@torch.jit.unused
def _add_shared_term(out: Tensor, term: Tensor) -> Tensor:
    # Eager only (TorchScript cannot call an autograd.Function; it adds out of place instead).
    return _AddSharedTerm.apply(out, term)


class AddCoords(nn.Module):
    """Append coordinate channels: (N, C, H, W) -> (N, C + 2 (+1 with ``with_r``), H, W).

    Channel order: the input's C channels, then ``x`` (column), ``y`` (row), ``r``. Values
    are on the input's device and dtype. The grid is built once per (H, W, extent, device,
    dtype) and cached on the module (not in its ``state_dict``).
    """

    _grids: dict[str, Tensor]

    def __init__(self, with_r: bool = False) -> None:
        super().__init__()
        self.with_r = with_r
        self._grids = {}

    @property
    def num_channels(self) -> int:
        """How many channels this module appends (2 or 3)."""
        return 3 if self.with_r else 2

    @torch.jit.export
    def grid(
        self, height: int, width: int, like: Tensor, rows: float = -1.0, columns: float = -1.0
    ) -> Tensor:
        """The cached (1, 2 or 3, height, width) grid on ``like``'s device and dtype.

        ``rows``/``columns``: the real extent in cells; negative means the whole map.
        """
        rows = float(height) if rows < 0 else rows
        columns = float(width) if columns < 0 else columns
        key = f"{height}x{width}/{rows}x{columns}/{like.device}/{like.dtype}"
        cached = self._grids.get(key)
        if cached is not None:
            return cached
        extents = torch.tensor([[rows, columns]], dtype=torch.float32, device=like.device)
        if torch.jit.is_scripting():
            grid = coordinate_grid(height, width, extents, self.with_r).to(like.dtype)
        else:
            # A grid first built during validation under inference_mode must stay usable
            # by autograd when training resumes, so never cache an inference tensor.
            with torch.inference_mode(False):
                grid = coordinate_grid(height, width, extents, self.with_r).to(like.dtype)
        if len(self._grids) >= 32:  # bound the cache when shapes keep changing
            self._grids.clear()
        self._grids[key] = grid
        return grid

    def forward(self, x: Tensor) -> Tensor:
        N, C, H, W = x.shape
        return torch.cat([x, self.grid(H, W, x, -1.0, -1.0).expand(N, -1, H, W)], dim=1)

    def extra_repr(self) -> str:
        return f"with_r={self.with_r}"


class CoordConv2d(nn.Conv2d):
    """``nn.Conv2d`` over the input plus coordinate channels (see :class:`AddCoords`).

    Same arguments as ``nn.Conv2d``; ``in_channels`` counts the input's own channels only.
    Computes ``conv2d(cat([x, coords]), cat([weight, coord_weight], 1)) + bias`` as two
    convolutions whose outputs are added, which is the same sum. For a batch whose images
    share an extent the coordinate term is computed once, (1, C, H, W), and added in place to
    the input's convolution; its weight gradient comes from the batch-summed output gradient.
    So CoordConv costs one addition and one summation per layer over the plain convolution
    (on ``mnist-small``'s stem: +1.2 ms per batch-16 step, where convolving the concatenation
    cost +2.5 ms).

    Parameters: ``weight`` and ``bias`` exactly as the ``nn.Conv2d`` it replaces (same keys,
    same shapes, so a plain conv's weights load unchanged), plus ``coord_weight`` of shape
    (out_channels, 2 or 3, *kernel_size); the coordinate term is never grouped. Every
    parameter is used in every forward (DDP needs no ``find_unused_parameters``).

    :attr:`image_extent` is a (N, 2) float64 CPU tensor: each image's real (height, width)
    as a fraction of the padded batch tensor. It is empty (use the whole map) unless
    :func:`coorddet.inject.inject_coordconv` shares its model's extent tensor with the layer.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        with_r: bool = False,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self.with_r = with_r
        self.add_coords = AddCoords(with_r)
        coord_shape = (out_channels, self.add_coords.num_channels, *self.kernel_size)
        self.coord_weight = nn.Parameter(torch.empty(coord_shape, device=device, dtype=dtype))
        self.image_extent = torch.empty(0, 2, dtype=torch.float64)
        self._reset_coord_weight()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "coord_weight" in self._parameters:  # nn.Conv2d.__init__ calls this before it exists
            self._reset_coord_weight()

    def _reset_coord_weight(self) -> None:
        # The bound nn.Conv2d's default init would give the coordinate slice of one conv
        # over the concatenated input: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), ..).
        fan_in = (self.in_channels // self.groups + self.add_coords.num_channels) * math.prod(
            self.kernel_size
        )
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.coord_weight, -bound, bound)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, with_r: bool = False) -> "CoordConv2d":
        """A CoordConv2d computing exactly what ``conv`` computes, until training moves it.

        Copies ``weight`` and ``bias`` and zeroes ``coord_weight``, so a trained (or freshly
        initialised) conv is converted without losing anything. Zero coordinate weights
        still receive gradients (d loss / d coord_weight correlates the output gradient with
        the coordinates), so this init is also fine for training from scratch, which is how
        the paper trains CoordConv. ``weight``/``bias`` keep ``conv``'s ``requires_grad``
        (frozen pretrained stems stay frozen); ``coord_weight`` is always trainable, the
        coordinate channels being new.
        """
        weight = conv.weight
        # Built on the meta device: no initialisation work and no draw from the global RNG, so
        # a baseline and a CoordConv run seeded alike stay alike after the model is built.
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
            dtype=weight.dtype,
            with_r=with_r,
        ).to_empty(device=weight.device)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if conv.bias is not None and layer.bias is not None:
                layer.bias.copy_(conv.bias)
            layer.coord_weight.zero_()
        layer.weight.requires_grad_(weight.requires_grad)
        if conv.bias is not None and layer.bias is not None:
            layer.bias.requires_grad_(conv.bias.requires_grad)
        layer.train(conv.training)
        return layer

    def coordinates(self, x: Tensor) -> Tensor:
        """Coordinate channels for ``x`` (N, C, H, W): (1 or N, 2 or 3, H, W)."""
        N, C, H, W = x.shape
        if self.image_extent.numel() == 0:
            return self.add_coords.grid(H, W, x, -1.0, -1.0)
        fractions: list[list[float]] = self.image_extent.tolist()
        if len(fractions) != N:
            raise RuntimeError(
                f"CoordConv2d: image_extent has {len(fractions)} rows for a batch of {N}"
            )
        first = fractions[0]
        uniform = True
        for row in fractions:
            uniform = uniform and row == first
        if uniform:
            return self.add_coords.grid(H, W, x, first[0] * H, first[1] * W)
        scale = torch.tensor([[float(H), float(W)]], dtype=torch.float64)
        extents = (self.image_extent * scale).to(device=x.device, dtype=torch.float32)
        return coordinate_grid(H, W, extents, self.with_r).to(x.dtype)

    def forward(self, input: Tensor) -> Tensor:
        coords = self.coordinates(input)
        if self.coord_weight.is_contiguous(memory_format=torch.channels_last):
            # A channels_last model: an NCHW grid would take oneDNN's slow reference path.
            coords = coords.contiguous(memory_format=torch.channels_last)
        if self.padding_mode != "zeros":
            coords = F.pad(coords, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            coord_term = F.conv2d(
                coords, self.coord_weight, None, self.stride, _pair(0), self.dilation, 1
            )
        else:
            coord_term = F.conv2d(
                coords, self.coord_weight, None, self.stride, self.padding, self.dilation, 1
            )
        out = self._conv_forward(input, self.weight, self.bias)
        if not torch.jit.is_scripting():
            if coord_term.shape[0] == 1:
                return _add_shared_term(out, coord_term)
        return out + coord_term

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, with_r={self.with_r}"
