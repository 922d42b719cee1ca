"""coorddet benchmark: generation, training (Lightning and a bare loop) and inference speed.

    python benchmarks/run.py [--quick] [--out FILE.json]      (make bench)

Measures on this machine and prints a table; ``--out`` also writes the pinned JSON keys:

- ``gen_canvases_per_s``: ``data_gen.generate`` end to end with the default setup (64x64
  canvases, 5 digits, 9,000/1,000/1,000, default workers, PNG writing included);
- ``train_img_per_s_baseline`` / ``train_img_per_s_coordconv``: ``mnist-small`` at batch 16
  through the real Lightning path (``DetectionModule``, ``CocoDataModule`` and the Trainer that
  ``train.py`` builds, on the generated data): batch size over the median time between
  consecutive ``on_train_batch_end`` calls after warm-up (data loading, step, logging);
- ``coordconv_step_ratio``: CoordConv step time over baseline step time, the two models
  stepped alternately in one bare loop on the same batches, so machine noise hits both alike
  (the median of the per-step ratios, the first arm turning every step);
- ``plain_loop_img_per_s``: the baseline trained by a bare PyTorch loop over the same
  DataLoader, optimizer and schedule; ``lightning_overhead_ratio``: its img/s over
  Lightning's, measured in alternating rounds (> 1: Lightning is slower);
- ``eval_img_per_s``: ``coorddet.evaluate``'s inference (detections plus the paper's RPN
  proposals) on the test split at batch 64, of the baseline the bare loop trained (25 to 40
  steps). Not of an untrained model: every one of its 100 proposals per image scores about
  1/11 for every class, above the 0.05 threshold, so 1,000 boxes per image go through NMS,
  which no trained model does (29 detections per image after 25 training steps here);
- ``train_img_per_s_contended``: ``train_img_per_s_baseline`` measured again while a busy
  process that the benchmark starts (and stops) keeps one core busy, as a neighbour would
  (it is not a child of the benchmark: coorddet counts its own children as its own work);
  ``contended_ratio``: contended over idle (0.5 is ideal on 2 cores, one of them taken);
- ``train_img_per_s_<detector>`` and ``coordconv_step_ratio_<detector>`` for every detector
  (``faster_rcnn``, ``mask_rcnn``, ``rpn_only``, ``retinanet``, ``fcos``, ``ssdlite``: the
  name with ``_`` for ``-``): its baseline through Lightning as above, and its CoordConv step
  ratio (at its default sites) interleaved as above; Faster R-CNN's are the keys above;
- ``train_img_per_s_bf16``: ``train_img_per_s_baseline`` with ``--precision bf16-mixed``;
  ``eval_img_per_s_bf16``: ``eval_img_per_s`` under ``torch.autocast("cpu", bfloat16)``;
- ``plain_loop_img_per_s_compiled`` / ``_eager`` and ``eval_img_per_s_compiled`` / ``_eager``:
  ``--compile`` (the backbone through ``torch.compile``) against eager, stepped alternately
  in one process on the same batches; ``compiled_feature_max_abs_diff``: how far the compiled
  backbone's features are from eager's;
- ``torch``, ``torchvision``, ``lightning``, ``cpu``, ``cpu_count``, ``threads``.

Medians over at least 20 steps after warm-up (90 in three rounds whose order turns; ``--quick``,
under a minute: 20 in one round). torch uses ``--threads`` threads (default: the cores free at
start, re-checked during training as ``train.py`` does; :func:`coorddet.system.configure_threads`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

from coorddet.cli.trainer import build_trainer, quiet_lightning
from coorddet.config import build_config
from coorddet.data import CocoDataset, collate_detection
from coorddet.datamodule import CocoDataModule
from coorddet.fileio import write_json_atomic
from coorddet.inference import predict_with_proposals
from coorddet.models import build_model, list_detectors, uses_masks
from coorddet.module import DetectionModule
from coorddet.system import (
    configure_memory,
    configure_threads,
    describe_machine,
    fix_threads,
)
from data_gen import GeneratorConfig, generate

BATCH = 16
EVAL_BATCH = 64


class StepTimer(L.Callback):
    """Seconds between consecutive training batch ends; stops the fit after ``total`` steps."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.times: list[float] = []
        self.last: float | None = None

    def on_train_batch_end(self, trainer, *args: Any) -> None:  # noqa: ANN001
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now
        if len(self.times) >= self.total:
            trainer.should_stop = True


