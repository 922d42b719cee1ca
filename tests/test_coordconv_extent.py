"""``model.coordconv_extent``: per-image coordinates (``image``) against coordinates spanning
the padded batch (``batch``), and mixed-size datasets fed at their own size
(``model.keep_image_size``) through training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from coorddet.coordconv import CoordConv2d
from coorddet.models import build_model
from data_gen import GeneratorConfig, generate


def _models() -> dict[str, torch.nn.Module]:
    """Both extents, the same weights, with trained-looking (non-zero) coordinate weights."""
    models = {}
    for extent in ("image", "batch"):
        torch.manual_seed(0)
        models[extent] = build_model(
            coordconv=True, coordconv_extent=extent, keep_image_size=True
        ).eval()
    generator = torch.Generator().manual_seed(1)
    coordinates = {name: torch.randn(p.shape, generator=generator)
                   for name, p in models["image"].named_parameters() if "coord_weight" in name}  # fmt: skip
    for model in models.values():
        model.load_state_dict({**models["image"].state_dict(), **coordinates})
    return models


def _stem_output(model: torch.nn.Module, images: list[torch.Tensor]) -> torch.Tensor:
    """The first CoordConv layer's (N, C, H, W) output for a forward of ``images``."""
    stem = next(m for m in model.modules() if isinstance(m, CoordConv2d))
    seen = []
    handle = stem.register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    return seen[0]


@pytest.fixture(scope="module")
def models():
    return _models()


def test_batch_extent_equals_image_extent_when_no_image_is_padded(models):
    images = [torch.rand(1, 64, 64), torch.rand(1, 64, 64)]
    image, batch = (_stem_output(models[e], images) for e in ("image", "batch"))
    assert image.shape[-2:] == (64, 64)  # no padding: every image fills the map
    torch.testing.assert_close(image, batch, rtol=0, atol=0)


def test_only_image_extent_keeps_a_pixels_coordinates_whatever_its_batch_mates(models):
    small, large = torch.rand(1, 64, 64), torch.rand(1, 96, 96)
    for extent, model in models.items():
        alone = _stem_output(model, [small])[0]
        with_large = _stem_output(model, [small, large])[0, :, :64, :64]  # the small image
        same = torch.allclose(alone, with_large, rtol=0, atol=1e-5)
        assert same == (extent == "image"), extent


def test_an_unknown_extent_is_refused():
    with pytest.raises(ValueError, match="coordconv_extent"):
        build_model(coordconv=True, coordconv_extent="canvas")


def test_keep_image_size_pads_a_mixed_batch_instead_of_resizing():
    model = build_model(keep_image_size=True).eval()
    image_list, _ = model.transform([torch.rand(1, 48, 48), torch.rand(1, 70, 70)])
    assert image_list.image_sizes == [(48, 48), (70, 70)]
    assert tuple(image_list.tensors.shape) == (2, 1, 96, 96)  # padded to a multiple of 32
    resizing = build_model(min_size=70, max_size=70).eval()
    assert resizing.transform([torch.rand(1, 48, 48)])[0].image_sizes == [(70, 70)]


def test_a_mixed_size_position_dataset_trains_and_evaluates_with_batch_extent(tmp_path: Path):
    data = tmp_path / "mixed"
    generate(GeneratorConfig(out=data, canvas_size="48-96", labels="position", train=16, val=4,
                             test=6, workers=1))  # fmt: skip
    run = tmp_path / "run"
    trained = run_cli("train.py", "--config", "configs/smoke.yaml", "--data", str(data),
                      "--out", str(run), "--coordconv", "--coordconv-extent", "batch",
                      "--keep-image-size", "--quiet")  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu",
                            weights_only=False)  # fmt: skip
    model_config = json.dumps(checkpoint["hyper_parameters"], default=str)
    assert '"coordconv_extent": "batch"' in model_config
    assert '"keep_image_size": true' in model_config
    report = tmp_path / "report"
    scored = run_cli("-m", "coorddet.evaluate", "--data", str(data), "--split", "test",
                     "--out", str(report), "--device", "cpu", "--quiet",
                     str(run / "checkpoints" / "last.ckpt"))  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    (metrics,) = json.loads((report / "metrics.json").read_text()).values()
    assert 0.0 <= metrics["map"] <= 1.0
    assert "batch extent; images at their own size" in (report / "report.md").read_text()
