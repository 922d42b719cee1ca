"""AddCoords and CoordConv2d: values, shapes, exact conversion, scripting, and the known bugs
of public CoordConv layers (x/y swapped on non-square maps, wrong channel count with_r, radius
centred at 0.5, CPU-breaking device checks, unused wrapped convs under DDP)."""

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing import assert_close

from coorddet.coordconv import AddCoords, CoordConv2d


def _script(module: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation warning
        return torch.jit.script(module)


def test_add_coords_non_square_x_is_column_y_is_row():
    x = torch.randn(2, 3, 4, 7)
    out = AddCoords()(x)
    assert out.shape == (2, 5, 4, 7)
    assert_close(out[:, :3], x)
    columns = torch.linspace(-1, 1, 7)
    rows = torch.linspace(-1, 1, 4)
    for image in range(2):
        assert_close(out[image, 3], columns.expand(4, 7))
        assert_close(out[image, 4], rows[:, None].expand(4, 7))


def test_add_coords_endpoints_and_centre_are_exact():
    out = AddCoords()(torch.zeros(1, 1, 5, 9))
    x, y = out[0, 1], out[0, 2]
    assert x[0, 0] == -1 and x[0, -1] == 1 and x[0, 4] == 0
    assert y[0, 0] == -1 and y[-1, 0] == 1 and y[2, 0] == 0


def test_add_coords_with_r_channel_count_and_radius_centred_on_the_map():
    x = torch.randn(3, 2, 5, 9)
    out = AddCoords(with_r=True)(x)
    assert out.shape == (3, 5, 5, 9)
    xx, yy, rr = out[0, 2], out[0, 3], out[0, 4]
    assert_close(rr, torch.sqrt(xx**2 + yy**2))
    assert rr[2, 4] == 0  # the map's centre, not (0.5, 0.5)
    assert_close(rr[0, 0], torch.tensor(2.0).sqrt())
    assert_close(rr, rr.flip(0))
    assert_close(rr, rr.flip(1))


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1)])
def test_add_coords_size_one_axis_gets_zero(shape):
    out = AddCoords()(torch.ones(2, 1, *shape))
    height, width = shape
    if width == 1:
        assert (out[:, 1] == 0).all()
    else:
        assert_close(out[0, 1, 0], torch.linspace(-1, 1, width))
    if height == 1:
        assert (out[:, 2] == 0).all()
    else:
        assert_close(out[0, 2, :, 0], torch.linspace(-1, 1, height))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_add_coords_follows_input_dtype_and_device(dtype):
    x = torch.randn(2, 3, 5, 6).to(dtype)
    out = AddCoords(with_r=True)(x)
    assert out.dtype == dtype and out.device == x.device
    meta = AddCoords()(torch.empty(2, 3, 5, 6, device="meta"))  # no device checks
    assert meta.shape == (2, 5, 5, 6) and meta.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_add_coords_on_cuda():
    out = AddCoords(with_r=True)(torch.randn(2, 3, 5, 6, device="cuda"))
    assert out.device.type == "cuda"


def test_grid_is_cached_per_shape_device_dtype_and_not_saved():
    layer = AddCoords()
    x = torch.randn(2, 3, 5, 6)
    first = layer.grid(5, 6, x)
    assert layer.grid(5, 6, x) is first
    layer(x)
    layer(torch.randn(7, 1, 5, 6))  # other batch and channel counts share the grid
    assert layer.grid(5, 6, x) is first
    assert layer.grid(6, 5, x) is not first
    assert layer.grid(5, 6, x.double()).dtype == torch.float64
    assert len(layer._grids) == 3
    assert layer.state_dict() == {}


def test_grid_built_under_inference_mode_still_trains():
    conv = CoordConv2d(2, 3, 3, padding=1)
    with torch.inference_mode():
        conv(torch.randn(1, 2, 5, 5))
    conv(torch.randn(2, 2, 5, 5)).sum().backward()
    assert conv.coord_weight.grad is not None


_CONVS = [
    dict(kernel_size=1),
    dict(kernel_size=3, padding=1),
    dict(kernel_size=5, stride=2, padding=2),
    dict(kernel_size=3, dilation=2, padding=2, bias=False),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=3, padding=1, groups=4),  # depthwise
    dict(kernel_size=(3, 1), padding=(1, 0), padding_mode="reflect"),
    dict(kernel_size=3, padding="same"),
]


@pytest.mark.parametrize("options", _CONVS)
@pytest.mark.parametrize("with_r", [False, True])
def test_from_conv_computes_exactly_the_conv(options, with_r):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, **options)
    layer = CoordConv2d.from_conv(conv, with_r=with_r)
    x = torch.randn(3, 4, 13, 7)  # odd, non-square
    assert_close(layer(x), conv(x), atol=1e-6, rtol=0)
    assert (layer.coord_weight == 0).all()
    assert layer.coord_weight.shape == (8, 3 if with_r else 2, *conv.kernel_size)
    assert set(layer.state_dict()) == set(conv.state_dict()) | {"coord_weight"}


def test_from_conv_keeps_dtype_requires_grad_mode_and_global_rng():
    conv = nn.Conv2d(3, 5, 3).double().eval()
    conv.weight.requires_grad_(False)
    state = torch.random.get_rng_state()
    layer = CoordConv2d.from_conv(conv)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert layer.weight.dtype == torch.float64 and not layer.training
    assert not layer.weight.requires_grad
    assert layer.bias.requires_grad and layer.coord_weight.requires_grad


