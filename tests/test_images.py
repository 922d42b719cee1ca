"""coorddet.images: every Pillow mode is converted as Pillow/torchvision do, or refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from coorddet.data import CocoDataset
from coorddet.errors import UserError
from coorddet.images import image_channels, read_image

rng = np.random.default_rng(0)
GRAY = rng.integers(0, 256, size=(30, 40), dtype=np.uint8)
RGB = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)


def save(path: Path, image: Image.Image, **options) -> Path:
    image.save(path, **options)
    return path


def reopened(path: Path, mode: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert(mode))


@pytest.mark.parametrize(
    ("name", "make", "channels"),
    [
        ("l.png", lambda: Image.fromarray(GRAY, "L"), 1),
        ("one.png", lambda: Image.fromarray(GRAY > 127), 1),
        ("la.png", lambda: Image.fromarray(np.dstack([GRAY, GRAY[::-1]]), "LA"), 1),
        ("rgb.png", lambda: Image.fromarray(RGB, "RGB"), 3),
        ("rgba.png", lambda: Image.fromarray(np.dstack([RGB, GRAY]), "RGBA"), 3),
        ("p.png", lambda: Image.fromarray(RGB, "RGB").quantize(16), 3),
        ("cmyk.jpg", lambda: Image.fromarray(np.dstack([RGB, GRAY]), "CMYK"), 3),
        ("rgb.jpg", lambda: Image.fromarray(RGB, "RGB"), 3),
    ],
)
def test_modes_convert_as_pillow_does(tmp_path, name, make, channels):
    file = save(tmp_path / name, make())
    assert image_channels(file, (40, 30), "here") == channels
    pixels = read_image(file, (40, 30), "here")
    assert pixels.dtype == np.uint8
    assert pixels.shape == ((30, 40) if channels == 1 else (30, 40, 3))
    np.testing.assert_array_equal(pixels, reopened(file, "L" if channels == 1 else "RGB"))
    if channels == 1:  # replicated into a colour split, as Pillow's L -> RGB
        np.testing.assert_array_equal(read_image(file, (40, 30), "here", 3), reopened(file, "RGB"))


def test_sixteen_bit_gray_keeps_its_top_eight_bits_as_torchvision(tmp_path):
    values = rng.integers(0, 65536, size=(30, 40)).astype(np.uint16)
    file = save(tmp_path / "deep.png", Image.fromarray(values))
    with Image.open(file) as image:
        assert image.mode.startswith("I")
    pixels = read_image(file, (40, 30), "here")
    np.testing.assert_array_equal(pixels, (values >> 8).astype(np.uint8))
    from torchvision.transforms.v2.functional import to_dtype

    shifted = to_dtype(
        torch.from_numpy(values.astype(np.int32)).to(torch.uint16), torch.uint8, scale=True
    )
    np.testing.assert_array_equal(pixels, shifted.numpy())


def exif_rotated(path: Path) -> Path:
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to show
    return save(path, Image.fromarray(RGB, "RGB"), exif=exif.tobytes(), quality=95)


def test_exif_orientation_is_applied_and_the_json_gives_the_shown_size(tmp_path):
    file = exif_rotated(tmp_path / "turned.jpg")
    pixels = read_image(file, (30, 40), "here")  # shown 30 wide, 40 high
    with Image.open(file) as image:
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    assert pixels.shape == (40, 30, 3)
    np.testing.assert_array_equal(pixels, expected)
    with pytest.raises(UserError, match=r"turned.jpg: image is 40x30 with EXIF orientation 6, "
                       r"shown 30x40, but here says 40x30"):  # fmt: skip
        read_image(file, (40, 30), "here")


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        ("float.tif", lambda p: Image.fromarray(GRAY.astype(np.float32)).save(p),
         "image mode F is not supported"),
        ("text.png", lambda p: p.write_text("not an image"), "not a readable image"),
        ("cut.png", lambda p: p.write_bytes(
            save(p, Image.fromarray(RGB, "RGB")).read_bytes()[:200]), "not a readable image"),
        ("missing.png", lambda p: None, "image file missing"),
    ],
)  # fmt: skip
def test_bad_files_are_one_line_naming_the_file(tmp_path, name, write, message):
    file = tmp_path / name
    write(file)
    with pytest.raises(UserError, match=message) as error:
        read_image(file, (40, 30), "image id 1 in x.json")
    assert str(file) in str(error.value) and "\n" not in str(error.value)


def test_a_split_with_gray_and_colour_images_is_colour(tmp_path):
    (tmp_path / "train").mkdir()
    save(tmp_path / "train" / "gray.png", Image.fromarray(GRAY, "L"))
    save(tmp_path / "train" / "rgb.png", Image.fromarray(RGB, "RGB"))
    (tmp_path / "annotations").mkdir()
    images = [{"id": i + 1, "file_name": n, "width": 40, "height": 30}
              for i, n in enumerate(["gray.png", "rgb.png"])]  # fmt: skip
    document = {"images": images, "annotations": [], "categories": [{"id": 5, "name": "x"}]}
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(document))
    for decode in ("memory", "lazy"):
        dataset = CocoDataset(tmp_path, "train", decode=decode)
        assert dataset.channels == 3
        gray, colour = dataset[0][0], dataset[1][0]
        torch.testing.assert_close(gray, torch.from_numpy(GRAY).expand(3, -1, -1) / 255.0)
        torch.testing.assert_close(colour, torch.from_numpy(RGB).permute(2, 0, 1) / 255.0)
