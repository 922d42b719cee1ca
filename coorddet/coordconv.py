"""CoordConv: convolutions that see where they are.

Liu et al., "An intriguing failing of convolutional neural networks and the CoordConv
solution", NeurIPS 2018, arXiv:1807.03247. A CoordConv layer is a convolution over its input
concatenated with coordinate channels, in this order after the input's own channels:

* ``x``: the column index, scaled linearly so the first column is -1 and the last 1;
* ``y``: the row index, scaled the same way (first row -1, last row 1);
* ``r`` (only with ``with_r``): ``sqrt(x**2 + y**2)``, the distance from the map's centre.

A map of size 1 gets 0. When a layer knows which part of a zero-padded batch each image
fills (:attr:`CoordConv2d.image_extent`, set by :func:`coorddet.inject.inject_coordconv`),
-1..1 spans the image, not the padded map, and the padding gets 0 in every coordinate
channel, which is what the layer's own zero padding would give the image batched alone.

:class:`CoordConv2d` computes exactly that concatenated convolution, in a cheaper form that
gives the same sum (cached grids, one coordinate term shared by the batch, added in place):
:mod:`coorddet._coordinate_term`. This module must stay TorchScript-compatible: no
``from __future__ import annotations``.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coorddet._coordinate_term import add_shared_term, cached_grid, coordinates


class AddCoords(nn.Module):
    """Append coordinate channels: (N, C, H, W) -> (N, C + 2 (+1 with ``with_r``), H, W).

    Channel order: the input's C channels, then ``x`` (column), ``y`` (row), ``r``, on the
    input's device and dtype. Grids are cached on the module (not in its ``state_dict``).
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
        self, height: int, width: int, like: Tensor, rows: float = 1.0, columns: float = 1.0
    ) -> Tensor:
        """The cached (1, 2 or 3, height, width) grid on ``like``'s device and dtype, for an
        image filling ``rows`` x ``columns`` of the map (fractions; 1.0: all of it)."""
        return cached_grid(self._grids, height, width, like, self.with_r, rows, columns)

    def forward(self, x: Tensor) -> Tensor:
        N, C, H, W = x.shape
        return torch.cat([x, self.grid(H, W, x, 1.0, 1.0).expand(N, -1, H, W)], dim=1)

    def extra_repr(self) -> str:
        return f"with_r={self.with_r}"


class CoordConv2d(nn.Conv2d):
    """``nn.Conv2d`` over the input plus coordinate channels (see :class:`AddCoords`).

    Same arguments as ``nn.Conv2d``; ``in_channels`` counts the input's own channels only.
    Parameters: ``weight`` and ``bias`` exactly as the ``nn.Conv2d`` it replaces (same keys and
    shapes, so a plain conv's weights load unchanged), plus ``coord_weight`` of shape
    (out_channels, 2 or 3, *kernel_size); the coordinate term is never grouped. Every
    parameter is used in every forward (DDP needs no ``find_unused_parameters``).

    ``conv2d(cat([x, coords]), cat([weight, coord_weight], 1)) + bias`` is computed as the
    input's convolution plus a coordinate term, computed once for a batch whose images share
    an extent: about half the cost of convolving the concatenation (docs/speed.md).

    :attr:`image_extent`: (N, 2) float64 CPU tensor, each image's real (height, width) as a
    fraction of the padded batch tensor; empty (the whole map) unless
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
            in_channels, out_channels, kernel_size, stride=stride, padding=padding,
            dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
            device=device, dtype=dtype,
        )  # fmt: skip
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
        # nn.Conv2d's default init of one conv over the concatenated input would give the
        # coordinate slice kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        channels = self.in_channels // self.groups + self.add_coords.num_channels
        bound = 1.0 / math.sqrt(channels * math.prod(self.kernel_size))
        nn.init.uniform_(self.coord_weight, -bound, bound)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, with_r: bool = False) -> "CoordConv2d":
        """A CoordConv2d computing exactly what ``conv`` computes, until training moves it.

        Copies ``weight`` and ``bias`` and zeroes ``coord_weight``. Zero coordinate weights
        still receive gradients (d loss / d coord_weight correlates the output gradient with
        the coordinates), so this also trains from scratch, as the paper does. ``weight`` and
        ``bias`` keep ``conv``'s ``requires_grad`` (frozen pretrained stems stay frozen);
        ``coord_weight`` is always trainable.
        """
        weight = conv.weight
        # Built on the meta device: no initialisation work and no draw from the global RNG, so
        # a baseline and a CoordConv run seeded alike stay alike after the model is built.
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta",
            dtype=weight.dtype, with_r=with_r,
        ).to_empty(device=weight.device)  # fmt: skip
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
        return coordinates(self.add_coords._grids, self.image_extent, x, self.with_r)

    def coordinate_term(self, input: Tensor) -> Tensor:
        """The coordinate channels' convolution for ``input`` (N, C, H, W): (1 or N,
        out_channels, H_out, W_out), added to the input's convolution by :meth:`forward`."""
        coords = self.coordinates(input)
        if self.coord_weight.is_contiguous(memory_format=torch.channels_last):
            # A channels_last model: an NCHW grid would take oneDNN's slow reference path.
            coords = coords.contiguous(memory_format=torch.channels_last)
        if self.padding_mode != "zeros":  # pad as nn.Conv2d does, then convolve unpadded
            coords = F.pad(coords, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(coords, self.coord_weight, None, self.stride, 0, self.dilation)
        return F.conv2d(coords, self.coord_weight, None, self.stride, self.padding, self.dilation)

    def forward(self, input: Tensor) -> Tensor:
        coord_term = self.coordinate_term(input)
        out = self._conv_forward(input, self.weight, self.bias)
        if not torch.jit.is_scripting():
            if coord_term.shape[0] == 1:
                return add_shared_term(out, coord_term)
        return out + coord_term

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, with_r={self.with_r}"
