"""``python train.py`` / ``coorddet-train``: YAML + flags -> config -> objects -> ``Trainer.fit``.

Lightning runs the loops, devices, DDP (CPU gloo to multi-node NCCL), precision, checkpoints
and logs. This file only wires the pieces together and writes the run directory:

    OUT/checkpoints/last.ckpt   every epoch        OUT/config.yaml    the resolved config
    OUT/checkpoints/best.ckpt   best validation map  OUT/metrics.json   final validation metrics
    OUT/logs/metrics.csv        per-step and per-epoch logs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coorddet.cli import ArgumentParser, run
from coorddet.config import DataConfig, TrainConfig, build_config, dump_yaml, load_yaml
from coorddet.errors import UserError

DATA_GEN_HINT = "python -m data_gen --out {data}"


def parse_args(argv: Sequence[str] | None) -> tuple[Any, dict[str, Any]]:
    """Return the parsed namespace and the config overrides it asks for (dotted keys)."""
    parser = ArgumentParser(
        prog="train.py",
        description="Train a Faster R-CNN (baseline or CoordConv) on a data_gen dataset. "
        "Flags override --config, which overrides the built-in defaults.",
    )
    bool_flag = argparse.BooleanOptionalAction
    add = parser.add_argument
    add("--config", metavar="FILE.yaml", help="YAML config (sections data/model/optim/trainer/eval)")
    add("--name", help="run name (default: coordconv or baseline)")
    add("--out", metavar="DIR", help="run directory (default: runs/<name>)")
    add("--coordconv", action=bool_flag, help="inject CoordConv layers (default: off)")
    add("--coordconv-sites", metavar="SITES", help="comma-separated sites, e.g. "
        "backbone-stem,rpn-head,rpn-box (the paper's placement, the default)")  # fmt: skip
    add("--with-r", action=bool_flag, help="add the radius channel to CoordConv layers")
    add("--backbone", help="mnist-small (default), resnet50-fpn or mobilenet-v3-fpn")
    add("--data", metavar="DIR", help=f"dataset written by data_gen (default: {DataConfig.data_dir})")
    add("--max-epochs", type=int, help="epochs to train")
    add("--batch-size", type=int, help="images per batch per device")
    add("--lr", type=float, help="peak learning rate")
    add("--optimizer", choices=("sgd", "adamw", "adam"), help="optimizer")
    add("--seed", type=int, help="random seed (model init, data order, augmentation)")
    add("--accelerator", help="cpu, gpu, auto, ... (Lightning)")
    add("--devices", help="devices per node: a count, a list like 0,1, or auto")
    add("--strategy", help="auto, ddp, ddp_spawn, ... (Lightning)")
    add("--num-nodes", type=int, help="number of nodes (torchrun or SLURM)")
    add("--precision", help="32-true, bf16-mixed (CPU or GPU), 16-mixed (GPU)")
    add("--num-workers", type=int, help="DataLoader workers per process")
    add("--augment", action=bool_flag, help="albumentations on the training split (default: on)")
    add("--resume", metavar="last|PATH", help="continue from OUT/checkpoints/last.ckpt or PATH")
    add("--limit-train-batches", type=number, metavar="N|FRAC", help="batches (int) or fraction")
    add("--limit-val-batches", type=number, metavar="N|FRAC", help="batches (int) or fraction")
    add("--overwrite", action="store_true", help="replace an existing run directory")
    add("--quiet", action="store_true", help="no progress bar or model summary (CI logs)")
    args = parser.parse_args(argv)

    mapping = {
        "name": "name", "out": "out", "seed": "seed",
        "coordconv": "model.coordconv", "with_r": "model.with_r", "backbone": "model.backbone",
        "data": "data.data_dir", "batch_size": "data.batch_size",
        "num_workers": "data.num_workers", "augment": "data.augment",
        "lr": "optim.lr", "optimizer": "optim.optimizer",
        "max_epochs": "trainer.max_epochs", "accelerator": "trainer.accelerator",
        "devices": "trainer.devices", "strategy": "trainer.strategy",
        "num_nodes": "trainer.num_nodes", "precision": "trainer.precision",
        "limit_train_batches": "trainer.limit_train_batches",
        "limit_val_batches": "trainer.limit_val_batches",
    }  # fmt: skip
    overrides = {key: getattr(args, flag) for flag, key in mapping.items()}
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


def _is_rank_zero() -> bool:
    """False in the extra processes that DDP launchers start (they re-run this script)."""
    return all(os.environ.get(var, "0") == "0" for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def _prepare_out_dir(config: TrainConfig, args: Any) -> Path | None:
    """Check or create the run directory; return the checkpoint to resume from, if any."""
    out = config.out_dir
    resume: Path | None = None
    if args.resume:
        resume = out / "checkpoints" / "last.ckpt" if args.resume == "last" else Path(args.resume)
        if not resume.is_file():
            raise UserError(f"--resume: no checkpoint at {resume}")
        return resume
    if out.exists() and any(out.iterdir()) and _is_rank_zero():
        if not args.overwrite:
            raise UserError(
                f"run directory {out} exists and is not empty; pass --resume last to continue "
                "it, --overwrite to replace it, or --out for a new one"
            )
        shutil.rmtree(out)
    return None


def _open_data(config: TrainConfig) -> Any:
    from coorddet.data import CocoDataModule

    hint = DATA_GEN_HINT.format(data=config.data.data_dir)
    try:
        datamodule = CocoDataModule(**dataclasses.asdict(config.data))
        datamodule.setup("fit")
    except UserError as error:
        message = str(error)
        if "data_gen" not in message:
            message += f" (create a dataset with: {hint})"
        raise UserError(message) from None
    return datamodule


def _build_module(config: TrainConfig) -> Any:
    from coorddet.models import build_model
    from coorddet.module import DetectionModule

    try:
        model = build_model(**config.model)
    except (ValueError, TypeError) as error:
        raise UserError(f"model config: {error}") from None
    return DetectionModule(
        model,
        **dataclasses.asdict(config.optim),
        **dataclasses.asdict(config.eval),
        run_config=config.to_dict(),
    )


def _trainer(config: TrainConfig, quiet: bool) -> Any:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger

    from coorddet.module import RandomStateCallback

    out = config.out_dir
    callbacks: list[Any] = [
        ModelCheckpoint(
            dirpath=out / "checkpoints",
            filename="best",
            monitor="map",
            mode="max",
            save_top_k=1,
            save_last=True,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        ),
        RandomStateCallback(),
    ]
    if not quiet:
        callbacks.append(RichProgressBar(leave=True))
    loggers: list[Any] = [CSVLogger(out, name="", version="logs")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out, name="", version="tensorboard"))
    except ModuleNotFoundError:  # tensorboard is optional
        pass
    trainer_args = dataclasses.asdict(config.trainer)
    trainer_args["gradient_clip_val"] = trainer_args["gradient_clip_val"] or None
    return L.Trainer(
        **trainer_args,
        callbacks=callbacks,
        logger=loggers,
        enable_progress_bar=not quiet,
        enable_model_summary=not quiet,
        default_root_dir=out,
        num_sanity_val_steps=0,
    )


def _quiet_libraries(quiet: bool) -> None:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    if quiet:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def main_unsafe(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    raw = load_yaml(args.config) if args.config else {}
    config = build_config(raw, overrides)

    import lightning as L

    _quiet_libraries(args.quiet)  # after the import: lightning sets its loggers' levels on import

    from coorddet.module import NonFiniteLossError, final_metrics

    resume = _prepare_out_dir(config, args)
    datamodule = _open_data(config)
    L.seed_everything(config.seed, workers=True, verbose=not args.quiet)
    module = _build_module(config)
    trainer = _trainer(config, args.quiet)
    out = config.out_dir
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(config, out / "config.yaml")

    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except NonFiniteLossError as error:
        print(f"error: {error}; best.ckpt was kept as it was", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    if not trainer.is_global_zero:
        return 0
    images = module.train_images * trainer.world_size
    metrics = {
        **final_metrics(module),
        "epochs": int(trainer.current_epoch),
        "train_seconds": round(seconds, 3),
        "train_img_per_s": round(images / module.train_seconds, 2) if module.train_seconds else 0,
    }
    _write_json(out / "metrics.json", metrics)
    if not args.quiet:
        shown = ", ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if k in ("map", "map_50", "rpn_iou", "gt_iou")
            and v is not None
        )  # fmt: skip
        print(f"{config.run_name}: {metrics['epochs']} epochs in {seconds:.1f} s; {shown}")
    print(f"run written to {out}/ (checkpoints/best.ckpt, metrics.json, config.yaml)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(main_unsafe, argv)


if __name__ == "__main__":
    raise SystemExit(main())
