"""``python train.py`` / ``coorddet-train``: YAML + flags -> config -> objects -> ``Trainer.fit``.

Lightning runs the loops, devices, DDP (CPU gloo to multi-node NCCL), precision, checkpoints
and logs. This file only wires the pieces together; :mod:`coorddet.cli.rundir` describes and
guards the run directory it writes.

One process at a time writes a run directory (:func:`coorddet.locking.hold_folder`; under DDP
the launching process holds it for all).

Exit codes: 0 done (or nothing left to do), 2 a user mistake (one line on stderr, e.g. the run
directory is in use), 1 a fault (one line: the loss became NaN/inf, a write failed, a DDP worker
died; checkpoints are left as they were) or Ctrl-C during training (Lightning's handler), 130
Ctrl-C before it, 143 SIGTERM (resume with ``--resume last``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

from coorddet.cli import (
    FAULT_EXIT,
    ArgumentParser,
    add_threads_option,
    one_line,
    report_errors,
    threads_option,
)
from coorddet.cli.rundir import (
    ResumePoint,
    auto_resume,
    check_out_dir,
    is_rank_zero,
    read_resume_point,
    resume_path,
    run_identity,
    trim_csv_log,
)
from coorddet.config import DataConfig, TrainConfig, build_config, dump_yaml, load_yaml
from coorddet.dataset_layout import data_gen_hint, require_dataset
from coorddet.errors import UserError
from coorddet.fileio import write_json_atomic
from coorddet.locking import hold_folder
from coorddet.optim import OPTIMIZERS
from coorddet.system import configure_process

# flag (argparse dest) -> the config key it overrides
FLAG_KEYS = {
    "name": "name", "out": "out", "seed": "seed",
    "coordconv": "model.coordconv", "with_r": "model.with_r", "backbone": "model.backbone",
    "detector": "model.detector", "coordconv_extent": "model.coordconv_extent",
    "keep_image_size": "model.keep_image_size",
    "data": "data.data_dir", "batch_size": "data.batch_size",
    "num_workers": "data.num_workers", "augment": "data.augment",
    "pin_memory": "data.pin_memory", "compile": "trainer.compile",
    "train_split": "data.train_split", "val_split": "data.val_split",
    "lr": "optim.lr", "optimizer": "optim.optimizer",
    "max_epochs": "trainer.max_epochs", "accelerator": "trainer.accelerator",
    "devices": "trainer.devices", "strategy": "trainer.strategy",
    "num_nodes": "trainer.num_nodes", "precision": "trainer.precision",
    "limit_train_batches": "trainer.limit_train_batches",
    "limit_val_batches": "trainer.limit_val_batches",
}  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> tuple[Any, dict[str, Any]]:
    """Return the parsed namespace and the config overrides it asks for (dotted keys)."""
    parser = ArgumentParser(
        prog="train.py",
        description="Train a detector (baseline or CoordConv) on a data_gen dataset. "
        "Flags override --config, which overrides the built-in defaults.",
    )
    bool_flag = argparse.BooleanOptionalAction
    add = parser.add_argument
    add(
        "--config", metavar="FILE.yaml", help="YAML config (sections data/model/optim/trainer/eval)"
    )
    add("--name", help="run name (default: coordconv or baseline)")
    add("--out", metavar="DIR", help="run directory (default: runs/<name>)")
    add("--coordconv", action=bool_flag, help="inject CoordConv layers (default: off)")
    add("--coordconv-sites", metavar="SITES", help="comma-separated sites, e.g. "
        "backbone-stem,rpn-head,rpn-box (the paper's placement, the R-CNNs' default; "
        "one-stage detectors: backbone-stem,head-box)")  # fmt: skip
    add("--with-r", action=bool_flag, help="add the radius channel to CoordConv layers")
    add("--coordconv-extent", choices=("image", "batch"), help="what image-aligned "
        "coordinates span in a padded batch: each image's own extent ('image', the default) "
        "or the padded tensor ('batch', as other CoordConv implementations; an ablation)")  # fmt: skip
    add("--detector", help="faster-rcnn (default), mask-rcnn, retinanet, fcos, ssdlite or "
        "rpn-only")  # fmt: skip
    add("--backbone", help="mnist-small (default), resnet50-fpn or mobilenet-v3-fpn")
    add("--keep-image-size", action=bool_flag, help="feed images at their own size, never "
        "resized, so batches of mixed sizes are zero-padded (default: off: torchvision's "
        "min_size/max_size resizing)")  # fmt: skip
    add(
        "--data",
        metavar="DIR",
        help=f"dataset written by data_gen (default: {DataConfig.data_dir})",
    )
    add("--train-split", metavar="NAME", help="split to train on, e.g. train2017 (default: "
        f"{DataConfig.train_split})")  # fmt: skip
    add("--val-split", metavar="NAME", help="split to validate on, e.g. val2017 (default: "
        f"{DataConfig.val_split})")  # fmt: skip
    add("--max-epochs", type=int, help="epochs to train")
    add("--batch-size", type=int, help="images per batch per device")
    add("--lr", type=float, help="peak learning rate")
    add("--optimizer", choices=OPTIMIZERS, help="optimizer")
    add("--seed", type=int, help="random seed (model init, data order, augmentation)")
    add("--accelerator", help="cpu, gpu, auto, ... (Lightning)")
    add("--devices", help="devices per node: a count, a list like 0,1, or auto")
    add("--strategy", help="auto, ddp, ddp_spawn, ... (Lightning)")
    add("--num-nodes", type=int, help="number of nodes (torchrun or SLURM)")
    add("--precision", help="32-true, bf16-mixed (CPU or GPU), 16-mixed (GPU)")
    add("--num-workers", type=int, help="DataLoader workers per process (default: 0 on the CPU, "
        "up to 4 per GPU process)")  # fmt: skip
    add("--pin-memory", action=bool_flag, help="pinned host memory for batches, copied to the "
        "GPU asynchronously (default: on for GPUs)")  # fmt: skip
    add("--augment", action=bool_flag, help="albumentations on the training split (default: on)")
    add("--compile", action=bool_flag, help="torch.compile the backbone (default: off; "
        "docs/speed.md has where it pays)")  # fmt: skip
    add("--resume", metavar="last|auto|PATH", help="continue from OUT/checkpoints/last.ckpt "
        "or PATH: epoch, weights, optimizer, schedule and RNG state; model settings come from "
        "the checkpoint; --max-epochs may be raised. auto: continue when OUT holds this run's "
        "last.ckpt, else start it (one command for a first run and a requeue)")  # fmt: skip
    add("--limit-train-batches", type=number, metavar="N|FRAC", help="batches (int) or fraction")
    add("--limit-val-batches", type=number, metavar="N|FRAC", help="batches (int) or fraction")
    add("--overwrite", action="store_true", help="delete and replace an existing run directory")
    add_threads_option(parser)
    add("--quiet", action="store_true", help="no progress bar or model summary (CI logs)")
    args = parser.parse_args(argv)
    threads_option(parser, args)
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite contradict each other; pass one of them")

    overrides = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if args.coordconv_sites is not None:
        overrides["model.coordconv_sites"] = [s for s in args.coordconv_sites.split(",") if s]
    if "trainer.devices" in overrides and overrides["trainer.devices"].isdigit():
        overrides["trainer.devices"] = int(overrides["trainer.devices"])
    return args, overrides


def number(text: str) -> int | float:
    """An int when it looks like one (a batch count), else a float (a fraction)."""
    try:
        return int(text)
    except ValueError:
        return float(text)  # argparse turns the ValueError into a one-line error


# model settings the dataset decides unless the config or a flag sets them
FROM_DATA = {"num_classes", "image_channels", "min_size", "max_size"}


def _open_data(config: TrainConfig, *, from_data: set[str], quiet: bool) -> Any:
    """The opened datamodule. The model settings named in ``from_data`` (of :data:`FROM_DATA`)
    are set from the training split: ``num_classes`` (its categories + 1, the background),
    ``image_channels`` (3 if either split holds colour images, else 1) and
    ``min_size``/``max_size`` (:func:`coorddet.models.default_image_sizes`); the resolved
    channels and sizes are printed once. A ``num_classes`` set by the config is checked
    against the categories."""
    from coorddet.datamodule import CocoDataModule
    from coorddet.models import default_image_sizes, uses_masks

    hint = data_gen_hint(config.data.data_dir)
    masks = uses_masks(config.model["detector"])
    try:
        datamodule = CocoDataModule(**dataclasses.asdict(config.data), masks=masks)
        datamodule.setup("fit")
    except UserError as error:
        message = str(error)
        if "data_gen" not in message:
            message += f" (create a dataset with: {hint})"
        raise UserError(message) from None
    train = datamodule.train_dataset
    if "image_channels" in from_data:
        config.model["image_channels"] = datamodule.channels
    if {"min_size", "max_size"} & from_data:
        min_size, max_size = default_image_sizes(config.model["backbone"], train.image_sizes)
        config.model.update({k: v for k, v in (("min_size", min_size), ("max_size", max_size))
                             if k in from_data})  # fmt: skip
    if from_data - {"num_classes"} and not quiet and is_rank_zero():  # once, not per process
        sizes = sorted(train.image_sizes)
        shown = ", ".join(f"{w}x{h}" for w, h in sizes[:3]) + (", ..." if len(sizes) > 3 else "")
        model = config.model
        print(f"images ({shown}, {'colour' if datamodule.channels == 3 else 'gray'}): "
              f"model.image_channels {model['image_channels']}, model.min_size "
              f"{model['min_size']}, model.max_size {model['max_size']} (set them in the "
              "config to choose others)")  # fmt: skip
    classes = train.num_classes
    if "num_classes" in from_data:
        config.model["num_classes"] = classes
    elif classes > config.model["num_classes"]:
        raise UserError(
            f"{config.data.data_dir} has {classes - 1} categories but model.num_classes "
            f"is {config.model['num_classes']} (it counts the background); set it to {classes}"
        )
    return datamodule


def _resolve_resume(config: TrainConfig, point: ResumePoint, explicit: set[str]) -> None:
    """Build the model the checkpoint was trained with; refuse model settings that contradict it."""
    conflicts = [
        f"{key}={config.model[key]!r} (checkpoint: {point.model_config[key]!r})"
        for key in sorted(explicit)
        if key in point.model_config and config.model.get(key) != point.model_config[key]
    ]
    if conflicts:
        raise UserError(
            f"--resume {point.path}: the checkpoint was trained with other model settings: "
            f"{'; '.join(conflicts)}. Resume with the original settings or start a new --out"
        )
    config.model = {**config.model, **point.model_config}


def _build_module(config: TrainConfig, resume: ResumePoint | None) -> Any:
    from coorddet.models import build_model
    from coorddet.module import DetectionModule

    if resume is not None:  # Lightning loads them again, but with a traceback when they misfit
        model = resume.checkpoint.build_model().train()
    else:
        try:
            model = build_model(**config.model)
        except (ValueError, TypeError) as error:
            raise UserError(f"model config: {error}") from None
    if config.trainer.compile:
        from coorddet.compiling import compile_backbone

        compile_backbone(model)
    return DetectionModule(
        model,
        **dataclasses.asdict(config.optim),
        **dataclasses.asdict(config.eval),
        run_config=config.to_dict(),
    )


def resume_command(argv: Sequence[str] | None) -> str:
    """The command line that continues this run: the same flags, ``--resume last``."""
    words, kept = list(sys.argv[1:] if argv is None else argv), []
    while words:
        word = words.pop(0)
        if word == "--resume" and words:
            words.pop(0)
        elif word != "--overwrite" and not word.startswith("--resume="):
            kept.append(word)
    return shlex.join(["python", "train.py", *kept, "--resume", "last"])


def train_command(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    raw = load_yaml(args.config) if args.config else {}
    config = build_config(raw, overrides)
    # Quick checks first: a mistake is reported before the seconds-long imports below.
    data = config.data
    require_dataset(data.data_dir, [data.train_split, data.val_split], flag="--data")
    if not is_rank_zero():  # a DDP process started by process 0, which holds the run directory
        return _train(args, argv, raw, overrides, config)
    with hold_folder(config.out_dir):  # before any check of it: they hold only while it is held
        return _train(args, argv, raw, overrides, config)


def _train(
    args: Any,
    argv: Sequence[str] | None,
    raw: dict[str, Any],
    overrides: dict[str, Any],
    config: TrainConfig,
) -> int:
    out = config.out_dir
    rank_zero = is_rank_zero()
    replace = args.overwrite
    if args.resume == "auto":  # this run's checkpoint if the folder has one, else a fresh start
        checkpoint, replace = auto_resume(out, run_identity(config.to_dict()))
        replace = replace and rank_zero  # DDP's other processes never delete
    else:
        checkpoint = resume_path(args.resume, out) if args.resume else None
    if checkpoint is None and rank_zero:
        check_out_dir(out, overwrite=replace)

    import lightning as L

    from coorddet.cli.trainer import build_trainer, quiet_lightning

    quiet_lightning(args.quiet)  # after the import: lightning sets its loggers' levels on import

    from coorddet.system import share_threads

    resume = read_resume_point(checkpoint) if checkpoint else None
    if resume is not None and args.resume == "auto":
        found = run_identity(resume.checkpoint.config)
        if found != run_identity(config.to_dict()):
            raise UserError(f"--resume auto: {checkpoint} is another run's checkpoint ({found}); "
                            "pass --overwrite to replace the run or choose another --out")  # fmt: skip
    # Model settings the user gave (config file or flags): never replaced by the data's.
    explicit = set(raw.get("model") or {}) | {
        key.removeprefix("model.") for key in overrides if key.startswith("model.")
    }
    if resume is not None:
        _resolve_resume(config, resume, explicit)
        if resume.completed_epochs >= config.trainer.max_epochs:
            print(
                f"{resume.path} has already trained {resume.completed_epochs} epochs "
                f"(max_epochs {config.trainer.max_epochs}): nothing to do; pass a larger "
                "--max-epochs to train further",
                file=sys.stderr,
            )
            return 0
    from_data = set() if resume is not None else FROM_DATA - explicit
    datamodule = _open_data(config, from_data=from_data, quiet=args.quiet)
    L.seed_everything(config.seed, workers=True, verbose=not args.quiet)
    module = _build_module(config, resume)
    trainer = build_trainer(config, quiet=args.quiet, resume_command=resume_command(argv))
    if trainer.world_size > 1:
        share_threads(trainer.num_devices)  # DDP: the free cores, divided; inherited
    if rank_zero:  # DDP's other processes start inside fit(), after this
        _write_run_dir(config, overwrite=replace, resume=resume)

    started = time.perf_counter()
    failed = _fit(trainer, module, datamodule, checkpoint, out=out, rank_zero=rank_zero)
    if failed is not None:
        return failed
    seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return 0
    return _report(args, config, trainer, module, seconds)


def _write_run_dir(config: TrainConfig, *, overwrite: bool, resume: ResumePoint | None) -> None:
    """Process 0, before training: the run directory (emptied for ``--overwrite``), its
    ``config.yaml``, and a resumed run's CSV log cut back to the checkpoint's epochs."""
    out = config.out_dir
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(config, out / "config.yaml")
    if resume is not None:
        trim_csv_log(out / "logs" / "metrics.csv", resume.completed_epochs)


def _fit(
    trainer: Any, module: Any, datamodule: Any, checkpoint: Any, *, out: Any, rank_zero: bool
) -> int | None:
    """``trainer.fit``: None when it finished, else this process's exit code, its one line
    printed (a NaN/inf loss, SIGTERM, a dead DDP worker, a failed write)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from coorddet.cli.workers import report_dead_worker, stop_workers
    from coorddet.module import NonFiniteLossError

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
    except NonFiniteLossError as error:
        if rank_zero:
            print(f"error: {error}; checkpoints were left as they were", file=sys.stderr)
            return 1
        return 0  # process 0 reports it; a failing child would make Lightning kill process 0
    except SIGTERMException:  # Lightning's is a SystemExit with status 0: not a success here
        if rank_zero:
            print(
                f"terminated by SIGTERM; continue with: --out {out} --resume last", file=sys.stderr
            )
        return 143
    except Exception as error:
        if not rank_zero:
            raise
        # A killed worker reaches process 0 as gloo's or NCCL's error in the next collective.
        if report_dead_worker(trainer):  # its one line is printed
            stop_workers(trainer)
            return FAULT_EXIT
        line, code = one_line(error)  # e.g. a failed write
        if line:  # printed before the workers stop: Lightning then SIGKILLs this process
            print(line, file=sys.stderr, flush=True)
        stop_workers(trainer)  # they would wait for process 0 or print tracebacks of their own
        if not line:
            raise
        return code
    return None


