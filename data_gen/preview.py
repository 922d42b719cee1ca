"""``OUT/preview.png``: the first N train canvases in a grid, boxes and labels drawn."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from data_gen.coco import image_file_name
from data_gen.labels import categories, category_ids

SCALE = 4  # nearest-neighbour upscaling so 64 px canvases and their labels are readable
GAP = 4
BOX_COLOUR = (255, 64, 64)
TEXT_COLOUR = (255, 255, 0)
CROWD_COLOUR = (128, 128, 128)


def write_preview(folder: Path, records: list, path: Path, *, labels: str = "digit") -> None:
    """Draw ``folder/image_file_name(i)`` with ``records[i] = (boxes, digits, ...)``.

    ``boxes`` are ``[x, y, w, h]`` pixels; each is outlined around exactly its pixels and
    labelled with its category's name (``labels``: :mod:`data_gen.labels`); crowd boxes in grey.
    """
    names = {category["id"]: category["name"] for category in categories(labels)}
    tiles = []
    for index, (boxes, digits, *_) in enumerate(records):
        with Image.open(folder / image_file_name(index)) as canvas:
            tile = canvas.convert("RGB")
        ids, crowd = category_ids(labels, boxes, digits, tile.width)
        tile = tile.resize((tile.width * SCALE, tile.height * SCALE), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(tile)
        for (x, y, w, h), category, is_crowd in zip(boxes, ids, crowd, strict=True):
            corners = (x * SCALE, y * SCALE, (x + w) * SCALE - 1, (y + h) * SCALE - 1)
            draw.rectangle(corners, outline=CROWD_COLOUR if is_crowd else BOX_COLOUR, width=1)
            draw.text((x * SCALE + 2, y * SCALE + 1), names[category], fill=TEXT_COLOUR)
        tiles.append(tile)
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    side = max(tile.width for tile in tiles)  # mixed canvas sizes: the largest tile
    sheet = Image.new(
        "RGB", (columns * (side + GAP) + GAP, rows * (side + GAP) + GAP), (40, 40, 40)
    )
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        sheet.paste(tile, (GAP + column * (side + GAP), GAP + row * (side + GAP)))
    sheet.save(path, format="PNG")
