"""``OUT/preview.png``: the first N train canvases in a grid, boxes and labels drawn."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from data_gen.coco import image_file_name

SCALE = 4  # nearest-neighbour upscaling so 64 px canvases and their labels are readable
GAP = 4
BOX_COLOUR = (255, 64, 64)
TEXT_COLOUR = (255, 255, 0)


def write_preview(folder: Path, records: list, path: Path) -> None:
    """Draw ``folder/image_file_name(i)`` with ``records[i] = (boxes, labels, ...)``.

    ``boxes`` are ``[x, y, w, h]`` pixels; each is outlined around exactly its pixels and
    labelled with its digit.
    """
    tiles = []
    for index, (boxes, labels, *_) in enumerate(records):
        with Image.open(folder / image_file_name(index)) as canvas:
            tile = canvas.convert("RGB")
        tile = tile.resize((tile.width * SCALE, tile.height * SCALE), Image.Resampling.NEAREST)
        draw = ImageDraw.Draw(tile)
        for (x, y, w, h), digit in zip(boxes, labels, strict=True):
            corners = (x * SCALE, y * SCALE, (x + w) * SCALE - 1, (y + h) * SCALE - 1)
            draw.rectangle(corners, outline=BOX_COLOUR, width=1)
            draw.text((x * SCALE + 2, y * SCALE + 1), str(digit), fill=TEXT_COLOUR)
        tiles.append(tile)
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    side = tiles[0].width
    sheet = Image.new(
        "RGB", (columns * (side + GAP) + GAP, rows * (side + GAP) + GAP), (40, 40, 40)
    )
    for index, tile in enumerate(tiles):
        row, column = divmod(index, columns)
        sheet.paste(tile, (GAP + column * (side + GAP), GAP + row * (side + GAP)))
    sheet.save(path, format="PNG")
