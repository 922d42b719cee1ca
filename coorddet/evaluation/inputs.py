"""The evaluation's inputs, checked before anything heavy loads: the report folder, outside
predictions files, and their image and category ids. Mistakes are :class:`UserError`s named by
the command-line flag that sets the value (``--out``, ``--predictions``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coorddet.errors import UserError


def check_out(out: Path, *, overwrite: bool, inputs: Sequence[str | Path]) -> Path:
    """The report folder, if it may be written: never a file, never a folder holding inputs."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a report folder; choose another --out")
    here = Path.cwd().resolve()
    if out.is_dir() and out.resolve() in [here, *here.parents]:  # it is replaced, not filled
        raise UserError(f"--out {out} is or holds the current folder; name a new report folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"report folder {out} exists and is not empty; pass --overwrite or --out"
            )
        resolved = out.resolve()
        for source in inputs:
            path = Path(source).resolve()
            if path == resolved or resolved in path.parents:
                raise UserError(
                    f"--out {out} holds the input {source}; --overwrite would delete it"
                )
    return out


def read_predictions_json(path: str | Path) -> Any:
    """An outside predictions file's parsed JSON; :class:`UserError` naming it otherwise."""
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except OSError as error:
        raise UserError(f"--predictions {path}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"--predictions {path}: not valid JSON ({error})") from None


def outside_records(results: Any, path: str | Path, dataset: Any) -> list[Any]:
    """COCO results (parsed JSON) -> records; UserError naming the file for a malformed entry,
    or an image or category id that ``dataset`` does not have."""
    from coorddet.predictions import records_from_coco_results

    try:
        records = records_from_coco_results(results)
    except UserError as error:
        raise UserError(f"--predictions {path}: {error}") from None
    unknown = sorted({r.image_id for r in records} - set(dataset.image_ids))
    if unknown:
        where = f"{dataset.root} split {dataset.split}"
        raise UserError(f"--predictions {path}: image ids not in {where}: {_listing(unknown)}")
    categories = {int(c["id"]) for c in dataset.categories}
    labels = {int(label) for r in records for label in r.labels.tolist()}
    if labels - categories:
        raise UserError(
            f"--predictions {path}: category ids not in the dataset: "
            f"{_listing(sorted(labels - categories))} (it has {_listing(sorted(categories))})"
        )
    return records


def _listing(values: Sequence[Any], limit: int = 10) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def unique_name(name: str, seed: Any, taken: Sequence[str]) -> str:
    """``name``, or with the seed (``-s1``), then a counter appended, until it is not taken."""
    suffixes = ([f"-s{seed}"] if seed is not None else []) + [f"-{i}" for i in range(2, 10_000)]
    return next(c for c in [name, *(name + s for s in suffixes)] if c not in taken)
