"""The GPU check's measurements (``benchmarks/gpu_check.sh`` runs it after the CUDA tests).

    python benchmarks/gpu_check.py --out FILE.json [--budget-seconds 400]

On one CUDA GPU, writes one JSON with:

- ``arms``: ``train.py`` for 2 epochs on a generated ``mnist-small`` dataset, baseline and
  CoordConv, in ``32-true`` and ``bf16-mixed``; each run's ``metrics.json`` and the
  ``coorddet.evaluate`` metrics of both arms on the test split (the real command lines);
- ``mnist_small``: training img/s at batch 64, 128 and 256 (bf16-mixed, and fp32 at 64),
  inference img/s (``predict_with_proposals`` as ``coorddet.evaluate`` runs it, bf16), the
  CoordConv step ratio (the two arms stepped alternately), and the same with
  ``--compile``'s compiled backbone (``_compiled`` keys, with the largest difference of the
  compiled model's training loss from eager's);
- ``resnet50_fpn``: training and inference img/s at 800x1333 (``weights=None``, bf16-mixed,
  batch 8) and its CoordConv step ratio;
- ``bf16_boxes``: the largest error, in pixels, of anchors and of decoded boxes computed in
  bf16 at 800x1333 (torchvision's dtype rule) and with coorddet's float32 parts;
- ``targets``: each target of docs/speed.md and whether it was met.

Step times are CUDA events around whole steps after warm-up (the batches are on the GPU
already: data loading is not timed here, the ``arms``' ``train_img_per_s`` includes it).
Parts that would overrun ``--budget-seconds`` are skipped and named in ``skipped``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from coorddet.compiling import compile_backbone
from coorddet.data import CocoDataset, collate_detection
from coorddet.fileio import write_json_atomic
from coorddet.inference import predict_with_proposals
from coorddet.models import build_model
from coorddet.system import describe_machine
from data_gen import GeneratorConfig, generate

ROOT = Path(__file__).resolve().parents[1]
BF16 = torch.bfloat16
TARGETS = {  # key: (op, target) -- the targets on one H200-class GPU, bf16-mixed
    "mnist_small.train_img_per_s_bf16_b256": (">=", 3000),
    "resnet50_fpn.train_img_per_s": (">=", 60),
    "resnet50_fpn.eval_img_per_s": (">=", 180),
    "mnist_small.coordconv_step_ratio_bf16_b256": ("<=", 1.03),
}


def cuda_seconds(step: Callable[[], Any], *, steps: int, warmup: int) -> list[float]:
    """Seconds of each of ``steps`` calls of ``step`` after ``warmup``, by CUDA events."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1000.0 for start, end in times]


