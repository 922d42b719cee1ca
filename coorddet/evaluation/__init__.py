"""Evaluation in three stages, shared by ``coorddet.evaluate`` and validation during training:

1. **predict** (:mod:`coorddet.evaluation.prediction`): a model and a dataset or a list of
   images -> per-image predictions (detections; RPN proposals where the detector has them);
2. **score** (:mod:`coorddet.evaluation.scoring`): predictions and COCO ground truth ->
   metrics, pure;
3. **write** (:mod:`coorddet.evaluation.reporting`): metrics and predictions -> the report folder.

:func:`evaluate` (:mod:`coorddet.evaluation.pipeline`) runs all three for checkpoints and
outside detections; it is what ``python -m coorddet.evaluate`` (the command line,
:mod:`coorddet.cli.evaluate`) calls. Names load lazily: importing this package does not
import torch, so the command reports a mistake before torch loads.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "evaluate": "coorddet.evaluation.pipeline",
    "EvaluationResult": "coorddet.evaluation.pipeline",
    "PRECISIONS": "coorddet.evaluation.pipeline",
    "predict": "coorddet.evaluation.prediction",
    "predict_batch": "coorddet.evaluation.prediction",
    "score": "coorddet.evaluation.scoring",
    "score_runs": "coorddet.evaluation.scoring",
    "score_per_class": "coorddet.evaluation.scoring",
    "Comparison": "coorddet.evaluation.reporting",
    "write_report": "coorddet.evaluation.reporting",
    "PLOTS": "coorddet.evaluation.reporting",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'coorddet.evaluation' has no attribute {name!r}")
