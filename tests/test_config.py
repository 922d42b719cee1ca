"""coorddet.config: safe YAML, overrides, one-line UserErrors naming the key; in-process, fast."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from coorddet.config import (
    TrainConfig,
    build_config,
    dump_yaml,
    load_yaml,
    model_defaults,
)
from coorddet.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_run_name() -> None:
    config = build_config({})
    assert config == build_config({}, {})
    assert config.run_name == "baseline" and config.out_dir == Path("runs/baseline")
    coordconv = build_config({}, {"model.coordconv": True})
    assert coordconv.run_name == "coordconv" and coordconv.out_dir == Path("runs/coordconv")
    named = build_config({"name": "x", "out": "/tmp/somewhere"})
    assert named.run_name == "x" and named.out_dir == Path("/tmp/somewhere")


def test_model_section_mirrors_build_model() -> None:
    """Every model key build_model takes is a config key with build_model's default, and
    build_model takes every config key (the resolved section builds the default model)."""
    import torch

    from coorddet.models import build_model

    defaults = model_defaults()
    assert set(build_config({}).model) == set(defaults)
    assert {"detector", "backbone", "coordconv_sites", "roi_pool", "anchor_layout"} <= set(defaults)
    torch.manual_seed(0)
    from_config = build_model(**build_config({}).model).state_dict()
    torch.manual_seed(0)
    plain = build_model().state_dict()
    assert from_config.keys() == plain.keys()
    assert all(torch.equal(from_config[key], plain[key]) for key in plain)
    with pytest.raises(TypeError, match="roi_pol"):
        build_model(roi_pol="align")


def test_overrides_beat_the_file() -> None:
    raw = {"data": {"batch_size": 4}, "trainer": {"max_epochs": 3}, "model": {"coordconv": False}}
    config = build_config(raw, {"trainer.max_epochs": 5, "model.coordconv": True, "optim.lr": 0.5})
    assert config.data.batch_size == 4
    assert config.trainer.max_epochs == 5
    assert config.model["coordconv"] is True
    assert config.optim.lr == 0.5
    assert raw["trainer"]["max_epochs"] == 3  # the caller's dict is left alone


def test_yaml_spellings_are_converted() -> None:
    config = build_config(
        {
            "optim": {"lr": "1e-3", "weight_decay": 0},  # YAML 1.1 reads 1e-3 as a string
            "trainer": {"precision": 32, "devices": "auto", "limit_val_batches": 0.5},
            "model": {"box_score_thresh": 0, "aspect_ratios": [1.0]},
        }
    )
    assert config.optim.lr == pytest.approx(1e-3)
    assert isinstance(config.optim.weight_decay, float)
    assert config.trainer.precision == "32"
    assert config.trainer.limit_val_batches == 0.5
    assert config.model["box_score_thresh"] == 0.0
    assert config.model["aspect_ratios"] == [1.0]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"trainer": {"max_epoch": 3}}, "trainer.max_epoch"),
        ({"epochs": 3}, "'epochs'"),
        ({"model": {"coordconvs": True}}, "model.coordconvs"),
        ({"data": {"batch_size": "many"}}, "'data.batch_size' must be int, got 'many'"),
        ({"data": {"batch_size": 2.5}}, "data.batch_size"),
        ({"data": {"augment": "yes"}}, "data.augment"),
        ({"model": {"coordconv": "yes"}}, "model.coordconv"),
        ({"model": {"num_classes": True}}, "model.num_classes"),  # a bool is not an int
        ({"model": {"coordconv_sites": "rpn-head"}}, "model.coordconv_sites"),
        ({"trainer": {"devices": True}}, "trainer.devices"),
        ({"optim": {"milestones": [1, "two"]}}, "optim.milestones"),
        ({"data": 5}, "'data'"),
        ({"seed": "zero"}, "seed"),
    ],
)
def test_unknown_keys_and_wrong_types(raw: dict, needle: str) -> None:
    with pytest.raises(UserError) as error:
        build_config(raw)
    assert needle in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"trainer.max_epochs": 0}, "trainer.max_epochs"),
        ({"trainer.max_epochs": -1}, "'trainer.max_epochs' must be >= 1"),
        ({"data.batch_size": 0}, "data.batch_size"),
        ({"data.num_workers": -1}, "data.num_workers"),
        ({"data.num_workers": -2}, "data.num_workers"),
        ({"optim.lr": 0.0}, "optim.lr"),
        ({"optim.lr": -0.1}, "optim.lr"),
        ({"optim.lr": float("nan")}, "optim.lr"),
        ({"optim.lr": float("inf")}, "optim.lr"),
        ({"optim.optimizer": "rmsprop"}, "optim.optimizer"),
        ({"optim.scheduler": "linear"}, "optim.scheduler"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"trainer.limit_train_batches": 0}, "trainer.limit_train_batches"),
        ({"trainer.limit_train_batches": 1.5}, "trainer.limit_train_batches"),
        ({"trainer.limit_val_batches": 1.5}, "trainer.limit_val_batches"),
        ({"trainer.limit_val_batches": float("nan")}, "trainer.limit_val_batches"),
        ({"trainer.devices": 0}, "trainer.devices"),
        ({"trainer.devices": "two"}, "trainer.devices"),
        ({"trainer.devices": "[0, 1]"}, "trainer.devices"),
        ({"trainer.num_nodes": 0}, "trainer.num_nodes"),
        ({"trainer.strategy": "ddp_spawn"}, "'trainer.strategy' 'ddp_spawn'"),
        ({"trainer.precision": "bf16-true"}, "trainer.precision"),
        ({"eval.score_thresh": 1.5}, "eval.score_thresh"),
    ],
)
def test_bad_values_are_refused(override: dict, needle: str) -> None:
    with pytest.raises(UserError) as error:
        build_config({}, override)
    assert needle in str(error.value)


@pytest.mark.parametrize("devices", [1, 2, -1, "auto", "-1", "0,1", "3"])
def test_lightning_device_forms_pass(devices: int | str) -> None:
    assert build_config({}, {"trainer.devices": devices}).trainer.devices == devices


@pytest.mark.robustness
def test_yaml_python_tags_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f'seed: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(UserError) as error:
        load_yaml(path)
    assert "evil.yaml" in str(error.value) and "line 1" in str(error.value)
    assert "not valid safe YAML" in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "needle"),
    [("- a\n- b\n", "mapping"), ("data: [1\n", "not valid safe YAML"), ("", None)],
)
def test_load_yaml_shapes(tmp_path: Path, text: str, needle: str | None) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    if needle is None:
        assert load_yaml(path) == {}
        return
    with pytest.raises(UserError, match=needle):
        load_yaml(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nope.yaml"):
        load_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(name: str) -> None:
    config = build_config(load_yaml(ROOT / "configs" / name))
    assert isinstance(config, TrainConfig)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = build_config(load_yaml(ROOT / "configs" / "smoke.yaml"), {"model.coordconv": True})
    dump_yaml(config, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved == config.to_dict()
    assert saved["name"] == "coordconv" and saved["out"] == "runs/coordconv"
    assert build_config(saved).to_dict() == config.to_dict()
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file, renamed
