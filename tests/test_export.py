"""``python -m coorddet.export``: each exported file, run by its own runtime (onnxruntime,
``torch.export.load``), returns the checkpoint's own detections in PyTorch on the test images
of a generated dataset, for both arms, on mnist-small and mobilenet-v3-fpn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_user_error, run_cli

from coorddet.checkpoint import load_checkpoint
from coorddet.data import CocoDataset
from coorddet.predictions import ImagePrediction, with_category_ids

BOX_TOLERANCE = 1e-3  # pixels
SCORE_TOLERANCE = 1e-4


@pytest.fixture(scope="session")
def mobilenet_runs(tmp_path_factory, tiny_dataset) -> dict[str, Path]:
    """Both arms of ``configs/smoke.yaml`` on mobilenet-v3-fpn."""
    runs = tmp_path_factory.mktemp("mobilenet-runs")
    for name, flag in (("baseline", "--no-coordconv"), ("coordconv", "--coordconv")):
        result = run_cli(
            "train.py", "--config", "configs/smoke.yaml", "--data", str(tiny_dataset),
            "--out", str(runs / name), flag, "--backbone", "mobilenet-v3-fpn", "--quiet",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    return {name: runs / name for name in ("baseline", "coordconv")}


def sharpened(checkpoint: Path, out: Path) -> Path:
    """``checkpoint`` with a random classifier and random coordinate weights, saved to ``out``.

    A smoke run's classifier still gives every class about 1/11: scores then differ by float
    noise, and which of two near-tied boxes NMS keeps, or the cut at 100 detections takes, is
    decided by that noise in any two implementations. A random classifier spreads the
    scores; random coordinate weights make the CoordConv arm's coordinates matter (training
    starts them at 0)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for key, value in state["state_dict"].items():
        if key.endswith("coord_weight") or "box_predictor.cls_score.weight" in key:
            value.copy_(torch.randn(value.shape, generator=generator) * 0.2)
    torch.save(state, out)
    return out


def _runner(fmt: str, path: Path):
    """A function: images (N, C, H, W) -> the file's (boxes, scores, labels, counts)."""
    if fmt == "onnx":
        onnxruntime = pytest.importorskip(
            "onnxruntime", reason='onnxruntime is not installed: pip install -e ".[export]"'
        )
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: [
            torch.from_numpy(o) for o in session.run(None, {"images": images.numpy()})
        ]
    import torchvision  # noqa: F401 - registers torchvision::nms, which the program calls

    program = torch.export.load(str(path)).module()
    return lambda images: program(images)


def _deviations(exported, reference) -> tuple[float, float, int]:
    """Max box and score deviation between one image's exported detections and the
    checkpoint's (a record), matched one to one by label, score and box, and how many were
    ties: a detection whose only counterpart is another box of the same label and the very
    same score (1e-6), which non-maximum suppression may keep either of (greedy NMS breaks
    ties by sort order, which no two implementations share). Fails when the counts differ or
    a detection has no counterpart at all."""
    boxes, scores, labels = exported
    assert len(boxes) == len(reference.boxes), (len(boxes), len(reference.boxes))
    unused = list(range(len(reference.boxes)))
    worst_box = worst_score = 0.0
    unmatched = []
    for box, score, label in zip(boxes, scores, labels, strict=True):
        match = next(
            (
                j for j in unused
                if int(reference.labels[j]) == int(label)
                and abs(float(reference.scores[j]) - float(score)) <= SCORE_TOLERANCE
                and float((reference.boxes[j] - box).abs().max()) <= BOX_TOLERANCE
            ),
            None,
        )  # fmt: skip
        if match is None:
            unmatched.append((float(score), int(label), box.tolist()))
            continue
        unused.remove(match)
        worst_box = max(worst_box, float((reference.boxes[match] - box).abs().max()))
        worst_score = max(worst_score, abs(float(reference.scores[match]) - float(score)))
    for score, label, box in unmatched:
        tie = next((j for j in unused if int(reference.labels[j]) == label
                    and abs(float(reference.scores[j]) - score) <= 1e-6), None)  # fmt: skip
        assert tie is not None, f"no PyTorch detection matches {box} {score} {label}"
        unused.remove(tie)
    return worst_box, worst_score, len(unmatched)


