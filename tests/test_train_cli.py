"""``python train.py``: the command line and the run directory it writes, in subprocesses.

Real tiny data (``data_gen``) and real training, cut short with ``--limit-*-batches``. The
costly runs are few: the shared ``smoke_runs``, one rerun (same seed), one 2-process DDP run,
one run started and, killed by SIGKILL, resumed by ``--resume auto``, one resume whose loss
becomes NaN.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, assert_user_error, run_cli

from data_gen import GeneratorConfig, generate

METRIC_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large",
               "mar_1", "mar_10", "mar_100", "rpn_iou", "det_iou", "gt_iou")  # fmt: skip
SMOKE = ("train.py", "--config", "configs/smoke.yaml")
# Python's default warning filters, as a user gets them (run_cli's default hides warnings).
USER_WARNINGS = {"PYTHONWARNINGS": ""}


def train(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(*SMOKE, *map(str, args), env=env)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def validation_epochs(rows: list[dict[str, str]]) -> list[int]:
    return [int(float(row["epoch"])) for row in rows if row.get("map")]


def metric_values(run: Path) -> dict[str, float | None]:
    metrics = json.loads((run / "metrics.json").read_text())
    return {key: metrics[key] for key in METRIC_KEYS}


def assert_same_metrics(got: dict, expected: dict, tol: float = 1e-6) -> None:
    for key in METRIC_KEYS:
        a, b = got[key], expected[key]
        if a is None or b is None or math.isnan(a) or math.isnan(b):
            assert (a is None or math.isnan(a)) and (b is None or math.isnan(b)), (key, a, b)
        else:
            assert abs(a - b) <= tol, (key, a, b)


# --- command line --------------------------------------------------------------------------


def test_help_lists_every_flag() -> None:
    result = run_cli("train.py", "--help")
    assert result.returncode == 0, result.stderr
    flags = (
        "--config --coordconv --no-coordconv --coordconv-sites --with-r --backbone --data --out "
        "--max-epochs --batch-size --lr --optimizer --seed --accelerator --devices --strategy "
        "--num-nodes --precision --num-workers --augment --no-augment --resume "
        "--limit-train-batches --limit-val-batches --quiet --overwrite --train-split --val-split"
    ).split()
    for flag in flags:
        assert flag in result.stdout, flag


# --- outputs of the smoke runs -------------------------------------------------------------


@pytest.mark.parametrize("name", ["baseline", "coordconv"])
def test_smoke_run_writes_the_pinned_outputs(smoke_runs: dict[str, Path], name: str) -> None:
    from coorddet.coordconv import CoordConv2d
    from coorddet.models import build_model

    run = smoke_runs[name]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["coordconv"] is (name == "coordconv")
    assert config["name"] == name and config["out"] == str(run)

    for checkpoint in ("last.ckpt", "best.ckpt"):
        state = torch.load(run / "checkpoints" / checkpoint, map_location="cpu", weights_only=True)
        model = build_model(**config["model"])
        weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items()}
        model.load_state_dict(weights)  # strict: the resolved config rebuilds this exact model
        assert any(isinstance(m, CoordConv2d) for m in model.modules()) is (name == "coordconv")
        assert state["coorddet"]["config"]["model"] == config["model"]
        assert [c["name"] for c in state["coorddet"]["categories"]] == [str(d) for d in range(10)]

    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == {*METRIC_KEYS, "epochs", "train_seconds", "train_img_per_s"}
    assert metrics["epochs"] == 1
    assert metrics["train_seconds"] > 0 and metrics["train_img_per_s"] > 0
    for key in METRIC_KEYS:
        assert metrics[key] is None or 0.0 <= metrics[key] <= 1.0, key
    assert metrics["map"] is not None and metrics["rpn_iou"] is not None

    rows = read_csv(run / "logs" / "metrics.csv")
    assert validation_epochs(rows) == [0]
    assert {"loss", "loss_classifier", "loss_box_reg", "loss_objectness", "img_s"} <= set(rows[0])
    assert sum(1 for row in rows if row.get("loss")) == 3  # smoke.yaml: limit_train_batches 3
    assert not list(run.rglob(".*.tmp"))


def test_tensorboard_logs_beside_the_csv_log(smoke_runs: dict[str, Path]) -> None:
    pytest.importorskip("tensorboard", reason='not installed: pip install -e ".[tensorboard]"')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(smoke_runs["baseline"] / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "map", "rpn_iou"} <= scalars, scalars
    assert len(events.Scalars("loss")) == 3  # one per logged training step, as metrics.csv


def test_same_seed_same_metrics_and_overwrite(
    smoke_runs: dict[str, Path], tiny_dataset: Path, tmp_path: Path
) -> None:
    """Rerun the smoke baseline (not quiet, into a non-empty dir with --overwrite)."""
    out = tmp_path / "again"
    out.mkdir()
    (out / "old-file").write_text("replaced by --overwrite")
    result = train("--data", tiny_dataset, "--out", out, "--no-coordconv", "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "old-file").exists()
    assert_same_metrics(metric_values(out), metric_values(smoke_runs["baseline"]), tol=0.0)
    # Not quiet: the Rich progress bar shows the loss and images/s; no Lightning advert.
    assert "loss" in result.stdout and "img_s" in result.stdout, result.stdout[-2000:]
    assert "images (64x64, gray): model.image_channels 1, model.min_size 64, model.max_size 64" in (
        result.stdout
    )
    assert "Tip" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_split_flags_train_on_coco_2017_style_names(
    smoke_runs: dict[str, Path], tiny_dataset: Path, tmp_path: Path
) -> None:
    """The tiny dataset with COCO 2017's split names trains as the smoke baseline did."""
    data = tmp_path / "coco2017"
    for split, renamed in (("train", "train2017"), ("val", "val2017")):
        shutil.copytree(tiny_dataset / split, data / renamed)
        (data / "annotations").mkdir(exist_ok=True)
        shutil.copy(
            tiny_dataset / "annotations" / f"instances_{split}.json",
            data / "annotations" / f"instances_{renamed}.json",
        )
    plain = train("--data", data, "--out", tmp_path / "plain", "--no-coordconv", "--quiet")
    assert plain.returncode == 2 and "instances_train.json" in plain.stderr
    assert "splits there: train2017, val2017" in plain.stderr
    out = tmp_path / "run"
    result = train("--data", data, "--out", out, "--no-coordconv", "--quiet",
                   "--train-split", "train2017", "--val-split", "val2017")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_metrics(metric_values(out), metric_values(smoke_runs["baseline"]), tol=0.0)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["data"]["train_split"], saved["data"]["val_split"]) == ("train2017", "val2017")
    model = saved["model"]  # resolved from the data: 64 px canvases are never resized
    assert (model["num_classes"], model["min_size"], model["max_size"]) == (11, 64, 64)


