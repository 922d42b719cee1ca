"""Image files -> uint8 arrays: the one place coorddet opens an image file.

Every mode Pillow opens is either converted the way Pillow and torchvision convert it, or
refused with one line naming the file:

==========================================  ==============================================
mode                                        becomes
==========================================  ==============================================
``L``                                       itself, ``(H, W)`` (``data_gen``'s canvases)
``1``, ``LA``, ``La``                       ``L`` by Pillow's ``convert("L")`` (alpha dropped)
``I;16*``, ``I`` (16-bit gray, e.g. PNG)    ``L`` by the top 8 bits, as torchvision's
                                            ``to_dtype(uint16 -> uint8)`` (a right shift)
``RGB``                                     itself, ``(H, W, 3)``
``RGBA``, ``RGBa``, ``RGBX``, ``P``,        ``RGB`` by Pillow's ``convert("RGB")`` (alpha
``PA``, ``CMYK``, ``YCbCr``                 dropped, palettes expanded)
anything else (``F``, ``LAB``, ``HSV``...)  refused
==========================================  ==============================================

A gray image in a split that also holds colour images is replicated to 3 channels (Pillow's
``L`` -> ``RGB``). The EXIF orientation tag is applied (Pillow's ``ImageOps.exif_transpose``,
torchvision's ``decode_jpeg(apply_exif_orientation=True)``, what browsers and annotation
tools show), so the JSON's ``width``/``height`` are those of the image as displayed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from coorddet.errors import UserError, flatten

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"})
COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr"})
_SIXTEEN_BIT = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the image by 90 degrees
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def image_channels(file: Path, size: tuple[int, int], listed: str) -> int:
    """1 (gray) or 3 (colour): what :func:`read_image` makes of ``file``, read from its header
    alone (nothing is decoded). ``size`` is the ``(width, height)`` the JSON gives, ``listed``
    says where (both for the error messages).

    Raises:
        UserError: the file is missing, not an image, of another size or an unsupported mode.
    """
    with _open(file, listed) as image:
        _check_size(image, file, size, listed)
        return _channels(image, file, listed)


def image_header(file: Path, listed: str) -> tuple[tuple[int, int], int]:
    """``((width, height), channels)`` of ``file`` as :func:`read_image` would give it (the
    size as displayed, after the EXIF orientation), from its header alone.

    Raises:
        UserError: the file is missing, not an image, or of an unsupported mode.
    """
    with _open(file, listed) as image:
        width, height = image.size
        shown = (height, width) if _orientation(image) in _SWAPS_SIDES else (width, height)
        return shown, _channels(image, file, listed)


def read_image(
    file: Path, size: tuple[int, int], listed: str, channels: int | None = None
) -> np.ndarray:
    """Decode ``file``: uint8 ``(H, W)`` for gray or ``(H, W, 3)`` for colour images.

    ``channels``: ``None`` keeps the image's own kind; 3 replicates a gray image to RGB.

    Raises:
        UserError: as :func:`image_channels`, or the file is truncated or corrupt.
    """
    with _open(file, listed) as image:
        _check_size(image, file, size, listed)
        own = _channels(image, file, listed)
        try:
            with warnings.catch_warnings():  # e.g. palette transparency: Pillow's advice
                warnings.simplefilter("ignore")
                image.load()  # truncated files fail here
                pixels = _to_array(_upright(image))
        except _READ_ERRORS as err:
            raise UserError(f"{file}: not a readable image ({flatten(err)}; {listed})") from None
    if channels == 3 and own == 1:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    elif channels is not None and channels != own:
        raise ValueError(f"cannot make a {channels}-channel image of {file}")
    return pixels


def _open(file: Path, listed: str) -> Image.Image:
    try:
        return Image.open(file)
    except FileNotFoundError:
        raise UserError(f"{file}: image file missing ({listed})") from None
    except _READ_ERRORS as err:
        raise UserError(f"{file}: not a readable image ({flatten(err)}; {listed})") from None


def _channels(image: Image.Image, file: Path, listed: str) -> int:
    if image.mode in GRAY_MODES:
        return 1
    if image.mode in COLOUR_MODES:
        return 3
    raise UserError(
        f"{file}: image mode {image.mode} is not supported; save it as RGB or 8-bit gray ({listed})"
    )


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except _READ_ERRORS:  # a broken EXIF block: Pillow shows the image unturned too
        return 1


def _check_size(image: Image.Image, file: Path, size: tuple[int, int], listed: str) -> None:
    width, height = image.size
    orientation = _orientation(image)
    shown = (height, width) if orientation in _SWAPS_SIDES else (width, height)
    if shown == tuple(size):
        return
    stored = f"image is {width}x{height}"
    if shown != (width, height):
        stored += f" with EXIF orientation {orientation}, shown {shown[0]}x{shown[1]},"
    raise UserError(f"{file}: {stored} but {listed} says {size[0]}x{size[1]}")


def _upright(image: Image.Image) -> Image.Image:
    return ImageOps.exif_transpose(image) if _orientation(image) != 1 else image


def _to_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("L", "RGB"):
        return np.asarray(image)
    if mode in _SIXTEEN_BIT:
        values = np.asarray(image).astype(np.int64, copy=False)
        return (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
    return np.asarray(image.convert("L" if mode in GRAY_MODES else "RGB"))
