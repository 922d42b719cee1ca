"""Where a training step and an inference batch of ``mnist-small`` spend their time.

    python benchmarks/profile_step.py [--data DIR] [--steps 30] [--coordconv]

Times, per 16-image training step in a bare loop (medians over ``--steps`` after 10 of
warm-up): the data loading and augmentation of ``train.py``'s DataLoader, the model's parts
(transform, backbone, RPN head, anchor matching, proposal filtering with NMS, RoI sampling,
RoI pooling, box head, losses), the backward pass and the optimizer step; then, per 64-image
inference batch as ``coorddet.evaluate`` runs it, the same parts, and the FLOP-bound floor of
the two largest products (the backbone's second convolution and the box head's ``fc6``).
Without ``--data`` it generates the default dataset in a temporary folder first. Nothing here
is a target: ``benchmarks/run.py`` measures those.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from coorddet.config import build_config
from coorddet.data import CocoDataset, collate_detection
from coorddet.datamodule import CocoDataModule
from coorddet.inference import predict_with_proposals
from coorddet.models import build_model
from coorddet.system import configure_memory, configure_threads
from data_gen import GeneratorConfig, generate


class Clock:
    """Seconds spent in each named part, per call, from forward hooks and method wrappers."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.on = False

    def module(self, module: torch.nn.Module, name: str) -> None:
        started: list[float] = []
        module.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
        module.register_forward_hook(lambda *_: self._add(name, started.pop()))

    def method(self, owner: object, attribute: str, name: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._add(name, started)

        object.__setattr__(owner, attribute, timed)

    def _add(self, name: str, started: float) -> None:
        if self.on:
            self.seconds[name].append(time.perf_counter() - started)


def instrument(model: torch.nn.Module, clock: Clock) -> None:
    for name in ("transform", "backbone"):
        clock.module(getattr(model, name), name)
    clock.module(model.rpn, "rpn (all)")
    clock.module(model.rpn.head, "rpn: head")
    for attribute in ("filter_proposals", "assign_targets_to_anchors", "compute_loss"):
        clock.method(model.rpn, attribute, f"rpn: {attribute}")
    clock.module(model.roi_heads, "roi heads (all)")
    clock.method(model.roi_heads, "select_training_samples", "roi: select_training_samples")
    clock.method(model.roi_heads, "postprocess_detections", "roi: postprocess_detections")
    clock.module(model.roi_heads.box_roi_pool, "roi: pool")
    clock.module(model.roi_heads.box_head, "roi: box head")


def report(title: str, clock: Clock, total: list[float], count: int) -> None:
    whole = statistics.median(total)
    print(f"\n{title}: {whole * 1e3:.1f} ms median, {count / whole:.0f} img/s")
    for name, values in clock.seconds.items():
        ms = sum(values) / len(total) * 1e3  # per step (a part may run more than once)
        print(f"  {name:34s} {ms:7.2f} ms  {ms / (whole * 1e3):6.1%}")


def train_profile(data: Path, steps: int, coordconv: bool) -> torch.nn.Module:
    config = build_config({}, {"data.data_dir": str(data), "data.batch_size": 16,
                               "model.coordconv": coordconv, "out": "unused"})  # fmt: skip
    datamodule = CocoDataModule(**dataclasses.asdict(config.data))
    datamodule.setup("fit")
    torch.manual_seed(0)
    model = build_model(**config.model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.optim.lr, momentum=0.9)
    clock = Clock()
    instrument(model, clock)
    total: list[float] = []
    batches = iter(datamodule.train_dataloader())
    for step in range(10 + steps):
        clock.on = step >= 10
        started = time.perf_counter()
        images, targets = next(batches)
        loaded = time.perf_counter()
        losses = model(list(images), list(targets))
        forward = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        backward = time.perf_counter()
        optimizer.step()
        done = time.perf_counter()
        if clock.on:
            clock.seconds["data loading + augmentation"].append(loaded - started)
            clock.seconds["forward (all)"].append(forward - loaded)
            clock.seconds["backward"].append(backward - forward)
            clock.seconds["optimizer step"].append(done - backward)
            total.append(done - started)
    report("training step, 16 images", clock, total, 16)
    return model


def eval_profile(model: torch.nn.Module, data: Path, batches: int) -> None:
    dataset = CocoDataset(data, "test")
    images, _ = collate_detection([dataset[i] for i in range(64)])
    model.eval()
    clock = Clock()
    instrument(model, clock)
    total = []
    with torch.inference_mode():
        for index in range(2 + batches):
            clock.on = index >= 2
            started = time.perf_counter()
            predict_with_proposals(model, list(images), image_ids=list(range(64)))
            if clock.on:
                total.append(time.perf_counter() - started)
    report("inference batch, 64 images (detections and the paper's proposals)", clock, total, 64)


def floors() -> None:
    """Time the two largest products alone, for the share of a step no overhead can remove."""
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(32, 64, 5, padding=2).to(memory_format=torch.channels_last)
    cases = {
        "conv2 forward, 64 images (6.7 GFLOP)": (
            lambda x: conv(x),
            torch.rand(64, 32, 32, 32, generator=generator).to(memory_format=torch.channels_last),
            64 * 64 * 32 * 32 * 32 * 25 * 2,
        ),
        "fc6 forward, 6,400 RoIs (10.3 GFLOP)": (
            lambda x: torch.nn.functional.linear(x, weight),
            torch.rand(6400, 3136, generator=generator),
            6400 * 3136 * 256 * 2,
        ),
    }
    weight = torch.rand(256, 3136, generator=generator)
    print("\nthe largest products alone (inference shapes):")
    with torch.inference_mode():
        for name, (run, x, flops) in cases.items():
            times = []
            for _ in range(8):
                started = time.perf_counter()
                run(x)
                times.append(time.perf_counter() - started)
            seconds = statistics.median(times[2:])
            print(f"  {name:38s} {seconds * 1e3:6.1f} ms  {flops / seconds / 1e9:5.0f} GFLOP/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/profile_step.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data", type=Path, help="a data_gen dataset (default: generate one)")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps (30)")
    parser.add_argument("--coordconv", action="store_true", help="profile the CoordConv arm")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    configure_memory()
    configure_threads()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory(prefix="coorddet-profile-") as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "data"
            generate(GeneratorConfig(out=str(data)))
        model = train_profile(data, args.steps, args.coordconv)
        eval_profile(model, data, batches=max(3, args.steps // 6))
    floors()
    return 0


if __name__ == "__main__":
    sys.exit(main())