# --- DDP -----------------------------------------------------------------------------------


def test_last_checkpoint_is_the_last_epoch_even_when_the_metric_does_not_improve(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    # lr 1e-30 leaves the weights as they were, so validation map never improves after
    # epoch 0: best.ckpt stays there, last.ckpt must still follow every epoch.
    out = tmp_path / "flat"
    result = train("--data", tiny_dataset, "--out", out, "--max-epochs", "3", "--lr", "1e-30",
                   "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    load = lambda name: torch.load(out / "checkpoints" / name, weights_only=True)  # noqa: E731
    last, best = load("last.ckpt"), load("best.ckpt")
    assert (best["epoch"], last["epoch"]) == (0, 2)
    assert last["global_step"] > best["global_step"]


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 validation images: 2 processes pad them to 6, so one image is scored twice."""
    out = tmp_path_factory.mktemp("odd") / "mnist-det"
    generate(GeneratorConfig(out=str(out), train=16, val=5, test=1, seed=1, workers=1))
    return out


def validate_on_one_process(run: Path) -> dict[str, float]:
    """``trainer.validate`` of ``run``'s last.ckpt in this process, built from config.yaml."""
    import dataclasses

    import lightning as L

    from coorddet.config import build_config
    from coorddet.datamodule import CocoDataModule
    from coorddet.models import build_model
    from coorddet.module import DetectionModule

    config = build_config(yaml.safe_load((run / "config.yaml").read_text()))
    module = DetectionModule(build_model(**config.model), **dataclasses.asdict(config.eval))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=config.trainer.limit_val_batches,
    )
    trainer.validate(
        module,
        datamodule=CocoDataModule(**dataclasses.asdict(config.data)),
        ckpt_path=run / "checkpoints" / "last.ckpt",
        weights_only=True,
        verbose=False,
    )
    return dict(module.last_metrics)  # undefined metrics are None already


@pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's notes on the bare Trainer
def test_ddp_on_cpu_matches_one_process(odd_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    result = train(
        "--data", odd_dataset, "--out", out, "--coordconv", "--quiet",
        "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
        "--limit-train-batches", "2", "--limit-val-batches", "1.0",
        env=USER_WARNINGS,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # --quiet: one line of output, nothing from Lightning, from either process.
    assert result.stderr == "", result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        f"run written to {out}/ (checkpoints/best.ckpt, metrics.json, config.yaml)"
    ]
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 1
    assert validation_epochs(read_csv(out / "logs" / "metrics.csv")) == [0]
    assert yaml.safe_load((out / "config.yaml").read_text())["trainer"]["devices"] == 2
    # The validation at the end of that epoch ran on 2 processes (each image once, the padded
    # duplicate dropped) with the weights saved in last.ckpt: one process must agree.
    assert_same_metrics(validate_on_one_process(out), metric_values(out))


# --- resume --------------------------------------------------------------------------------


@pytest.mark.robustness
def test_resume_after_sigkill_mid_epoch(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        sys.executable, *SMOKE, "--data", str(tiny_dataset), "--out", str(out), "--quiet",
        "--max-epochs", "2", "--limit-train-batches", "3", "--limit-val-batches", "1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # --resume auto on a folder that does not exist yet: a first run
    process = subprocess.Popen([*args, "--resume", "auto"], cwd=ROOT, env=env,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    log = out / "logs" / "metrics.csv"
    deadline = time.monotonic() + 240
    try:
        # Kill once epoch 0 is checkpointed and epoch 1 has logged a training step.
        while time.monotonic() < deadline and process.poll() is None:
            if (out / "checkpoints" / "last.ckpt").is_file() and log.is_file():
                if any(row["epoch"] == "1" and row["loss"] for row in read_csv(log)):
                    break
            time.sleep(0.05)
        assert process.poll() is None, f"finished before the kill: {process.stderr.read()}"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not (out / "metrics.json").exists()
    killed = read_csv(log)
    first_step_of_epoch_1 = next(r for r in killed if r["epoch"] == "1" and r["loss"])

    result = run_cli(*args[1:], "--resume", "auto")  # the requeued job: continues
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2
    rows = read_csv(log)
    assert validation_epochs(rows) == [0, 1]  # none lost, none twice
    steps = [int(row["step"]) for row in rows if row["loss"]]
    assert steps == list(range(6))  # the killed epoch's logged step was replaced, not repeated
    # Restored RNG state and per-epoch augmentation seeds: epoch 1 sees the same batches,
    # augmentations and RPN/ROI samples as before the kill.
    again = next(r for r in rows if r["epoch"] == "1" and r["loss"])
    assert again["step"] == first_step_of_epoch_1["step"]
    assert float(again["loss"]) == pytest.approx(float(first_step_of_epoch_1["loss"]), abs=1e-6)

    # Resuming a finished run does nothing and says so.
    before = (out / "metrics.json").read_bytes()
    done = run_cli(*args[1:], "--resume", "last")
    assert done.returncode == 0 and "nothing to do" in done.stderr
    assert (out / "metrics.json").read_bytes() == before


@pytest.mark.robustness
def test_nan_loss_stops_and_keeps_checkpoints(
    smoke_runs: dict[str, Path], tiny_dataset: Path, tmp_path: Path
) -> None:
    """Resume the smoke run from a last.ckpt whose classifier weights are NaN.

    Deterministic and cheap: the very first step's loss is NaN, whatever the data order.
    """
    run = tmp_path / "run"
    shutil.copytree(smoke_runs["baseline"], run)
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    state["state_dict"]["model.roi_heads.box_predictor.cls_score.weight"].fill_(math.nan)
    torch.save(state, last)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    before["metrics.json"] = (run / "metrics.json").read_bytes()

    result = train(
        "--data", tiny_dataset, "--out", run, "--no-coordconv", "--quiet",
        "--resume", "last", "--max-epochs", "2",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "loss is not finite" in lines[0] and "loss_classifier=nan" in lines[0]
    after = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    after["metrics.json"] = (run / "metrics.json").read_bytes()
    assert after == before


# --- user errors: exit 2, one line, no traceback -------------------------------------------
#
# Only what train.py itself decides is run here as a command line: its flags (argparse), its
# checks before the slow imports, its run directory and --resume. Bad config values are
# tested in-process in test_config.py (one of them, below, proves they reach the user as one
# line), bad datasets in test_data.py (test_robustness.py runs a few through train.py).


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A non-empty folder: an existing run directory to train.py."""
    folder = tmp_path_factory.mktemp("taken")
    (folder / "notes.txt").write_text("not a run\n")
    return folder


FAST_ERRORS = {
    # name: (flags, needles); the test fills in {folder}, a non-empty folder
    "epochs not a number": (["--max-epochs", "two"], ["train.py: error:", "--max-epochs", "two"]),
    "unknown optimizer": (["--optimizer", "rmsprop"], ["train.py: error:", "--optimizer", "rmsprop"]),
    "unknown flag": (["--epochs", "3"], ["train.py: error:", "--epochs"]),
    "resume and overwrite": (["--resume", "last", "--overwrite"],
                             ["train.py: error:", "--resume", "--overwrite"]),
    "negative epochs": (["--max-epochs", "-1"], ["trainer.max_epochs", ">= 1"]),
    "missing dataset": (["--data", "{folder}/no-data"], ["no-data", "python -m data_gen"]),
    "run dir exists": (["--out", "{folder}"], ["--resume", "--overwrite", "{folder}"]),
    "resume nothing": (["--out", "{folder}/fresh", "--resume", "last"], ["--resume", "last.ckpt"]),
    "resume auto, not a run": (["--out", "{folder}", "--resume", "auto"],
                               ["--resume auto", "another run's files", "no config.yaml"]),
}  # fmt: skip


def test_resume_auto_refuses_another_runs_folder_and_restarts_its_own(
    smoke_runs: dict[str, Path], tiny_dataset: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    shutil.copytree(smoke_runs["coordconv"], other)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in other.rglob("*"))
    result = train("--data", tiny_dataset, "--out", other, "--no-coordconv", "--resume", "auto")
    assert_user_error(result, "another run's files", "name 'coordconv' (now 'baseline')")
    assert sorted((str(p), p.stat().st_mtime_ns) for p in other.rglob("*")) == before
    # This run's files from before its first checkpoint (killed in epoch 0): started again.
    own = tmp_path / "own"
    own.mkdir()
    config = yaml.safe_load((smoke_runs["baseline"] / "config.yaml").read_text())
    (own / "config.yaml").write_text(yaml.safe_dump({**config, "out": str(own)}))
    (own / "logs").mkdir()
    (own / "logs" / "metrics.csv").write_text("epoch,step,loss\n0,0,9.9\n")
    result = train("--data", tiny_dataset, "--out", own, "--no-coordconv", "--resume", "auto",
                   "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((own / "metrics.json").read_text())["epochs"] == 1
    assert "9.9" not in (own / "logs" / "metrics.csv").read_text()


@pytest.mark.robustness
@pytest.mark.parametrize("case", FAST_ERRORS)
def test_user_errors(case: str, tiny_dataset: Path, folder: Path) -> None:
    flags, needles = FAST_ERRORS[case]
    flags = [flag.format(folder=folder) for flag in flags]
    defaults = ["--data", str(tiny_dataset), "--out", str(folder / "never-written")]
    result = run_cli("train.py", *defaults, *flags, "--quiet")
    assert_user_error(result, *(needle.format(folder=folder) for needle in needles))
    assert result.stderr.startswith(("error: ", "train.py: error: ")), result.stderr
    assert not (folder / "never-written").exists()
    assert not (folder / "fresh").exists()
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


# Each flag lands on its config key, converted: test_config.py refuses these values.
FLAG_OVERRIDES = {
    "--batch-size 0": (["--batch-size", "0"], {"data.batch_size": 0}),
    "--lr -0.1": (["--lr", "-0.1"], {"optim.lr": -0.1}),
    "--limit-train-batches 1.5": (["--limit-train-batches", "1.5"],
                                  {"trainer.limit_train_batches": 1.5}),
    "--devices 0": (["--devices", "0"], {"trainer.devices": 0}),  # an int, not "0"
    "--strategy ddp_spawn": (["--strategy", "ddp_spawn"], {"trainer.strategy": "ddp_spawn"}),
    "--num-workers -2": (["--num-workers", "-2"], {"data.num_workers": -2}),
}  # fmt: skip


@pytest.mark.robustness
@pytest.mark.parametrize("case", FLAG_OVERRIDES)
def test_flags_become_config_overrides(case: str) -> None:
    from coorddet.cli.train import parse_args

    flags, expected = FLAG_OVERRIDES[case]
    _, overrides = parse_args(flags)
    assert overrides == expected
    assert [type(v) for v in overrides.values()] == [type(v) for v in expected.values()]


@pytest.mark.robustness
@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--resume", "last", "--coordconv"], ["coordconv=True", "checkpoint: False"]),
        (["--resume", "{evil}"], ["evil.ckpt", "refused"]),
    ],
    ids=["resume other model", "resume pickled code"],
)
def test_slow_user_errors(
    flags: list[str],
    needles: list[str],
    tiny_dataset: Path,
    smoke_runs: dict[str, Path],
    tmp_path: Path,
) -> None:
    """Errors found once the libraries are loaded (a few seconds each)."""
    run = tmp_path / "run"
    shutil.copytree(smoke_runs["baseline"], run)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*"))
    evil = tmp_path / "evil.ckpt"  # unpickling it would create the file `payload-ran`
    torch.save({"state_dict": {}, "payload": _Payload(tmp_path / "payload-ran")}, evil)
    flags = [flag.format(evil=evil) for flag in flags]
    result = train("--data", tiny_dataset, "--out", run, *flags, "--quiet")
    assert_user_error(result, *needles)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run.rglob("*")) == before
    assert not (tmp_path / "payload-ran").exists()


class _Payload:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.path,))