def alternated_step_times(models: dict, optimizers: dict, batches: list, *, steps: int,
                          warmup: int) -> dict[str, list[float]]:  # fmt: skip
    """Seconds of each arm's training steps after ``warmup``, the arms alternated step by step
    (their order flipped every step), so that a drift of the machine hits both alike."""
    times: dict[str, list[float]] = {arm: [] for arm in models}
    for step in range(warmup + steps):
        images, targets = batches[step % len(batches)]
        for arm in list(models) if step % 2 == 0 else list(reversed(models)):
            started = time.perf_counter()
            loss = sum(models[arm](images, targets).values())
            optimizers[arm].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[arm].step()
            if step >= warmup:
                times[arm].append(time.perf_counter() - started)
    return times


def bench_generation(out: Path) -> tuple[float, Path]:
    started = time.perf_counter()
    summary = generate(GeneratorConfig(out=str(out)))
    seconds = time.perf_counter() - started
    return sum(summary.images.values()) / seconds, out


def config_for(
    data: Path,
    out: Path,
    *,
    coordconv: bool,
    steps: int,
    precision: str = "32-true",
    detector: str = "faster-rcnn",
) -> Any:
    return build_config(
        {},
        {
            "data.data_dir": str(data),
            "data.batch_size": BATCH,
            "model.backbone": "mnist-small",
            "model.detector": detector,
            "model.coordconv": coordconv,
            "trainer.max_epochs": 1,
            "trainer.accelerator": "cpu",
            "trainer.devices": 1,
            "trainer.precision": precision,
            "trainer.limit_train_batches": steps + 1,
            "trainer.limit_val_batches": 1,  # after the timed steps
            "out": str(out),
        },
    )


def lightning_steps(
    data: Path,
    tmp: Path,
    *,
    coordconv: bool,
    steps: int,
    precision: str = "32-true",
    detector: str = "faster-rcnn",
) -> list[float]:
    """Step times of one ``train.py``-style fit (the first ``warmup`` are dropped by callers)."""
    config = config_for(data, tmp / f"run-{coordconv}-{time.monotonic_ns()}", coordconv=coordconv,
                        steps=steps, precision=precision, detector=detector)  # fmt: skip
    L.seed_everything(config.seed, verbose=False)
    datamodule = CocoDataModule(**dataclasses.asdict(config.data), masks=uses_masks(detector))
    module = DetectionModule(
        build_model(**config.model),
        **dataclasses.asdict(config.optim),
        **dataclasses.asdict(config.eval),
        run_config=config.to_dict(),
    )
    trainer = build_trainer(config, quiet=True, resume_command="python benchmarks/run.py")
    timer = StepTimer(steps)
    trainer.callbacks.append(timer)
    trainer.fit(module, datamodule=datamodule)
    return timer.times


def plain_steps(data: Path, *, steps: int) -> tuple[list[float], torch.nn.Module]:
    """The baseline in a bare loop: the same DataLoader, optimizer and schedule as Lightning's.

    Returns the step times and the trained model.
    """
    config = config_for(data, Path("unused"), coordconv=False, steps=steps)
    L.seed_everything(config.seed, verbose=False)
    datamodule = CocoDataModule(**dataclasses.asdict(config.data))
    datamodule.setup("fit")
    model = build_model(**config.model).train()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.optim.lr, momentum=config.optim.momentum,
        weight_decay=config.optim.weight_decay,
    )  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    times: list[float] = []
    last = None
    for index, (images, targets) in enumerate(datamodule.train_dataloader()):
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
        if index >= steps:
            break
    return times, model