@pytest.mark.parametrize("with_r", [False, True])
def test_coordconv_is_a_conv_over_add_coords(with_r):
    torch.manual_seed(0)
    layer = CoordConv2d(3, 8, 3, stride=2, padding=1, with_r=with_r)
    assert layer.in_channels == 3 and layer.weight.shape == (8, 3, 3, 3)
    assert (layer.coord_weight != 0).all()  # a fresh layer initialises every weight
    x = torch.randn(2, 3, 9, 6)
    full_weight = torch.cat([layer.weight, layer.coord_weight], dim=1)
    expected = nn.functional.conv2d(
        AddCoords(with_r)(x), full_weight, layer.bias, stride=2, padding=1
    )
    assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("with_r", [False, True])
def test_coordconv_gradients_are_those_of_a_conv_over_add_coords(in_channels, layout, with_r):
    """The shared coordinate term is added in place and its weight gradient comes from the
    batch-summed output gradient: every gradient must still be the concatenated conv's."""
    torch.manual_seed(0)
    layer = CoordConv2d(in_channels, 8, 5, padding=2, with_r=with_r).to(memory_format=layout)
    x = torch.randn(4, in_channels, 9, 6).contiguous(memory_format=layout).requires_grad_()
    out_grad = torch.randn(4, 8, 9, 6).contiguous(memory_format=layout)
    # torch.relu_ after the layer, as in the backbones: in place on the layer's output.
    torch.relu_(layer(x)).backward(out_grad)
    got = [x.grad, layer.weight.grad, layer.coord_weight.grad, layer.bias.grad]

    weight = torch.cat([layer.weight, layer.coord_weight], dim=1).detach().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    out = nn.functional.conv2d(AddCoords(with_r)(x2), weight, bias, padding=2)
    torch.relu(out).backward(out_grad)
    expected = [x2.grad, weight.grad[:, :in_channels], weight.grad[:, in_channels:], bias.grad]
    for actual, wanted in zip(got, expected, strict=True):
        assert_close(actual, wanted, atol=1e-4, rtol=1e-4)


def test_coordconv_frozen_conv_and_input_without_grad_still_trains_coordinates():
    layer = CoordConv2d(2, 4, 3, padding=1)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    x = torch.randn(3, 2, 6, 6)
    out = layer(x)
    assert out.requires_grad
    out.sum().backward()
    assert layer.coord_weight.grad.abs().sum() > 0
    with torch.inference_mode():
        assert_close(layer(x), out.detach())


def test_zero_coordinate_weights_still_learn():
    layer = CoordConv2d.from_conv(nn.Conv2d(2, 4, 3, padding=1))
    layer(torch.randn(2, 2, 6, 6)).pow(2).sum().backward()
    assert layer.coord_weight.grad.abs().sum() > 0


def test_image_extent_scales_coordinates_per_image():
    layer = CoordConv2d(1, 2, 1)
    x = torch.zeros(2, 1, 4, 8)
    layer.image_extent = torch.tensor([[1.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    coords = layer.coordinates(x)
    assert coords.shape == (2, 2, 4, 8)
    assert_close(coords[0], AddCoords()(x)[0, 1:])
    assert_close(coords[1, :, :2, :4], AddCoords()(torch.zeros(1, 1, 2, 4))[0, 1:])
    assert (coords[1, :, 2:] == 0).all() and (coords[1, :, :, 4:] == 0).all()  # the padding
    layer.image_extent = torch.tensor([[0.5, 0.5]] * 2, dtype=torch.float64)
    assert coords.shape[0] == 2 and layer.coordinates(x).shape[0] == 1  # shared, broadcast
    with pytest.raises(RuntimeError, match="3 rows for a batch of 2"):
        layer.image_extent = torch.ones(3, 2, dtype=torch.float64)
        layer(x)


def test_script_add_coords_and_coordconv():
    x = torch.randn(2, 3, 5, 7)
    for module in [AddCoords(), AddCoords(with_r=True), CoordConv2d(3, 4, 3, padding=1)]:
        assert_close(_script(module)(x), module(x))
    layer = CoordConv2d(3, 4, 3, padding=1, with_r=True, padding_mode="reflect")
    scripted = _script(layer)
    layer.image_extent = torch.tensor([[1.0, 1.0], [0.5, 0.25]], dtype=torch.float64)
    scripted.image_extent = layer.image_extent
    assert_close(scripted(x), layer(x))


def test_autocast_bfloat16():
    layer = CoordConv2d(3, 4, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 3, 6, 6))
    assert out.dtype == torch.bfloat16


def test_ddp_without_find_unused_parameters(tmp_path):
    """Every parameter is used: DDP's reducer would raise on the second step otherwise."""
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = nn.Sequential(CoordConv2d(1, 4, 3, padding=1), nn.ReLU(), CoordConv2d(4, 2, 1))
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        for _ in range(2):
            ddp(torch.randn(2, 1, 8, 8)).sum().backward()
        assert all(parameter.grad is not None for parameter in model.parameters())
    finally:
        dist.destroy_process_group()
