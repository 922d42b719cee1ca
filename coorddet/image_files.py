"""Image files named on a command line -> a lazily decoded dataset, for ``coorddet.predict``.

:func:`find_images` expands the inputs (files, folders searched recursively, glob patterns)
into :class:`ImageFile` records with a COCO ``file_name`` (the path below the folder given,
or the file's name) and an image id (1, 2, ... in path order, or the one a COCO file gives).
:func:`read_headers` reads every file's header (size, mode; no pixels), which finds most
unreadable files before inference; :class:`ImageFiles` decodes one image per item, in the
DataLoader's workers, so memory does not grow with the number of files. Images are read by
:mod:`coorddet.images` and, as in :class:`coorddet.data.CocoDataset`, all have 1 channel when
every image is gray, else 3 (gray ones replicated): the same tensors as an evaluation of the
same files.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from coorddet.data import image_tensor
from coorddet.errors import UserError, flatten
from coorddet.images import image_header, read_image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm", ".pbm"})  # fmt: skip
_GLOB = frozenset("*?[")


@dataclass(frozen=True)
class ImageFile:
    """One input image: its ``path``, COCO ``file_name`` and ``image_id``; ``size``
    ``(width, height)`` and ``channels`` once its header is read."""

    path: Path
    file_name: str
    image_id: int = 0
    size: tuple[int, int] = (0, 0)
    channels: int = 0


def find_images(inputs: Sequence[str]) -> list[ImageFile]:
    """The image files of ``inputs`` in path order, each once, ids 1, 2, ... A named file is
    taken whatever its suffix; folders and patterns yield files with an image suffix
    (:data:`IMAGE_SUFFIXES`). UserError: an input that matches nothing, or two files that
    would share a ``file_name``."""
    found: dict[Path, ImageFile] = {}
    for text in inputs:
        path = Path(text)
        if any(character in _GLOB for character in text):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            files = [(m, m.name) for m in matches if m.is_file() and _is_image(m)]
        elif path.is_dir():
            files = [(f, f.relative_to(path).as_posix()) for f in sorted(path.rglob("*"))
                     if f.is_file() and _is_image(f)]  # fmt: skip
        elif path.is_file():
            files = [(path, path.name)]
        else:
            raise UserError(f"{text}: no such file or folder")
        if not files:
            raise UserError(f"{text}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for file, name in files:
            found.setdefault(file.resolve(), ImageFile(file, name))
    names: dict[str, Path] = {}
    for image in found.values():
        if image.file_name in names:
            raise UserError(
                f"{names[image.file_name]} and {image.path} would both be {image.file_name!r} "
                "in images.json; give the folder that holds both instead"
            )
        names[image.file_name] = image.path
    ordered = sorted(found.values(), key=lambda image: str(image.path))
    return [replace(image, image_id=index) for index, image in enumerate(ordered, 1)]


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def ids_from_coco(images: list[ImageFile], coco_file: str | Path) -> list[ImageFile]:
    """``images`` with the ids (and sizes) of a COCO file's ``images`` entry of the same
    ``file_name``, sorted by id; UserError for a file it does not list."""
    try:
        with open(coco_file, "rb") as handle:
            listed = json.load(handle)["images"]
        entries = {str(e["file_name"]): (int(e["id"]), (int(e["width"]), int(e["height"])))
                   for e in listed}  # fmt: skip
    except OSError as error:
        raise UserError(f"--coco {coco_file}: {error.strerror or error}") from None
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"--coco {coco_file}: not a COCO file with an images list of id, file_name, "
            f"width, height ({flatten(error)})"
        ) from None
    missing = [image.file_name for image in images if image.file_name not in entries]
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise UserError(f"--coco {coco_file} does not list {shown} (matched by file_name)")
    matched = [replace(image, image_id=entries[image.file_name][0], size=entries[image.file_name][1])
               for image in images]  # fmt: skip
    return sorted(matched, key=lambda image: image.image_id)


def read_headers(images: list[ImageFile]) -> tuple[list[ImageFile], list[tuple[Path, str]]]:
    """The readable ``images`` with their size and channels, and ``(path, reason)`` for each
    file that is not a readable image. A size other than a COCO file's (``ids_from_coco``)
    is a UserError: the file does not belong to those annotations."""
    readable, unreadable = [], []
    for image in images:
        try:
            size, channels = image_header(image.path, "input of coorddet.predict")
        except UserError as error:
            unreadable.append((image.path, str(error)))
            continue
        if image.size != (0, 0) and size != image.size:
            raise UserError(
                f"{image.path}: image is {size[0]}x{size[1]} but the --coco file says "
                f"{image.size[0]}x{image.size[1]}"
            )
        readable.append(replace(image, size=size, channels=channels))
    return readable, unreadable


class ImageFiles(Dataset):
    """``images`` (headers read) decoded one per item: ``(image, target)`` with ``image``
    float32 ``(C, H, W)`` in ``[0, 1]`` (``C`` 1 when every image is gray, else 3) or
    ``None`` when the file cannot be decoded, and ``target`` ``{"index", "error"}``."""

    def __init__(self, images: list[ImageFile]) -> None:
        # numpy arrays, not Python objects: workers reading them copy nothing
        paths = [str(image.path).encode() for image in images]
        self._paths = b"".join(paths)
        self._starts = np.cumsum([0, *map(len, paths)])
        self._sizes = np.array([image.size for image in images], dtype=np.int64).reshape(-1, 2)
        self.channels = 3 if any(image.channels == 3 for image in images) else 1

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, dict[str, Any]]:
        path = Path(self._paths[self._starts[index] : self._starts[index + 1]].decode())
        size = (int(self._sizes[index][0]), int(self._sizes[index][1]))
        try:
            pixels = read_image(path, size, "input of coorddet.predict", channels=self.channels)
        except UserError as error:
            return None, {"index": index, "error": str(error)}
        return image_tensor(pixels), {"index": index, "error": None}


def collate_files(batch: list[tuple[Any, dict[str, Any]]]) -> tuple[list, list]:
    """A batch of :class:`ImageFiles` items as ``(images, targets)`` lists."""
    return [image for image, _ in batch], [target for _, target in batch]
