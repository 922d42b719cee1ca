"""COCO detection data: a dataset on disk -> ``(image, target)`` pairs for torchvision detectors.

:class:`CocoDataset` reads one split; :func:`collate_detection` batches it. Layout read (the
contract written by ``data_gen``, :mod:`coorddet.dataset_layout`)::

    ROOT/annotations/instances_{split}.json   COCO: images, annotations (bbox [x, y, w, h] px), categories
    ROOT/{split}/<file_name>                  images (PNG, JPEG, ...; gray or colour), width x
                                              height as in the JSON; file_name may hold folders
    ROOT/dataset.json                         optional; "boxes": "placement" allows boxes that
                                              lie outside the image (data_gen --boxes placement)

The JSON is checked when a split is opened; anything wrong raises
:class:`coorddet.errors.UserError` with one line naming the file and the problem. Images are
read by :mod:`coorddet.images` (its table says how each Pillow mode is converted). A split is
gray (1 channel) when every image is, else colour (3 channels; gray images are replicated).

Decoding (``decode="auto"``): a split whose images take at most :data:`IN_MEMORY_BYTES` as RGB
(width x height x 3 summed over the JSON's images: 87,381 64x64 canvases, or 1,165 640x480
photos) is decoded once into memory when opened, so ``__getitem__`` reads no files (11,000
64x64 canvases are ~45 MB). A larger split is decoded lazily, one image per ``__getitem__``, in
the DataLoader's workers (``data.num_workers``); opening it reads every file's header (size,
mode, EXIF orientation) but no pixels, and the per-image records are numpy arrays, so workers
do not copy them as they read (Python objects would be, page by page, as their reference
counts change). A broken file found by a worker raises the same one-line error.

Labels are contiguous, 1 for the smallest category id and so on (``data_gen``'s ids are
digit + 1, 1..10, so there its labels are its ids); 0 is the background.

Instance masks (``masks=True``, for Mask R-CNN): every annotation's ``segmentation`` (polygons
or RLE, :mod:`coorddet.masks`) is checked and kept as compressed RLE bytes when the split is
opened (one bytes object, as the file names), and decoded per item, so masks cost no memory
per pixel until an item is read.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from coorddet.boxes import xywh_to_xyxy
from coorddet.dataset_layout import annotation_file, image_folder, require_dataset
from coorddet.errors import UserError, flatten
from coorddet.images import image_channels, read_image
from coorddet.masks import decode, rle_counts
from coorddet.validate import check_choice, is_int, is_number

Target = dict[str, torch.Tensor]


VISIBLE_BOXES, PLACEMENT_BOXES = "visible", "placement"  # dataset.json "boxes" (data_gen --boxes)
DECODE_MODES = ("auto", "memory", "lazy")
IN_MEMORY_BYTES = 1 << 30  # decode="auto": splits up to this size as RGB stay in memory


class CocoDataset(Dataset):
    """One split of a COCO detection dataset, checked, decoded into memory or lazily.

    ``dataset[i]`` returns ``(image, target)``:

    - ``image``: float32 ``(C, H, W)`` in ``[0, 1]``, ``C = channels``;
    - ``target["boxes"]``: float32 ``(K, 4)`` xyxy, pixels (``(0, 4)`` when augmentation
      dropped every box); ``target["labels"]``: int64 ``(K,)`` labels (see ``category_ids``);
      ``target["image_id"]``: int64 0-dim; ``target["area"]``: float32 ``(K,)``, the target
      box's ``w * h``; ``target["iscrowd"]``: int64 ``(K,)`` zeros;
    - ``target["masks"]`` (only with ``masks=True``): uint8 ``(K, H, W)``, each box's instance
      mask over the whole image, 0 or 1, in the order of ``boxes``.

    Crowd annotations (``iscrowd=1``) are checked but left out of the targets (they stay in
    ``.coco`` for COCOeval). ``transforms`` is a :mod:`coorddet.transforms` policy (``None``:
    no augmentation). ``decode``: ``"auto"`` (see the module's docstring), ``"memory"`` or
    ``"lazy"``. ``masks``: also read each annotation's ``segmentation`` (a split without
    them is refused when opened); augmentation moves the masks with their boxes and drops
    them with their boxes.

    Attributes:
        coco: the ``pycocotools.coco.COCO`` index of the split's JSON.
        image_ids: COCO image ids in dataset order (ascending).
        categories: the JSON's category dicts, by ascending id.
        category_ids: those ids; the target label of ``category_ids[k]`` is ``k + 1``
            (labels are contiguous whatever the ids: COCO's 1..90 with gaps become 1..80).
        num_classes: ``len(category_ids) + 1`` (background included).
        channels: 1 when every image is gray, else 3.
        in_memory: whether the images were decoded when the split was opened.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        transforms: Callable | None = None,
        *,
        decode: str = "auto",
        masks: bool = False,
    ) -> None:
        check_choice("decode", decode, DECODE_MODES, error=UserError)
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self.masks = masks
        json_path = annotation_file(require_dataset(self.root, [split]), split)
        dataset = _read_json(json_path)
        self.box_kind = box_kind(self.root)
        _check_coco(dataset, json_path, boxes_may_leave_image=self.box_kind == PLACEMENT_BOXES)
        if transforms is not None and self.box_kind == PLACEMENT_BOXES:
            raise UserError(
                f"{self.root}: augmentation is not supported for placement boxes (they may lie "
                "outside the image); set data.augment: false"
            )
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO()
            self.coco.dataset = dataset
            self.coco.createIndex()
        self.image_ids: list[int] = sorted(self.coco.imgs)
        self.categories: list[dict[str, Any]] = [self.coco.cats[c] for c in sorted(self.coco.cats)]
        self.category_ids: list[int] = sorted(self.coco.cats)
        self.num_classes = len(self.category_ids) + 1
        label_of = {category_id: k + 1 for k, category_id in enumerate(self.category_ids)}

        images = [self.coco.imgs[i] for i in self.image_ids]
        self._sizes = np.array([(im["height"], im["width"]) for im in images], dtype=np.int64)
        self._ids = np.array(self.image_ids, dtype=np.int64)
        self._folder = image_folder(self.root, split)
        if not self._folder.is_dir():
            raise UserError(f"{self._folder}: image folder for {json_path.name} not found")
        self._json_path = json_path
        names = [im["file_name"].encode() for im in images]
        self._names = b"".join(names)  # one object: workers reading it copy nothing
        self._name_start = np.cumsum([0, *map(len, names)])
        rgb_bytes = int(self._sizes.prod(axis=1).sum()) * 3
        self.in_memory = decode == "memory" or (decode == "auto" and rgb_bytes <= IN_MEMORY_BYTES)
        self._pixels: np.ndarray | None = None
        if self.in_memory:
            self._pixels, self._pixel_start, self._channels = self._decode_all()
            self.channels = int(self._channels.max())
        else:
            self.channels = max(image_channels(*self._file(i)) for i in range(len(images)))

        boxes, labels, ann_start, counts = [], [], [0], []
        for image_id in self.image_ids:
            anns = [a for a in self.coco.imgToAnns[image_id] if not a["iscrowd"]]
            boxes += [a["bbox"] for a in anns]
            labels += [label_of[a["category_id"]] for a in anns]
            ann_start.append(len(labels))
            if masks:
                counts += [self._segmentation(a) for a in anns]
        self._boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)  # COCO xywh, pixels
        self._labels = np.array(labels, dtype=np.int64)
        self._ann_start = np.array(ann_start, dtype=np.int64)
        self._counts = b"".join(counts)  # annotation j: _counts[_count_start[j]:_count_start[j+1]]
        self._count_start = np.cumsum([0, *map(len, counts)], dtype=np.int64)

    @property
    def image_sizes(self) -> set[tuple[int, int]]:
        """Every ``(width, height)`` of the split's images."""
        return {(int(width), int(height)) for height, width in self._sizes.tolist()}

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        index = range(len(self))[index]  # negative indices; IndexError past the end
        if self._pixels is None:
            pixels = read_image(*self._file(index), channels=self.channels)
            pixels = np.require(pixels, requirements="W")  # Pillow's arrays are read-only
        else:
            height, width = (int(v) for v in self._sizes[index])
            pixels = self._pixels[self._pixel_start[index] : self._pixel_start[index + 1]]
            if self._channels[index] == 1:
                pixels = pixels.reshape(height, width)
                if self.channels == 3:  # a gray image in a colour split: Pillow's L -> RGB
                    pixels = np.repeat(pixels[:, :, None], 3, axis=2)
            else:
                pixels = pixels.reshape(height, width, 3)
        first, last = self._ann_start[index], self._ann_start[index + 1]
        boxes, labels = self._boxes[first:last], self._labels[first:last]
        masks = self._read_masks(index) if self.masks else None
        if self.transforms is not None:
            from coorddet.transforms import augment  # albumentations: only when augmenting

            pixels, boxes, labels, masks = augment(
                self.transforms, pixels.copy(), boxes, labels, masks
            )
        if pixels.dtype != np.uint8 or pixels.ndim != (2 if self.channels == 1 else 3):
            raise TypeError(
                f"transforms must return an {'(H, W)' if self.channels == 1 else '(H, W, 3)'} "
                f"uint8 image, got {pixels.dtype} {pixels.shape}"
            )
        image = image_tensor(pixels)
        target = {
            "boxes": torch.from_numpy(xywh_to_xyxy(boxes)),
            "labels": torch.from_numpy(labels.copy()),
            "image_id": torch.tensor(self._ids[index], dtype=torch.int64),
            "area": torch.from_numpy((boxes[:, 2] * boxes[:, 3]).astype(np.float32)),
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
        }
        if masks is not None:
            target["masks"] = torch.from_numpy(masks)
        return image, target

    def _segmentation(self, annotation: dict[str, Any]) -> bytes:
        """An annotation's mask as checked compressed RLE counts (polygons rasterized)."""
        where = f"{self._json_path}: annotation id {annotation['id']}"
        if "segmentation" not in annotation:
            raise UserError(
                f"{where} has no 'segmentation'; instance masks need one per annotation (for "
                "data_gen datasets: generate them again with this version)"
            )
        image = self.coco.imgs[annotation["image_id"]]
        return rle_counts(annotation["segmentation"], image["height"], image["width"], where)

    def _read_masks(self, index: int) -> np.ndarray:
        """Image ``index``'s instance masks: uint8 ``(K, H, W)``."""
        starts = self._count_start[self._ann_start[index] : self._ann_start[index + 1] + 1]
        counts = [self._counts[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]
        height, width = (int(v) for v in self._sizes[index])
        return decode(counts, height, width)

    def _file(self, index: int) -> tuple[Path, tuple[int, int], str]:
        """``(file, (width, height), where)`` of image ``index``, for :mod:`coorddet.images`."""
        name = self._names[self._name_start[index] : self._name_start[index + 1]].decode()
        height, width = (int(v) for v in self._sizes[index])
        return (
            self._folder / name,
            (width, height),
            f"image id {self._ids[index]} in {self._json_path}",
        )

    def _decode_all(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every image into one flat uint8 buffer, in dataset order: ``(pixels, starts,
        channels)``; image ``i`` is ``pixels[starts[i]:starts[i + 1]]`` with ``channels[i]``
        channels (a gray image in a colour split is replicated when it is read)."""
        count = len(self)
        # Room for every image as RGB; the pages a gray split leaves untouched are never
        # resident, and no second copy is made, so the peak is the decoded size.
        pixels = np.empty(int(self._sizes.prod(axis=1).sum()) * 3, dtype=np.uint8)
        starts, channels = np.zeros(count + 1, dtype=np.int64), np.ones(count, dtype=np.int64)
        for index in range(count):
            image = read_image(*self._file(index))
            starts[index + 1] = starts[index] + image.size
            pixels[starts[index] : starts[index + 1]] = image.reshape(-1)
            channels[index] = 1 if image.ndim == 2 else 3
        return pixels[: starts[-1]], starts, channels

    def reseed(self, seed: int) -> None:
        """Restart the augmentation's random stream (no-op without transforms)."""
        if self.transforms is not None:
            from coorddet.transforms import reseed  # albumentations: only when augmenting

            reseed(self.transforms, seed)


def image_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W)`` or ``(H, W, 3)`` pixels -> float32 ``(1 or 3, H, W)`` in ``[0, 1]``."""
    pixels = np.require(pixels, requirements=("C", "W"))  # Pillow's arrays are read-only
    if pixels.ndim == 2:
        return torch.from_numpy(pixels).to(torch.float32).div_(255.0).unsqueeze(0)
    # (H, W, 3) -> (3, H, W), converted and laid out in one copy
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    return image.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def collate_detection(
    batch: list[tuple[torch.Tensor, Target]],
) -> tuple[list[torch.Tensor], list[Target]]:
    """``[(image, target), ...]`` -> ``([image, ...], [target, ...])``, torchvision's detection input.

    The returned tensors are views: all images (when equal in size) share one storage, and so
    does each target field across the batch. A DataLoader worker then hands a batch over in
    six shared-memory segments instead of six per image, which is what makes workers pay off
    (docs/speed.md). ``masks`` (``(K, H, W)`` per image) of images of different sizes cannot
    share one tensor: they stay the images' own.
    """
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    if len({image.shape for image in images}) == 1:
        images = list(torch.stack(images).unbind(0))
    counts = [len(target["labels"]) for target in targets]
    joined: list[Target] = [{} for _ in targets]
    for key in targets[0]:
        values = [target[key] for target in targets]
        if all(value.ndim == 0 for value in values):  # image_id
            parts = torch.stack(values).unbind(0)
        elif len({value.shape[1:] for value in values}) > 1:  # masks of unequal images
            parts = values
        else:  # one row per box
            parts = torch.cat(values).split(counts)
        for target, part in zip(joined, parts, strict=True):
            target[key] = part
    return images, joined


# --- checks: every way a COCO file on disk can be wrong, as one-line UserErrors -------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({flatten(err)})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({flatten(err)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object with images/annotations/categories")
    return data


def box_kind(root: Path) -> str:
    """``"placement"`` when ``root/dataset.json`` (written by ``data_gen``) says its boxes are
    the released loader's unclipped placement rectangles, else ``"visible"``."""
    try:
        kind = json.loads((Path(root) / "dataset.json").read_bytes()).get("boxes")
    except (OSError, ValueError, AttributeError):
        return VISIBLE_BOXES
    return PLACEMENT_BOXES if kind == PLACEMENT_BOXES else VISIBLE_BOXES


def _check_coco(data: dict[str, Any], path: Path, *, boxes_may_leave_image: bool = False) -> None:
    """Validate ``data`` in place (fills the optional ``iscrowd``/``area`` COCOeval needs).

    Boxes must lie inside their image unless ``boxes_may_leave_image`` (placement boxes).
    """
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{path}: missing '{key}' list")
    if not data["images"]:
        raise UserError(f"{path}: empty split, 'images' has no entries")
    if not data["categories"]:
        raise UserError(f"{path}: 'categories' has no entries")

    categories = _unique_ids(data["categories"], path, "categories")
    for cat_id in categories:
        if cat_id < 1:
            raise UserError(f"{path}: category id {cat_id} must be >= 1 (0 is the background)")

    images = _unique_ids(data["images"], path, "images")
    for image_id, image in images.items():
        where = f"{path}: image id {image_id}"
        for key in ("width", "height"):
            if not is_int(image.get(key)) or image[key] < 1:
                raise UserError(f"{where}: '{key}' must be a positive integer")
        name = image.get("file_name")
        if not isinstance(name, str) or not _is_inside(name):
            raise UserError(
                f"{where}: file_name {name!r} must be a relative path inside the split folder"
            )

    _unique_ids(data["annotations"], path, "annotations")
    for ann in data["annotations"]:
        where = f"{path}: annotation id {ann['id']}"
        image = images.get(ann.get("image_id")) if is_int(ann.get("image_id")) else None
        if image is None:
            raise UserError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        category_id = ann.get("category_id")
        if not is_int(category_id) or category_id not in categories:
            raise UserError(f"{where}: category_id {category_id!r} is not in 'categories'")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(is_number, bbox))):
            raise UserError(f"{where}: bbox {bbox!r} must be 4 numbers [x, y, w, h]")
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            raise UserError(f"{where}: bbox {bbox} has zero or negative width/height")
        tol = 1e-3  # float boxes that touch the edge may overshoot by rounding
        outside = (
            x < -tol or y < -tol or x + w > image["width"] + tol or y + h > image["height"] + tol
        )
        if outside and not boxes_may_leave_image:
            raise UserError(
                f"{where}: bbox {bbox} lies outside its {image['width']}x{image['height']} image"
            )
        ann.setdefault("iscrowd", 0)
        if not is_int(ann["iscrowd"]) or ann["iscrowd"] not in (0, 1):
            raise UserError(f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
        ann.setdefault("area", float(w * h))
        if not is_number(ann["area"]) or ann["area"] < 0:
            raise UserError(f"{where}: area must be a number >= 0, got {ann['area']!r}")


def _unique_ids(entries: list[Any], path: Path, key: str) -> dict[int, dict[str, Any]]:
    by_id: dict[int, dict[str, Any]] = {}
    for position, entry in enumerate(entries):
        entry_id = entry.get("id") if isinstance(entry, dict) else None
        if not is_int(entry_id):
            raise UserError(f"{path}: '{key}' entry {position} needs an integer 'id'")
        if entry_id in by_id:
            raise UserError(f"{path}: '{key}' has id {entry_id} twice")
        by_id[entry_id] = entry
    return by_id


def _is_inside(name: str) -> bool:
    """Whether ``name`` is a plain relative path that cannot leave its folder."""
    posix = PurePosixPath(name.replace("\\", "/"))
    return (
        bool(name.strip())
        and "\x00" not in name
        and not posix.is_absolute()
        and not PureWindowsPath(name).drive
        and ".." not in posix.parts
        and posix.parts not in ((), (".",))
    )
