"""Where a COCO dataset's files are, and the one check that a dataset is there at all.

Layout (the contract ``data_gen`` writes, and COCO 2017's with ``--split train2017``)::

    ROOT/annotations/instances_{split}.json   COCO: images, annotations, categories
    ROOT/{split}/<file_name>                  the split's images
    ROOT/dataset.json                         optional, written by data_gen

No torch import: the command lines call :func:`require_dataset` before slow imports, so a
missing dataset fails in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from coorddet.errors import UserError


def annotation_file(root: str | Path, split: str) -> Path:
    """``ROOT/annotations/instances_{split}.json``."""
    return Path(root) / "annotations" / f"instances_{split}.json"


def image_folder(root: str | Path, split: str) -> Path:
    """``ROOT/{split}``: the folder that the split's ``file_name`` entries are relative to."""
    return Path(root) / split


def available_splits(root: str | Path) -> list[str]:
    """The splits that have an annotation file under ``root``, sorted."""
    files = (Path(root) / "annotations").glob("instances_*.json")
    return sorted(path.stem.removeprefix("instances_") for path in files)


def data_gen_hint(root: str | Path) -> str:
    """The command that creates a dataset at ``root``."""
    return f"`python -m data_gen --out {root}`"


def require_dataset(root: str | Path, splits: Iterable[str], *, flag: str | None = None) -> Path:
    """``root`` as a ``Path`` if it is a folder with an annotation file for every split.

    Raises:
        UserError: naming the missing folder (after ``flag``, the option that gave it) or split, with the splits that are
            there or the ``data_gen`` command that creates a dataset.
    """
    root = Path(root)
    if not root.is_dir():
        where = f"{flag} {root}: dataset directory" if flag else f"dataset directory {root}"
        raise UserError(f"{where} does not exist; create one with {data_gen_hint(root)}")
    for split in splits:
        path = annotation_file(root, split)
        if not path.is_file():
            found = available_splits(root)
            there = f" (splits there: {', '.join(found)})" if found else ""
            raise UserError(
                f"{path}: annotation file for split {split!r} not found{there}; create a "
                f"dataset with {data_gen_hint(root)}"
            )
    return root
