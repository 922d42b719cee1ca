"""Shared fixtures: a tiny real dataset from the generator, and real smoke-trained checkpoints.

Everything here is made by the project's own code (``data_gen.generate`` and ``train.py`` in
a subprocess) once per test session, small enough to keep the suite fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_gen import GeneratorConfig, generate

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path):
    """Import a script of ``experiments/`` as a module (its file name is the module name)."""
    import importlib.util

    if str(path.parent) not in sys.path:  # its sibling modules, as `python path` finds them
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(path.stem, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 300, env: dict | None = None):
    """Run ``python *args`` (a project command line) and return the CompletedProcess."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, one line on stderr naming each needle, and no traceback."""
    assert_one_line(result, 2, needles)


def assert_fault(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 1 (a fault, not a usage error), one line on stderr naming each needle."""
    assert_one_line(result, 1, needles)


def assert_one_line(result: subprocess.CompletedProcess, code: int, needles: tuple) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def coco_annotation(annotation_id: int, image_id: int, category_id: int, xywh) -> dict:
    """One COCO box annotation (not crowd) with its area."""
    x, y, w, h = xywh
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id,
            "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 canvases of the default 64 px, 5-digit setup: 24 train, 8 val, 8 test."""
    out = tmp_path_factory.mktemp("data") / "mnist-det"
    generate(GeneratorConfig(out=str(out), train=24, val=8, test=8, seed=0, workers=1))
    return out


@pytest.fixture(scope="session")
def smoke_runs(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> dict[str, Path]:
    """Baseline and CoordConv run directories trained by ``train.py --config configs/smoke.yaml``."""
    runs = tmp_path_factory.mktemp("runs")
    out = {}
    for name, flag in (("baseline", "--no-coordconv"), ("coordconv", "--coordconv")):
        result = run_cli(
            "train.py", "--config", "configs/smoke.yaml", "--data", str(tiny_dataset),
            "--out", str(runs / name), flag, "--quiet",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = runs / name
    return out


# --- the robustness summary: one line at the end of a run ----------------------------------------

_robustness: dict[str, dict[str, int]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Tally each ``@pytest.mark.robustness`` test's outcome per test file."""
    if "robustness" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        counts = _robustness.setdefault(report.nodeid.split("::")[0], {})
        counts[report.outcome] = counts.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's own type
    if not _robustness:
        return
    total: dict[str, int] = {}
    for counts in _robustness.values():
        for outcome, n in counts.items():
            total[outcome] = total.get(outcome, 0) + n
    files = ", ".join(
        f"{Path(path).name} {sum(counts.values())}" for path, counts in sorted(_robustness.items())
    )
    outcomes = ", ".join(f"{n} {outcome}" for outcome, n in sorted(total.items()))
    terminalreporter.write_line(
        f"robustness (bad input, interruption, untrusted files, concurrent writers, write "
        f"faults): {outcomes} ({files})"
    )