def interleaved_ratio(
    data: Path, *, steps: int, warmup: int, detector: str = "faster-rcnn"
) -> tuple[float, dict[str, float]]:
    """CoordConv / baseline step time, the two models stepped alternately on the same batches.

    The median over steps of each step's pair of times (which arm goes first turns every step),
    so what drifts during the run (clock speed, a neighbour's load) cancels within a pair.
    Also returns each arm's median step time.
    """
    dataset = CocoDataset(data, "train", masks=uses_masks(detector))
    batches = [
        collate_detection([dataset[i] for i in range(start, start + BATCH)])
        for start in range(0, 8 * BATCH, BATCH)
    ]
    models, optimizers = {}, {}
    for arm in ("baseline", "coordconv"):
        torch.manual_seed(0)
        models[arm] = build_model(detector=detector, coordconv=arm == "coordconv").train()
        optimizers[arm] = torch.optim.SGD(models[arm].parameters(), lr=0.01, momentum=0.9)
    times = alternated_step_times(models, optimizers, batches, steps=steps, warmup=warmup)
    pairs = [cc / base for base, cc in zip(times["baseline"], times["coordconv"], strict=True)]
    median = {arm: statistics.median(values) for arm, values in times.items()}
    return statistics.median(pairs), median


def bench_detectors(
    data: Path, tmp: Path, results: dict[str, Any], *, steps: int, warmup: int
) -> dict[str, float]:
    """``train_img_per_s_<detector>`` (the baseline arm through Lightning) and
    ``coordconv_step_ratio_<detector>`` (interleaved) for every registered detector, at its
    default CoordConv sites; Faster R-CNN's are the keys measured above."""
    measured: dict[str, float] = {}
    for detector in list_detectors():
        key = detector.replace("-", "_")
        if detector == "faster-rcnn":
            measured[f"train_img_per_s_{key}"] = results["train_img_per_s_baseline"]
            measured[f"coordconv_step_ratio_{key}"] = results["coordconv_step_ratio"]
            continue
        print(f"{detector} ...", flush=True)
        times = lightning_steps(data, tmp, coordconv=False, steps=warmup + steps,
                                detector=detector)  # fmt: skip
        measured[f"train_img_per_s_{key}"] = BATCH / statistics.median(times[warmup:])
        measured[f"coordconv_step_ratio_{key}"], _ = interleaved_ratio(
            data, steps=steps, warmup=warmup, detector=detector
        )
    return measured


def eval_speed(model: torch.nn.Module, data: Path, *, batches: int, bf16: bool = False) -> float:
    dataset = CocoDataset(data, "test")
    model.eval()
    count = min(len(dataset), batches * EVAL_BATCH)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(count)), batch_size=EVAL_BATCH,
        collate_fn=collate_detection,
    )  # fmt: skip
    images_done, started = 0, None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), autocast:  # as coorddet.evaluate runs it
        for index, (images, targets) in enumerate(loader):
            if index == 1:  # the first batch is warm-up
                started, images_done = time.perf_counter(), 0
            ids = [int(t["image_id"]) for t in targets]
            predict_with_proposals(model, images, image_ids=ids)
            images_done += len(images)
    return images_done / (time.perf_counter() - started)