def train_step(model: torch.nn.Module, batch: tuple, precision: torch.dtype | None) -> Callable:
    """One SGD step of ``model`` on ``batch`` under autocast ``precision`` (None: fp32)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    images, targets = batch

    def step() -> float:
        with torch.autocast("cuda", dtype=precision or BF16, enabled=precision is not None):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return step


def gpu_batch(dataset: CocoDataset, size: int, start: int = 0) -> tuple[list, list]:
    images, targets = collate_detection(
        [dataset[i % len(dataset)] for i in range(start, start + size)]
    )
    return (
        [image.cuda() for image in images],
        [{k: v.cuda() for k, v in t.items() if k in ("boxes", "labels")} for t in targets],
    )


def step_ratio(make: Callable[[bool], torch.nn.Module], batch: tuple, steps: int) -> float:
    """CoordConv over baseline step time, the arms stepped alternately (median of pairs)."""
    steps_of = {cc: train_step(make(cc), batch, BF16) for cc in (False, True)}
    pairs = []
    for index in range(steps + 3):
        order = (False, True) if index % 2 == 0 else (True, False)
        seconds = {cc: cuda_seconds(steps_of[cc], steps=1, warmup=0)[0] for cc in order}
        if index >= 3:
            pairs.append(seconds[True] / seconds[False])
    return statistics.median(pairs)


def mnist_small(data: Path, budget: Callable[[float], bool]) -> dict[str, Any]:
    dataset = CocoDataset(data, "train")
    out: dict[str, Any] = {}
    for size, precision in ((64, None), (64, BF16), (128, BF16), (256, BF16)):
        torch.manual_seed(0)
        model = build_model().cuda().train()
        times = cuda_seconds(train_step(model, gpu_batch(dataset, size), precision), steps=20,
                             warmup=5)  # fmt: skip
        out[f"train_img_per_s_{'bf16' if precision else 'fp32'}_b{size}"] = (
            size / statistics.median(times)
        )
    out["coordconv_step_ratio_bf16_b256"] = step_ratio(
        lambda cc: build_model(coordconv=cc).cuda().train(), gpu_batch(dataset, 256), steps=20
    )
    out |= mnist_inference(data, compiled=False)
    if budget(90):
        out |= mnist_compiled(dataset, data)
    return out


def mnist_inference(data: Path, *, compiled: bool) -> dict[str, float]:
    test = CocoDataset(data, "test")
    torch.manual_seed(0)
    model = build_model().cuda().eval()
    if compiled:
        compile_backbone(model)
    out = {}
    suffix = "_compiled" if compiled else ""
    for size in (64, 256):
        images, targets = collate_detection([test[i] for i in range(size)])
        images = [image.cuda() for image in images]
        ids = [int(t["image_id"]) for t in targets]

        def step(images: list = images, ids: list = ids) -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=BF16):
                predict_with_proposals(model, images, image_ids=ids)

        times = cuda_seconds(step, steps=10, warmup=3)
        out[f"eval_img_per_s_bf16_b{size}{suffix}"] = size / statistics.median(times)
    return out


def mnist_compiled(dataset: CocoDataset, data: Path) -> dict[str, float]:
    """Training and inference with the compiled backbone, and how far its losses stray."""
    batch = gpu_batch(dataset, 256)
    losses = {}
    out = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model().cuda().train()
        if compiled:
            compile_backbone(model)
        step = train_step(model, batch, BF16)
        losses[compiled] = [float(step()) for _ in range(3)]  # compiles on the first
        times = cuda_seconds(step, steps=20, warmup=2)
        out[f"train_img_per_s_bf16_b256{'_compiled' if compiled else ''}"] = (
            256 / statistics.median(times)
        )
    out["compiled_loss_max_abs_diff"] = max(
        abs(a - b) for a, b in zip(*losses.values(), strict=True)
    )
    return out | mnist_inference(data, compiled=True)


def resnet50_fpn() -> dict[str, float]:
    """800x1333 images, ``weights=None``, bf16-mixed, batch 8: training, inference, ratio."""
    settings = {"backbone": "resnet50-fpn", "pretrained": False, "image_channels": 3,
                "num_classes": 91, "min_size": 800, "max_size": 1333,
                "anchor_sizes": [[32], [64], [128], [256], [512]]}  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 800, 1333, generator=generator).cuda() for _ in range(8)]
    corners = torch.rand(8, 6, 2, generator=generator) * torch.tensor([1000.0, 600.0])
    targets = [
        {
            "boxes": torch.cat([c, c + 100], dim=1).cuda(),
            "labels": torch.randint(1, 91, (6,)).cuda(),
        }
        for c in corners
    ]
    out = {}
    torch.manual_seed(0)
    model = build_model(**settings).cuda().train()
    times = cuda_seconds(train_step(model, (images, targets), BF16), steps=10, warmup=3)
    out["train_img_per_s"] = 8 / statistics.median(times)
    model.eval()

    def infer() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=BF16):
            model(images)

    out["eval_img_per_s"] = 8 / statistics.median(cuda_seconds(infer, steps=10, warmup=3))
    out["coordconv_step_ratio"] = step_ratio(
        lambda cc: build_model(coordconv=cc, **settings).cuda().train(), (images, targets), 10
    )
    return out


def bf16_box_errors() -> dict[str, float]:
    """Pixels lost to bf16 at 800x1333: anchors and decoded boxes, torchvision's dtype rule
    (everything in the maps' / deltas' dtype) against coorddet's float32 parts."""
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    from coorddet.fp32_boxes import FloatAnchorGenerator

    sizes, ratios = ((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5
    images = ImageList(torch.zeros(1, 3, 800, 1344, device="cuda"), [(800, 1333)])

    def maps(dtype: torch.dtype) -> list[torch.Tensor]:
        return [torch.zeros(1, 1, 800 // s, 1344 // s, dtype=dtype, device="cuda")
                for s in (4, 8, 16, 32, 64)]  # fmt: skip

    exact = AnchorGenerator(sizes, ratios)(images, maps(torch.float32))[0]
    rounded = AnchorGenerator(sizes, ratios)(images, maps(BF16))[0].float()
    ours = FloatAnchorGenerator(sizes, ratios)(images, maps(BF16))[0]
    deltas = torch.randn(exact.shape[0], 4, device="cuda") * 0.2
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    decoded = coder.decode_single(deltas, exact)
    return {
        "anchor_max_error_px_torchvision_bf16": float((rounded - exact).abs().max()),
        "anchor_max_error_px_coorddet": float((ours - exact).abs().max()),
        "decode_max_error_px_bf16": float(
            (coder.decode_single(deltas.to(BF16), exact.to(BF16)).float() - decoded).abs().max()
        ),
        "decode_max_error_px_coorddet": float(
            (
                coder.decode_single(deltas.to(BF16).float(), ours)
                - coder.decode_single(deltas.to(BF16).float(), exact)
            )
            .abs()
            .max()
        ),  # fmt: skip
    }


def run(*args: str) -> dict[str, Any]:
    """A project command line in a subprocess; its ``--out``'s metrics.json."""
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1:] or ["failed"]}
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "metrics.json").read_text())


