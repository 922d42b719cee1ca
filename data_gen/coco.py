"""Write images and COCO JSON, and publish the output directory atomically.

Layout under ``OUT`` (pinned; training, evaluation and outside COCO tools rely on it)::

    OUT/train/000000.png ...   8-bit grayscale PNG, canvas_size x canvas_size (its own size)
    OUT/val/...  OUT/test/...
    OUT/annotations/instances_{train,val,test}.json
    OUT/dataset.json

COCO ids: image ``id = index + 1`` for ``file_name = f"{index:06d}.png"``, annotation ids
1, 2, ... in image order (pycocotools' COCOeval treats id 0 as "unmatched"), category
``id = digit + 1`` with ``name = str(digit)`` (or the canvas region with ``--labels position``,
:mod:`data_gen.labels`). ``bbox`` is ``[x, y, w, h]`` pixels and
``area = w * h``; ``segmentation`` is the digit's visible ink as a COCO RLE (pycocotools'
compressed ``{"size": [h, w], "counts": str}``), written after the other keys.

Everything is built in ``OUT.parent/.{OUT.name}.tmp-<pid>`` and renamed into place at the
end, so an interrupted or failed run never leaves a half-written dataset at ``OUT``; stale temp
directories of dead processes are removed by the next run. A failed write raises an
``OSError`` naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from data_gen.errors import UserError
from data_gen.labels import categories, category_ids

SPLITS = ("train", "val", "test")
# zlib run-length strategy: mostly-black canvases compress well with it, and faster than with
# plain level 1
PNG_COMPRESS_LEVEL, PNG_STRATEGY = 1, zlib.Z_RLE


def image_file_name(index: int) -> str:
    return f"{index:06d}.png"


def encode_png(image: np.ndarray) -> bytes:
    """(H, W) uint8 -> bytes of an 8-bit grayscale PNG (no metadata, so deterministic).

    A direct encoder: PIL's PNG writer costs many times more per small canvas, and writing
    PNGs is most of the generation time. Filter type 0 on every row, one IDAT chunk.
    """
    height, width = image.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # leading 0 = filter "None"
    rows[:, 1:] = image
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale
    compressor = zlib.compressobj(PNG_COMPRESS_LEVEL, zlib.DEFLATED, 15, 8, PNG_STRATEGY)
    pixels = compressor.compress(rows.tobytes()) + compressor.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", pixels)
        + _chunk(b"IEND", b"")
    )


def write_bytes(path: Path, data: bytes) -> None:
    """Write a new file with three system calls (Python's ``open`` adds a few per file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
    except OSError as error:  # os.write names no file
        raise named(error, path) from None


def named(error: OSError, path: str | os.PathLike) -> OSError:
    """``error`` with ``path`` as its file name."""
    return OSError(error.errno, error.strerror or str(error), os.fspath(path))


def named_in_out(error: OSError, temp: Path, out: Path) -> OSError:
    """``error`` naming the file as it would be under ``out`` (not the build directory)."""
    where = os.fspath(error.filename or temp)
    if where.startswith(os.fspath(temp)):
        where = os.fspath(out) + where[len(os.fspath(temp)) :]
    return named(error, where)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_masks(masks: np.ndarray) -> list[dict]:
    """(K, H, W) bool masks -> K COCO RLEs ``{"size": [H, W], "counts": str}``, JSON-ready."""
    if not len(masks):
        return []
    # pycocotools wants (H, W, K) uint8 in Fortran order: each mask column-major
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0), dtype=np.uint8))
    return [{"size": rle["size"], "counts": rle["counts"].decode("ascii")} for rle in rles]


def coco_document(
    *,
    split: str,
    canvas_size: int,
    records: list[tuple[list, list]],
    version: str,
    segmentations: list[list[dict]] | None = None,
    sizes: list[int] | None = None,
    labels: str = "digit",
) -> dict:
    """COCO instances dict for one split.

    ``records[i]`` = (boxes: K lists ``[x, y, w, h]`` of int pixels, labels: K int digits)
    of the canvas stored as ``image_file_name(i)``; ``segmentations[i]``, when given, its K
    RLEs (:func:`encode_masks`). ``sizes[i]``: that canvas's side (default: ``canvas_size``
    for every canvas). ``labels``: what a category is (:mod:`data_gen.labels`).
    """
    images, annotations = [], []
    for index, (boxes, digits) in enumerate(records):
        image_id = index + 1
        size = canvas_size if sizes is None else sizes[index]
        images.append(
            {"id": image_id, "file_name": image_file_name(index), "width": size, "height": size}
        )
        rles = segmentations[index] if segmentations is not None else [None] * len(boxes)
        ids, crowd = category_ids(labels, boxes, digits, size)
        for (x, y, w, h), category, is_crowd, rle in zip(boxes, ids, crowd, rles, strict=True):
            annotation = {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category,
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": is_crowd,
            }
            if rle is not None:
                annotation["segmentation"] = rle
            annotations.append(annotation)
    return {
        "info": {
            "description": f"MNIST-detection, {split} split, written by data_gen",
            "version": version,
            "contributor": "data_gen",
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories(labels),
    }


def write_json(path: Path, document: dict, *, indent: int | None = None) -> None:
    write_bytes(path, (json.dumps(document, indent=indent) + "\n").encode())


def check_output_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse an ``OUT`` we must not write to; writes nothing."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} is not empty; pass --overwrite to replace it")
        resolved = out.resolve()
        cwd = Path.cwd().resolve()
        if (
            resolved in (Path(resolved.anchor), Path.home().resolve(), cwd, *cwd.parents)
            or (resolved / ".git").exists()
        ):
            raise UserError(
                f"--out {out} is the home, current or a repository directory; refusing to "
                "replace it even with --overwrite"
            )
    parent = out.absolute().parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not (existing.is_dir() and os.access(existing, os.W_OK)):
        raise UserError(
            f"--out {out}: cannot create it under {existing} (not a writable directory)"
        )


def make_temp_dir(out: Path) -> Path:
    """Create the private build directory beside ``out`` (with the split folders)."""
    out = out.absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        temp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(temp, ignore_errors=True)
        for sub in (*SPLITS, "annotations"):
            (temp / sub).mkdir(parents=True)
    except OSError as err:  # a fault (exit 1), named
        raise named(err, err.filename or out) from None
    return temp


def publish(temp: Path, out: Path) -> None:
    """Move the finished ``temp`` to ``out``; an old ``out`` is deleted only afterwards."""
    out = out.absolute()
    aside = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, aside)
    try:
        os.rename(temp, out)
    except OSError as error:
        if aside.exists():
            os.rename(aside, out)
        raise named(error, out) from None
    shutil.rmtree(aside, ignore_errors=True)


def discard(temp: Path) -> None:
    shutil.rmtree(temp, ignore_errors=True)


def _remove_stale(out: Path) -> None:
    """Delete build/old directories of ``out`` left by processes that no longer run."""
    prefixes = (f".{out.name}.tmp-", f".{out.name}.old-")
    for path in out.parent.iterdir():
        pid = path.name.rsplit("-", 1)[-1]
        if path.name.startswith(prefixes) and pid.isdigit() and path.is_dir():
            if not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (pid reuse) are stale too
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