def compiled_speeds(data: Path, *, steps: int, warmup: int) -> dict[str, float]:
    """``--compile`` against eager, alternated step by step in one process on the same batches
    (the arm that goes first turns every step): ``plain_loop_img_per_s`` (a bare training
    loop at batch 16) and ``eval_img_per_s`` (batch 64) of each, with ``_compiled`` and
    ``_eager`` suffixes, and ``compiled_feature_max_abs_diff``: the largest difference of the
    compiled backbone's features from eager's on the same weights (fp32)."""
    from coorddet.compiling import compile_backbone

    dataset, test = CocoDataset(data, "train"), CocoDataset(data, "test")
    batches = [collate_detection([dataset[i] for i in range(s, s + BATCH)])
               for s in range(0, 4 * BATCH, BATCH)]  # fmt: skip
    models, optimizers = {}, {}
    for arm in ("eager", "compiled"):
        torch.manual_seed(0)
        models[arm] = build_model().train()
        if arm == "compiled":
            compile_backbone(models[arm])
        optimizers[arm] = torch.optim.SGD(models[arm].parameters(), lr=0.01, momentum=0.9)
    images = torch.stack(batches[0][0])
    with torch.no_grad():
        diff = (models["eager"].backbone(images) - models["compiled"].backbone(images)).abs()
    results = {"compiled_feature_max_abs_diff": float(diff.max())}
    times = alternated_step_times(models, optimizers, batches, steps=steps, warmup=warmup)
    eval_images, eval_targets = collate_detection([test[i] for i in range(EVAL_BATCH)])
    ids = [int(t["image_id"]) for t in eval_targets]
    eval_times: dict[str, list[float]] = {arm: [] for arm in models}
    with torch.inference_mode():
        for step in range(2 + max(steps // 3, 5)):
            for arm in list(models) if step % 2 == 0 else list(reversed(models)):
                started = time.perf_counter()
                predict_with_proposals(models[arm], eval_images, image_ids=ids)
                if step >= 2:
                    eval_times[arm].append(time.perf_counter() - started)
    for arm in models:
        results[f"plain_loop_img_per_s_{arm}"] = BATCH / statistics.median(times[arm])
        results[f"eval_img_per_s_{arm}"] = EVAL_BATCH / statistics.median(eval_times[arm])
    return results


@contextlib.contextmanager
def busy_neighbour() -> Iterator[None]:
    """A busy process on one core while the block runs, started through a shell that exits,
    so that it is not this process's descendant (as another user's job would not be)."""
    started = subprocess.run(
        ["sh", "-c", f"{shlex.quote(sys.executable)} -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    pid = int(started.stdout)
    try:
        time.sleep(0.5)  # running before the measurement starts
        yield
    finally:
        os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps, one round (< 2 min)")
    parser.add_argument("--out", metavar="FILE.json", help="also write the results as JSON")
    parser.add_argument("--threads", type=int, help="torch threads, fixed (default: the "
                        "cores free at start, re-checked during training)")  # fmt: skip
    args = parser.parse_args(argv)
    configure_memory()  # as train.py and coorddet.evaluate do
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        fix_threads(args.threads)  # the user's: the policy keeps it
    else:
        configure_threads()
    threads = torch.get_num_threads()
    if args.out and Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a folder; name a .json file")
    steps, warmup, rounds = (20, 5, 1) if args.quick else (30, 10, 3)
    quiet_lightning(True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="coorddet-bench-") as tmp_name:
        tmp = Path(tmp_name)
        print("generating the default dataset ...", flush=True)
        results["gen_canvases_per_s"], data = bench_generation(tmp / "data")
        lightning: dict[bool, list[float]] = {False: [], True: []}
        plain: list[float] = []
        for round_ in range(rounds):
            print(f"training, round {round_ + 1}/{rounds} ...", flush=True)
            # The order turns every round, so no arm always runs first (cold) or last.
            jobs = ["baseline", "coordconv", "plain"]
            for job in jobs[round_ % 3 :] + jobs[: round_ % 3]:
                if job == "plain":
                    times, trained = plain_steps(data, steps=warmup + steps)
                    plain += times[warmup:]
                else:
                    coordconv = job == "coordconv"
                    times = lightning_steps(data, tmp, coordconv=coordconv, steps=warmup + steps)
                    lightning[coordconv] += times[warmup:]
        results["train_img_per_s_baseline"] = BATCH / statistics.median(lightning[False])
        results["train_img_per_s_coordconv"] = BATCH / statistics.median(lightning[True])
        print("CoordConv vs baseline, interleaved ...", flush=True)
        results["coordconv_step_ratio"], _ = interleaved_ratio(data, steps=steps, warmup=warmup)
        results["plain_loop_img_per_s"] = BATCH / statistics.median(plain)
        results["lightning_overhead_ratio"] = (
            results["plain_loop_img_per_s"] / results["train_img_per_s_baseline"]
        )
        print("inference ...", flush=True)
        results["eval_img_per_s"] = eval_speed(trained, data, batches=4 if args.quick else 15)
        results["eval_img_per_s_bf16"] = eval_speed(
            trained, data, batches=4 if args.quick else 15, bf16=True
        )
        print("--compile against eager, alternated ...", flush=True)
        results |= compiled_speeds(data, steps=steps, warmup=warmup)
        print("training with bf16-mixed ...", flush=True)
        times = lightning_steps(data, tmp, coordconv=False, steps=warmup + steps,
                                precision="bf16-mixed")  # fmt: skip
        results["train_img_per_s_bf16"] = BATCH / statistics.median(times[warmup:])
        print("training beside a busy process ...", flush=True)
        with busy_neighbour():
            times = lightning_steps(data, tmp, coordconv=False, steps=warmup + steps)
        torch.set_num_threads(threads)  # as chosen at start (the run may have given one up)
        results["train_img_per_s_contended"] = BATCH / statistics.median(times[warmup:])
        results["contended_ratio"] = (
            results["train_img_per_s_contended"] / results["train_img_per_s_baseline"]
        )
        results |= bench_detectors(data, tmp, results, steps=steps, warmup=warmup)
    results = {key: round(value, 4) for key, value in results.items()} | describe_machine()
    results["quick"] = args.quick
    print_table(results)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.out), results)
        print(f"wrote {args.out}")
    return 0


TARGETS = {
    "gen_canvases_per_s": (">=", 3000),
    "train_img_per_s_baseline": (">=", 200),
    "train_img_per_s_coordconv": (">=", 200),
    "coordconv_step_ratio": ("<=", 1.02),
    "plain_loop_img_per_s": (None, None),
    "lightning_overhead_ratio": ("<=", 1.05),
    "eval_img_per_s": (">=", 400),
    "eval_img_per_s_bf16": (None, None),
    "train_img_per_s_bf16": (None, None),
    "train_img_per_s_contended": (None, None),
    "plain_loop_img_per_s_eager": (None, None),
    "plain_loop_img_per_s_compiled": (None, None),
    "eval_img_per_s_eager": (None, None),
    "eval_img_per_s_compiled": (None, None),
    "compiled_feature_max_abs_diff": (None, None),
    "contended_ratio": (">=", 0.45),
}
for _detector in list_detectors():  # every detector: fp32 training speed and CoordConv's cost
    TARGETS[f"train_img_per_s_{_detector.replace('-', '_')}"] = (">=", 60)
    TARGETS[f"coordconv_step_ratio_{_detector.replace('-', '_')}"] = ("<=", 1.05)


def print_table(results: dict[str, Any]) -> None:
    print(f"\ncoorddet benchmark ({results['cpu']}, {results['cpu_count']} CPUs, "
          f"{results['threads']} torch threads; torch {results['torch']}, torchvision "
          f"{results['torchvision']}, lightning {results['lightning']})")  # fmt: skip
    print(f"{'key':36s} {'value':>10s}  target")
    for key, (op, target) in TARGETS.items():
        value = results[key]
        if op is None:
            verdict = ""
        else:
            met = value >= target if op == ">=" else value <= target
            verdict = f"{op} {target:g}  {'met' if met else 'MISSED'}"
        print(f"{key:36s} {value:10.3f}  {verdict}")


if __name__ == "__main__":
    sys.exit(main())
