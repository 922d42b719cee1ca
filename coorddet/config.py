"""One typed training configuration: safe YAML load, command-line overrides, validation.

A config file has a few top-level keys (``name``, ``seed``, ``out``) and four sections that
map one-to-one onto constructor arguments:

- ``data:``    -> :class:`coorddet.datamodule.CocoDataModule`
- ``model:``   -> :func:`coorddet.models.build_model` (any of its keyword arguments)
- ``optim:``   -> :class:`OptimConfig` (optimizer and learning-rate schedule)
- ``trainer:`` -> :class:`TrainerConfig` (the ``lightning.Trainer`` arguments we expose)
- ``eval:``    -> :class:`EvalConfig` (metric settings, shared with ``coorddet.evaluate``)

Files are read with ``yaml.safe_load``: tags that would build Python objects are refused.
Every mistake raises :class:`~coorddet.errors.UserError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from coorddet.errors import UserError
from coorddet.fileio import write_text_atomic
from coorddet.optim import OPTIMIZERS, SCHEDULERS
from coorddet.validate import is_int, is_number

MAX_SEED = 2**32 - 1  # what numpy (and so seed_everything) accepts


@dataclass
class DataConfig:
    data_dir: str = "data/mnist-det"
    batch_size: int = 16
    # None: 0 on the CPU (bit-identical augmentation streams), up to 4 per GPU process
    num_workers: Union[int, None] = None  # noqa: UP007 - runtime type checks need typing.Union
    pin_memory: Union[bool, None] = None  # noqa: UP007 - None: on for GPUs
    augment: bool = True
    augment_policy: str = "digits"
    train_split: str = "train"  # ROOT/annotations/instances_{split}.json + ROOT/{split}/
    val_split: str = "val"
    decode: str = "auto"  # auto | memory | lazy (coorddet.data: when images stay in memory)


@dataclass
class OptimConfig:
    optimizer: str = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "cosine"
    warmup_steps: int = 100
    # For the "step" scheduler: multiply the lr by `gamma` at these epochs.
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    accelerator: str = "auto"
    devices: Union[int, str] = 1  # noqa: UP007 - runtime type checks need typing.Union here
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    limit_train_batches: Union[int, float] = 1.0  # noqa: UP007
    limit_val_batches: Union[int, float] = 1.0  # noqa: UP007
    log_every_n_steps: int = 20
    gradient_clip_val: float = 0.0
    check_val_every_n_epoch: int = 1
    compile: bool = False  # torch.compile the backbone (coorddet.compiling); not a Trainer arg


@dataclass
class EvalConfig:
    score_thresh: float = 0.5  # detections counted by det_iou / gt_iou
    rpn_top_k: int = 10  # proposals per image for rpn_iou (the paper's k)
    rpn_nms_iou: float = 0.8  # NMS IoU for those proposals (the paper's value)


@dataclass
class TrainConfig:
    name: str | None = None  # run name; default "coordconv" or "baseline"
    seed: int = 0
    out: str | None = None  # run directory; default runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        return "coordconv" if self.model.get("coordconv") else "baseline"

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.run_name

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, numbers, lists, dicts): safe for YAML and ``weights_only`` loads."""
        resolved = dataclasses.asdict(self)
        resolved["name"] = self.run_name
        resolved["out"] = str(self.out_dir)
        return resolved


_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "trainer": TrainerConfig, "eval": EvalConfig}


def model_defaults() -> dict[str, Any]:
    """The keyword arguments of :func:`coorddet.models.build_model` with their defaults."""
    from coorddet.models import model_defaults as defaults

    return defaults()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file with the safe loader; one-line errors for every failure."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise UserError(f"cannot read config {path}: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"config {path}{where}: not valid safe YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path}: the top level must be a mapping of keys")
    return data