def _check_round_trip(checkpoint_path: Path, fmt: str, out: Path, dataset, *, batch: int,
                      size: tuple[int, int] | None = None) -> None:  # fmt: skip
    args = ["-m", "coorddet.export", str(checkpoint_path), "--format", fmt, "--out", str(out)]
    args += ["--batch-size", str(batch)] + (["--image-size", "{}x{}".format(*size)] if size else [])
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    run = _runner(fmt, out)
    checkpoint = load_checkpoint(checkpoint_path)
    model = checkpoint.build_model()
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    if size is not None:  # crop, then zero-pad, to the exported size
        images = images[..., : size[0], : size[1]]
        images = torch.nn.functional.pad(
            images, (0, size[1] - images.shape[-1], 0, size[0] - images.shape[-2])
        )
    worst = [0.0, 0.0, 0]  # box, score deviations; ties
    total = 0
    for start in range(0, len(images) - batch + 1, batch):
        chunk = images[start : start + batch]
        boxes, scores, labels, counts = run(chunk)
        with torch.no_grad():
            detections = model(list(chunk.unbind(0)))
        records = with_category_ids(
            [ImagePrediction.from_detections(0, d) for d in detections], checkpoint.category_ids
        )
        for image, record in enumerate(records):
            count = int(counts[image])
            assert not scores[image, count:].any() and not labels[image, count:].any()
            found = (boxes[image, :count], scores[image, :count], labels[image, :count])
            box, score, ties = _deviations(found, record)
            worst = [max(worst[0], box), max(worst[1], score), worst[2] + ties]
            total += count
    # No cap on the ties: each was checked to be an exact tie (same label, same score), and
    # how many there are depends on the smoke model (blank regions give identical scores).
    backbone = checkpoint.config["model"]["backbone"]
    arm = "coordconv" if checkpoint.coordconv else "baseline"
    print(f"{backbone} {arm} {fmt} batch {batch} {images.shape[-2]}x{images.shape[-1]}: max box {worst[0]:.2e} px, "
          f"max score {worst[1]:.2e}, {worst[2]} tie(s) broken otherwise among {total}")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torch-export"])
@pytest.mark.parametrize("arm", ["baseline", "coordconv"])
def test_exported_files_return_the_checkpoints_detections(
    fmt, arm, smoke_runs, mobilenet_runs, tiny_dataset, tmp_path
):
    if fmt == "onnx":
        pytest.importorskip("onnxscript", reason='not installed: pip install -e ".[export]"')
    dataset = CocoDataset(tiny_dataset, "test")
    for backbone, runs in (("mnist-small", smoke_runs), ("mobilenet-v3-fpn", mobilenet_runs)):
        checkpoint = sharpened(
            runs[arm] / "checkpoints" / "best.ckpt", tmp_path / f"{backbone}.ckpt"
        )
        out = tmp_path / f"{backbone}.{'onnx' if fmt == 'onnx' else 'pt2'}"
        _check_round_trip(checkpoint, fmt, out, dataset, batch=2)


@pytest.mark.slow
def test_an_image_size_the_model_resizes_and_pads(smoke_runs, tiny_dataset, tmp_path):
    """48x80 images: resized to 38x64 and padded, so CoordConv's per-image extent matters."""
    checkpoint = sharpened(
        smoke_runs["coordconv"] / "checkpoints" / "best.ckpt", tmp_path / "c.ckpt"
    )
    dataset = CocoDataset(tiny_dataset, "test")
    _check_round_trip(
        checkpoint, "torch-export", tmp_path / "m.pt2", dataset, batch=1, size=(48, 80)
    )
    extra = {"coorddet.json": ""}
    torch.export.load(str(tmp_path / "m.pt2"), extra_files=extra)
    meta = json.loads(extra["coorddet.json"])
    assert meta["input"]["shape"] == [1, 1, 48, 80]
    assert [c["name"] for c in meta["categories"]] == [c["name"] for c in dataset.categories]


def test_refusals_are_one_line(smoke_runs, tmp_path):
    checkpoint = str(smoke_runs["baseline"] / "checkpoints" / "best.ckpt")
    taken = tmp_path / "taken.pt2"
    taken.write_bytes(b"x")
    result = run_cli("-m", "coorddet.export", checkpoint, "--format", "torch-export",
                     "--out", str(taken))  # fmt: skip
    assert_user_error(result, "exists", "--overwrite")
    assert taken.read_bytes() == b"x"
    result = run_cli("-m", "coorddet.export", checkpoint, "--format", "onnx",
                     "--out", str(tmp_path / "m.onnx"), "--image-size", "64")  # fmt: skip
    assert_user_error(result, "--image-size")
    # Without the ONNX packages: one line saying what to install.
    hide = "import sys; sys.modules['onnxscript'] = None; from coorddet.cli.export import main; "
    command = f"raise SystemExit(main([{checkpoint!r}, '--format', 'onnx', '--out', 'x.onnx']))"
    result = run_cli("-c", hide + command, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert_user_error(result, 'pip install -e ".[export]"', "onnxscript")
    assert not (tmp_path / "x.onnx").exists()
