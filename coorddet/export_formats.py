"""Write an :class:`coorddet.exportable.ExportableDetector` as a deployable file, whole or not
at all: ``torch.export``'s program (``.pt2``, loaded by ``torch.export.load``) or ONNX
(loaded by ``onnxruntime``); importing it does not import torch. Both carry a small JSON description (``coorddet.json``: input
shape, output names, categories), in the ``.pt2``'s extra files or the ONNX model's
``metadata_props``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coorddet.errors import UserError
from coorddet.fileio import write_atomic

if TYPE_CHECKING:
    from coorddet.exportable import ExportableDetector

OUTPUT_NAMES = ("boxes", "scores", "labels", "counts")
FORMATS = ("onnx", "torch-export")
ONNX_MODULES = ("onnx", "onnxscript")  # torch.onnx.export(dynamo=True) needs both
INSTALL_HINT = 'pip install -e ".[export]" (onnx, onnxscript, onnxruntime)'
DESCRIPTION = "coorddet.json"


def check_format(fmt: str) -> None:
    """:class:`UserError` for an unknown format, or ONNX without its packages installed."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    missing = [name for name in ONNX_MODULES if importlib.util.find_spec(name) is None]
    if fmt == "onnx" and missing:
        raise UserError(f"--format onnx needs {', '.join(missing)}: {INSTALL_HINT}")


def describe(detector: ExportableDetector, categories: list[dict[str, Any]] | None) -> dict:
    """What a user of the exported file needs to know: input shape, outputs, categories."""
    return {
        "input": {"name": "images", "shape": [detector.batch_size, detector.channels,
                                              *detector.image_size],
                  "dtype": "float32", "range": [0.0, 1.0]},
        "outputs": list(OUTPUT_NAMES),
        "detections_per_image": detector.detections,
        "categories": [{"id": int(c["id"]), "name": str(c["name"])} for c in categories or []],
    }  # fmt: skip


def save(detector: ExportableDetector, fmt: str, out: Path, description: dict) -> Path:
    """Export ``detector`` in ``fmt`` (:data:`FORMATS`) to ``out`` atomically."""
    import torch

    check_format(fmt)
    example = (detector.example(),)
    text = json.dumps(description)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporters' deprecation and shape notes
        if fmt == "torch-export":
            program = torch.export.export(detector, example, strict=False)
            extra = {DESCRIPTION: text}
            buffer = io.BytesIO()  # torch.export.save seeks in its file
            torch.export.save(program, buffer, extra_files=extra)
            write_atomic(out, lambda file: file.write(buffer.getbuffer()))
            return out
        import onnx

        # "Attribute type is ambiguous ... Defaulted to INTS": an empty list attribute, INTS is right
        logging.getLogger("onnx_ir").setLevel(logging.ERROR)
        onnx_program = torch.onnx.export(
            detector, example, None, dynamo=True, verbose=False,
            input_names=["images"], output_names=list(OUTPUT_NAMES),
        )  # fmt: skip
        model = onnx_program.model_proto
        onnx.helper.set_model_props(model, {DESCRIPTION: text})
        write_atomic(out, lambda file: file.write(model.SerializeToString()))
    return out
