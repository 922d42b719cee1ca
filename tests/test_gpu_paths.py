"""What keeps a GPU step from waiting on the host, and a GPU run repeatable, tested through the
same code on the CPU where it runs there; the CUDA cases run where there is a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from coorddet.datamodule import GPU_WORKERS, loading_defaults
from coorddet.device import ints_to_device, to_device
from coorddet.models import build_model
from coorddet.module import RandomStateCallback
from coorddet.predictions import ImagePrediction
from coorddet.steps import LossCheck, StepClock
from coorddet.system import usable_cpus

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_loading_defaults_pin_and_add_workers_on_gpus_only():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert loading_defaults(None, None, device=cpu, processes=1) == (0, False)
    workers, pin = loading_defaults(None, None, device=gpu, processes=1)
    assert pin and workers == min(GPU_WORKERS, usable_cpus() - 1)
    assert loading_defaults(None, None, device=gpu, processes=10_000) == (0, True)
    assert loading_defaults(2, False, device=gpu, processes=1) == (2, False)  # the user's


def test_the_loss_check_finds_the_first_non_finite_step_when_asked():
    check = LossCheck()
    for step, value in enumerate([1.0, 2.0, math.nan, math.inf]):
        terms = {"loss_a": torch.tensor(value), "loss_b": torch.tensor(0.5)}
        check.record(sum(terms.values()), terms, 3, step)
        if step == 1:
            assert not check.found()
    assert check.found()
    assert check.where() == "epoch 3, step 2 (loss_a=nan, loss_b=0.5)"


def test_the_step_clock_adds_up_host_time_on_the_cpu():
    clock = StepClock()
    for _ in range(3):
        clock.start(torch.device("cpu"))
        clock.stop(4)
    assert 0 <= clock.last_seconds() <= clock.total_seconds() < 1


def test_batched_predictions_are_the_per_image_ones():
    detections = [
        {"boxes": torch.rand(n, 4), "scores": torch.rand(n), "labels": torch.arange(n)}
        for n in (3, 0, 5)
    ]
    proposals = [torch.rand(n, 4) for n in (2, 4, 0)]
    batched = ImagePrediction.batch([7, 8, 9], detections, proposals)
    single = [ImagePrediction.from_detections(i, d, p) for i, d, p in zip([7, 8, 9], detections,
              proposals, strict=True)]  # fmt: skip
    for a, b in zip(batched, single, strict=True):
        assert a.image_id == b.image_id
        for field in ("boxes", "scores", "labels", "proposals"):
            torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=0)


def test_cpu_checkpoints_carry_no_cuda_state_and_load():
    callback = RandomStateCallback()
    state = callback.state_dict()
    assert ("cuda" in state) == (torch.cuda.is_available() and torch.cuda.is_initialized())
    torch.manual_seed(5)
    state = callback.state_dict()
    first = torch.rand(3)
    callback.load_state_dict(state)
    torch.testing.assert_close(torch.rand(3), first, rtol=0, atol=0)


@CUDA
def test_the_cuda_generator_resumes_where_it_was_saved():
    callback = RandomStateCallback()
    torch.cuda.manual_seed(3)
    torch.rand(5, device="cuda")
    state = callback.state_dict()
    assert "cuda" in state
    drawn = torch.randperm(100, device="cuda")  # what the samplers draw
    torch.cuda.manual_seed(99)
    callback.load_state_dict(state)
    torch.testing.assert_close(torch.randperm(100, device="cuda"), drawn, rtol=0, atol=0)


@CUDA
def test_host_to_device_copies_arrive_whole():
    values = list(range(1000))
    device = torch.device("cuda")
    assert ints_to_device(values, device).tolist() == values
    host = torch.rand(64, 2, dtype=torch.float64)
    torch.testing.assert_close(to_device(host, device).cpu(), host, rtol=0, atol=0)


@CUDA
@pytest.mark.parametrize("keep_image_size", [False, True])
def test_coordconv_layers_compute_on_cuda_as_on_the_cpu(keep_image_size):
    """Mixed sizes: per-image extents, copied to the GPU asynchronously."""
    from coorddet.coordconv import CoordConv2d

    torch.manual_seed(0)
    model = build_model(coordconv=True, keep_image_size=keep_image_size).eval()
    layer = next(m for m in model.modules() if isinstance(m, CoordConv2d))
    outputs = []
    layer.register_forward_hook(lambda module, args, out: outputs.append(out.detach().cpu()))
    images = [torch.rand(1, 64, 64), torch.rand(1, 48, 56)]
    with torch.no_grad():
        model(images)
        model.cuda()([image.cuda() for image in images])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