def build_config(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Validate ``raw`` (from YAML), apply dotted ``overrides`` ("model.coordconv": True)."""
    merged = _deep_copy(raw)
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = merged
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in merged:
        if key not in known:
            raise UserError(f"unknown config key '{key}' (valid: {', '.join(sorted(known))})")

    config = TrainConfig()
    for key in ("name", "out"):
        if merged.get(key) is not None:
            setattr(config, key, _check(key, merged[key], str))
    if "seed" in merged:
        config.seed = _check("seed", merged["seed"], int)
    for section, cls in _SECTIONS.items():
        setattr(config, section, _build_section(section, cls, merged.get(section)))
    _validate(config)
    # Last: the model's defaults come from build_model, whose import (torchvision) takes
    # seconds; mistakes in the other sections are reported before it.
    config.model = _build_model_section(merged.get("model"))
    return config


def _build_section(section: str, cls: type, values: Any) -> Any:
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise UserError(f"config section '{section}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"unknown config key '{section}.{key}' (valid: {', '.join(names)})")
        kwargs[key] = _check(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def _build_model_section(values: Any) -> dict[str, Any]:
    defaults = model_defaults()
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError("config section 'model' must be a mapping")
    resolved = dict(defaults)
    for key, value in values.items():
        if key not in defaults:
            raise UserError(
                f"unknown config key 'model.{key}' (valid: {', '.join(sorted(defaults))})"
            )
        default = defaults[key]
        if default is None:  # e.g. anchor_sizes: build_model checks these itself
            resolved[key] = value
        elif isinstance(default, (list, tuple)):
            resolved[key] = list(_check(f"model.{key}", value, list))
        else:  # through _check, so that `true` is not taken for an int
            resolved[key] = _check(f"model.{key}", value, type(default))
    if "coordconv_sites" not in values:  # each detector has its own default placement
        from coorddet.models import default_sites

        resolved["coordconv_sites"] = list(default_sites(resolved["detector"]))
    # Plain data only: tuples become lists so config.yaml and checkpoints stay simple.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}


def _check(key: str, value: Any, expected: Any) -> Any:
    """Return ``value`` converted to ``expected`` or raise a UserError naming ``key``."""
    origin = typing.get_origin(expected)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(expected):
            if option is type(None) and value is None:
                return None
            try:
                return _check(key, value, option)
            except UserError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(expected))
        raise UserError(f"config key '{key}' must be {names}, got {value!r}")
    if origin is list or expected is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        (item_type,) = typing.get_args(expected) or (object,)
        return [
            value_ if item_type is object else _check(key, value_, item_type) for value_ in value
        ]
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if is_int(value):
            return value
    elif expected is float:
        if is_number(value, finite=False):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" as a string (YAML 1.1)
            try:
                return float(value)
            except ValueError:
                pass
    elif expected is str:
        if isinstance(value, str):
            return value
        if is_number(value, finite=False):
            return str(value)  # e.g. precision: 32
    elif expected is object or isinstance(value, expected):
        return value
    name = getattr(expected, "__name__", str(expected))
    raise UserError(f"config key '{key}' must be {name}, got {value!r}")


def _validate(config: TrainConfig) -> None:
    at_least = {
        "data.batch_size": (config.data.batch_size, 1),
        "data.num_workers": (0 if config.data.num_workers is None else config.data.num_workers, 0),
        "trainer.max_epochs": (config.trainer.max_epochs, 1),
        "trainer.num_nodes": (config.trainer.num_nodes, 1),
        "trainer.log_every_n_steps": (config.trainer.log_every_n_steps, 1),
        "trainer.check_val_every_n_epoch": (config.trainer.check_val_every_n_epoch, 1),
        "trainer.gradient_clip_val": (config.trainer.gradient_clip_val, 0),
        "optim.momentum": (config.optim.momentum, 0),
        "optim.weight_decay": (config.optim.weight_decay, 0),
        "optim.warmup_steps": (config.optim.warmup_steps, 0),
        "eval.rpn_top_k": (config.eval.rpn_top_k, 1),
        "seed": (config.seed, 0),
    }
    for key, (value, low) in at_least.items():
        if not value >= low or not math.isfinite(value):  # `not >=` also refuses NaN
            raise UserError(f"config key '{key}' must be >= {low}, got {value}")
    if config.seed > MAX_SEED:
        raise UserError(f"config key 'seed' must be <= {MAX_SEED}, got {config.seed}")
    for key in ("lr", "gamma"):
        value = getattr(config.optim, key)
        if not (value > 0 and math.isfinite(value)):
            raise UserError(f"config key 'optim.{key}' must be a finite number > 0, got {value}")
    if any(m < 0 for m in config.optim.milestones):
        raise UserError(
            f"config key 'optim.milestones' must be epochs >= 0, got {config.optim.milestones}"
        )
    _check_choice("optim.optimizer", config.optim.optimizer, OPTIMIZERS)
    _check_choice("optim.scheduler", config.optim.scheduler, SCHEDULERS)
    for key in ("limit_train_batches", "limit_val_batches"):
        value = getattr(config.trainer, key)
        if not (value >= 1 if isinstance(value, int) else 0.0 < value <= 1.0):
            raise UserError(
                f"config key 'trainer.{key}' must be a fraction in (0, 1] or a batch count >= 1,"
                f" got {value}"
            )
    _check_devices(config.trainer.devices)
    strategy = config.trainer.strategy
    if "spawn" in strategy or "fork" in strategy:
        # Those run training in child processes: the launching one, which writes metrics.json,
        # would never see the results.
        raise UserError(
            f"config key 'trainer.strategy' {strategy!r} is not supported by train.py; "
            "use ddp (it launches one process per device itself)"
        )
    if config.trainer.precision in ("16-true", "bf16-true"):
        raise UserError(
            f"config key 'trainer.precision' {config.trainer.precision!r} is not supported: "
            "torchvision's detection ops need float32; use bf16-mixed or 16-mixed"
        )
    for key in ("score_thresh", "rpn_nms_iou"):
        value = getattr(config.eval, key)
        if not 0.0 <= value <= 1.0:
            raise UserError(f"config key 'eval.{key}' must be in [0, 1], got {value}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"config key '{key}' must be one of {', '.join(choices)}, got {value!r}")


def _check_devices(devices: int | str) -> None:
    """Lightning's forms: a count >= 1, -1 or "auto" (all), or a list of indices like "0,1"."""
    if isinstance(devices, int):
        ok = devices >= 1 or devices == -1
    else:
        text = devices.strip()
        parts = [part.strip() for part in text.split(",") if part.strip()]
        ok = text in ("auto", "-1") or (bool(parts) and all(part.isdigit() for part in parts))
    if not ok:
        raise UserError(
            f"config key 'trainer.devices' must be a count >= 1, -1, auto or a list like 0,1;"
            f" got {devices!r}"
        )


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def dump_yaml(config: TrainConfig, path: Path) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
