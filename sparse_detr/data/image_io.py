"""Read an image file as RGB in the frame its annotations use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sparse_detr.errors import InputError


class ImageLoadError(InputError, OSError):
    """An image that cannot be used: unreadable, corrupt, or not the size its annotations say."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha is dropped, CMYK and palettes converted, 16-bit gray scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        gray = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
    return image.convert("RGB")


def load_rgb_image(path: str | Path, expected_size: tuple[int, int] | None = None) -> Image.Image:
    """The image at ``path`` as an RGB PIL image.

    EXIF orientation is applied (``ImageOps.exif_transpose``), as COCO stores boxes in the displayed
    frame. When ``expected_size`` (width, height) is given and only the unrotated frame has that size,
    the annotations were made on the raw pixels and that frame is kept instead.

    Raises:
        ImageLoadError: one line naming the file, when it cannot be decoded or matches neither frame.
    """
    path = Path(path)
    try:
        with Image.open(path) as raw:
            raw.load()
            rotated = ImageOps.exif_transpose(raw)
            if expected_size is None or rotated.size == tuple(expected_size):
                image = rotated
            elif raw.size == tuple(expected_size):
                image = raw.copy()
            else:
                width, height = rotated.size
                raise ImageLoadError(
                    f"{path}: image is {width}x{height} but its annotation entry says "
                    f"{expected_size[0]}x{expected_size[1]} (width x height); fix 'width'/'height' or the file"
                )
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageLoadError(f"{path}: cannot read image ({type(error).__name__}: {error})") from error
    return _to_rgb(image)