def arms(data: Path, tmp: Path) -> dict[str, Any]:
    """Both arms for 2 epochs in fp32 and bf16-mixed with train.py, evaluated on test."""
    out: dict[str, Any] = {}
    for precision in ("32-true", "bf16-mixed"):
        runs = {}
        for arm in ("baseline", "coordconv"):
            folder = tmp / f"{arm}-{precision}"
            runs[arm] = folder
            flag = "--coordconv" if arm == "coordconv" else "--no-coordconv"
            out[f"train_{arm}_{precision}"] = run(
                "train.py", "--data", str(data), "--out", str(folder), flag, "--accelerator",
                "gpu", "--devices", "1", "--precision", precision, "--max-epochs", "2",
                "--batch-size", "64", "--quiet",
            )  # fmt: skip
        out[f"evaluate_{precision}"] = run(
            "-m", "coorddet.evaluate", "--data", str(data), "--split", "test", "--device",
            "cuda", "--precision", precision, "--out", str(tmp / f"report-{precision}"),
            "--quiet", *(str(runs[a] / "checkpoints" / "best.ckpt") for a in runs),
        )  # fmt: skip
    return out


def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    checked = {}
    for key, (op, target) in TARGETS.items():
        section, name = key.split(".")
        value = results.get(section, {}).get(name)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        checked[key] = {"value": value, "target": f"{op} {target}", "met": met}
    return checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__)
    parser.add_argument("--out", required=True, metavar="FILE.json")
    parser.add_argument("--budget-seconds", type=float, default=400.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU here")
    started = time.monotonic()
    results: dict[str, Any] = {"machine": describe_machine(), "skipped": []}
    torch.backends.cudnn.benchmark = False  # train.py's setting: shapes change per batch

    def budget(seconds: float) -> bool:
        return time.monotonic() - started + seconds <= args.budget_seconds

    with tempfile.TemporaryDirectory(prefix="coorddet-gpu-") as name:
        tmp = Path(name)
        data = tmp / "data"
        generate(GeneratorConfig(out=str(data), train=4000, val=500, test=500, seed=0))
        parts = (("bf16_boxes", bf16_box_errors, 10), ("mnist_small", None, 120),
                 ("resnet50_fpn", resnet50_fpn, 90), ("arms", None, 150))  # fmt: skip
        for key, function, needs in parts:
            if not budget(needs):
                results["skipped"].append(key)
                continue
            print(f"{key} ...", flush=True)
            if key == "mnist_small":
                results[key] = mnist_small(data, budget)
            elif key == "arms":
                results[key] = arms(data, tmp)
            else:
                results[key] = function()
    results["seconds"] = round(time.monotonic() - started, 1)
    results["targets"] = verdicts(results)
    write_json_atomic(Path(args.out), results)
    print(json.dumps(results["targets"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