def _report(args: Any, config: TrainConfig, trainer: Any, module: Any, seconds: float) -> int:
    """Process 0, after training: ``metrics.json`` and the closing lines."""
    from coorddet.cli.trainer import ThreadWatch
    from coorddet.module import final_metrics

    out = config.out_dir
    images = module.train_images * trainer.world_size
    metrics = {
        **final_metrics(module),
        "epochs": int(trainer.current_epoch),
        "train_seconds": round(seconds, 3),
        "train_img_per_s": round(images / module.train_seconds, 2) if module.train_seconds else 0,
    }
    write_json_atomic(out / "metrics.json", metrics)
    if not args.quiet:
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if k in ("map", "map_50", "rpn_iou", "gt_iou")
            and v is not None
        )  # fmt: skip
        print(f"{config.run_name}: {metrics['epochs']} epochs in {seconds:.1f} s; {shown}")
        threads = next(c.threads for c in trainer.callbacks if isinstance(c, ThreadWatch))
        print(f"torch threads at the start of training, per process: {threads} "
              f"({_thread_source(args.threads)})")  # fmt: skip
    print(f"run written to {out}/ (checkpoints/best.ckpt, metrics.json, config.yaml)")
    return 0


def _thread_source(flag: int | None) -> str:
    from coorddet.system import CHOSEN, user_chose_threads

    if flag is not None:
        return f"--threads {flag}"
    if user_chose_threads():
        return "OMP_NUM_THREADS/MKL_NUM_THREADS, as set"
    return "chosen from the free cores" if CHOSEN in os.environ else "torch's default"


def main(argv: Sequence[str] | None = None) -> int:
    configure_process()  # memory and threads, before the command imports torch
    return report_errors(train_command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
