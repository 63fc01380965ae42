"""Read an image file as RGB in the frame its annotations use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sparse_detr.errors import InputError


class ImageLoadError(InputError, OSError):
    """An image that cannot be used: unreadable, corrupt, or not the size its annotations say."""


def _gray_to_8_bits(image: Image.Image) -> np.ndarray:
    """The gray levels of a 16-bit, 32-bit integer (``I``) or float (``F``) image as 8 bits: the 16-bit range
    0..65535 maps to 0..255 (value // 256), values beyond it are clipped; a float image whose values all lie
    in [0, 1] holds normalized intensities and maps 0..1 to 0..255. PIL's own conversion clips at 255."""
    values = np.asarray(image, dtype=np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=65535.0, neginf=0.0)
    if image.mode == "F" and values.size and 0 <= values.min() and values.max() <= 1:
        return np.rint(values * 255).astype(np.uint8)
    return (np.clip(values, 0, 65535) // 256).astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha is dropped, CMYK and palettes converted, 16-bit, 32-bit and float gray
    scaled to 8 bits (:func:`_gray_to_8_bits`)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return Image.fromarray(_gray_to_8_bits(image), mode="L").convert("RGB")
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
