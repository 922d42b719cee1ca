"""Training-step speed of ``build_model`` in a bare PyTorch loop (no Lightning, no data loading).

Each step: a batch of random (1, S, S) images with ``--boxes`` random digit-sized boxes
(15-25 px) each, ``sum(losses).backward()``, SGD step, ``torch.set_num_threads(--threads)``.
The baseline and CoordConv arms are stepped round-robin in one process (in a sweep, together
with the default baseline), so a busy spell on a shared machine slows all alike. Printed:
median images/s per arm, the CoordConv / baseline step-time ratio, and the variant's speed
relative to the defaults measured in the same rounds.

    python benchmarks/model_speed.py                       # default options
    python benchmarks/model_speed.py --set box_head_width=128 --set roi_pool=pool
    python benchmarks/model_speed.py --sweep               # the model's speed levers
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor, nn
from torchvision.ops.roi_align import _roi_align

from coorddet.models import build_model
from coorddet.system import configure_memory, fix_threads

SWEEP: list[tuple[str, dict]] = [
    ("box_batch_size_per_image=64", {"box_batch_size_per_image": 64}),
    ("box_batch_size_per_image=128", {"box_batch_size_per_image": 128}),
    ("box_batch_size_per_image=512 (torchvision)", {"box_batch_size_per_image": 512}),
    ("box_head_width=128", {"box_head_width": 128}),
    ("box_head_width=1024 (torchvision)", {"box_head_width": 1024}),
    ("sampling_ratio=1", {"sampling_ratio": 1}),
    ("sampling_ratio=0 (adaptive)", {"sampling_ratio": 0}),
    ("roi_pool=pool", {"roi_pool": "pool"}),
    ("roi_pool=align-torchvision (C++ kernel)", {"roi_pool": "align-torchvision"}),
    (
        "roi_pool=align-torchvision, sampling_ratio=1",
        {"roi_pool": "align-torchvision", "sampling_ratio": 1},
    ),
    ("pure-PyTorch RoIAlign (torchvision _roi_align)", {"_torch_roi_align": True}),
    ("roi_output_size=5", {"roi_output_size": 5}),
    (
        "rpn top-n train 600/300",
        {"rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300},
    ),
    (
        "rpn top-n train 2000/2000 (torchvision)",
        {"rpn_pre_nms_top_n_train": 2000, "rpn_post_nms_top_n_train": 2000},
    ),
    ("rpn_batch_size_per_image=128", {"rpn_batch_size_per_image": 128}),
]


class TorchRoIAlign(nn.Module):
    """Single-map RoIAlign through torchvision's pure-PyTorch ``_roi_align`` (benchmark only)."""

    def __init__(self, output_size: int, sampling_ratio: int, stride: int = 4) -> None:
        super().__init__()
        self.output_size, self.sampling_ratio, self.stride = output_size, sampling_ratio, stride

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes) -> Tensor:
        rois = torch.cat(
            [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)]
        )
        size, ratio = self.output_size, self.sampling_ratio
        return _roi_align(x["0"], rois, 1.0 / self.stride, size, size, ratio, False)


def make_batch(batch: int, canvas: int, boxes: int, generator: torch.Generator):
    images = [torch.rand(1, canvas, canvas, generator=generator) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        size = torch.randint(15, 26, (boxes, 2), generator=generator).float()
        corner = torch.rand(boxes, 2, generator=generator) * (canvas - size)
        targets.append(
            {
                "boxes": torch.cat([corner, corner + size], dim=1),
                "labels": torch.randint(1, 11, (boxes,), generator=generator),
            }
        )
    return images, targets


def make_model(options: dict, coordconv: bool) -> nn.Module:
    options = dict(options)
    torch_roi_align = options.pop("_torch_roi_align", False)
    torch.manual_seed(0)
    model = build_model(coordconv=coordconv, **options)
    if torch_roi_align:
        pool = model.roi_heads.box_roi_pool
        model.roi_heads.box_roi_pool = TorchRoIAlign(pool.output_size[0], pool.sampling_ratio)
    return model.train()


def step_times(variants: dict[str, dict], args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per training step for each (variant, arm), all stepped round-robin."""
    models = {
        (name, arm): make_model(options, arm == "coordconv")
        for name, options in variants.items()
        for arm in ("baseline", "coordconv")
        if name != "defaults" or arm == "baseline" or len(variants) == 1
    }
    optimizers = {
        key: torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
        for key, model in models.items()
    }
    generator = torch.Generator().manual_seed(0)
    batches = [make_batch(args.batch, args.canvas, args.boxes, generator) for _ in range(4)]
    times: dict = {key: [] for key in models}
    for step in range(args.warmup + args.steps):
        images, targets = batches[step % len(batches)]
        for key, model in models.items():
            start = time.perf_counter()
            losses = model(images, targets)
            loss = sum(losses.values())
            optimizers[key].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[key].step()
            if step >= args.warmup:
                times[key].append(time.perf_counter() - start)
    return times


def parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if "," in text:
        return [parse_value(part) for part in text.split(",")]
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a build_model option (lists: a,b,c); repeatable",
    )
    parser.add_argument("--sweep", action="store_true", help="run the lever sweep")
    parser.add_argument(
        "--only",
        default="",
        metavar="TEXT",
        help="with --sweep: only variants whose name contains TEXT",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--canvas", type=int, default=64)
    parser.add_argument("--boxes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    configure_memory()  # as train.py and coorddet.evaluate do
    fix_threads(args.threads)  # fixed: variants are compared at the same count
    base = dict(kv.split("=", 1) for kv in args.set)
    base = {key: parse_value(value) for key, value in base.items()}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"{args.canvas}px, median of {args.steps} round-robin steps after {args.warmup}"
    )
    print(
        f"{'variant':46s} {'baseline':>15s} {'coordconv':>15s} {'ratio':>6s} {'vs defaults':>11s}"
    )
    print(f"{'':46s} {'img/s med(best)':>15s} {'img/s med(best)':>15s}")
    runs = [run for run in SWEEP if args.only in run[0]] if args.sweep else [("defaults", {})]
    for name, options in runs:
        # Each variant is stepped round-robin with the defaults, so a busy spell on this
        # shared machine slows both alike and 'vs defaults' (step-time ratio) stays fair.
        variants = {"defaults": base, name: {**base, **options}}
        times = step_times(variants, args)
        median = {key: statistics.median(value) for key, value in times.items()}
        best = {key: min(value) for key, value in times.items()}
        base_s, coord_s = median[name, "baseline"], median[name, "coordconv"]
        arms = [
            f"{args.batch / median[name, arm]:7.1f} ({args.batch / best[name, arm]:5.1f})"
            for arm in ("baseline", "coordconv")
        ]
        print(
            f"{name:46s} {arms[0]:>15s} {arms[1]:>15s} {coord_s / base_s:6.3f} "
            f"{median['defaults', 'baseline'] / base_s:11.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
