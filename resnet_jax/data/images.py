"""Encoded images (JPEG, PNG, ...) to fixed-size arrays: the crop is chosen on the image's
header size, then only that region is resized, from a JPEG decoded at a reduced scale
(libjpeg-turbo's DCT scaling, through simplejpeg) wherever the crop leaves at least twice the
output's resolution. Other formats go through PIL."""

from __future__ import annotations

import io
import math

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels


class CorruptImageError(ValueError):
    """An image file that cannot be decoded; the message names it."""


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Box | None:
    """Inception-style crop (Szegedy et al. 2015): a random area fraction in `scale` and
    aspect ratio in `ratio`, ten tries; None when none fits (the caller centre-crops)."""
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        ch, cw = int(round(math.sqrt(area / aspect))), int(round(math.sqrt(area * aspect)))
        if 0 < ch <= height and 0 < cw <= width:
            top, left = int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))
            return (left, top, left + cw, top + ch)
    return None


def center_crop_box(height: int, width: int, crop_fraction: float = 0.875) -> Box:
    """The central square covering `crop_fraction` of the shorter side: the same pixels as
    resizing the shorter side to size / crop_fraction and cutting the central size x size."""
    side = min(height, width) * crop_fraction
    top, left = (height - side) / 2, (width - side) / 2
    return (left, top, left + side, top + side)


def open_image(data: bytes, where: str):
    """A lazily decoded PIL image; CorruptImageError naming `where` when it is not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise CorruptImageError(f"{where}: not a readable image ({err})") from err


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _decode_jpeg(data: bytes, where: str, box_of, size: int, channels: int):
    """(decoded array, crop box in its pixels) of a JPEG, at the smallest DCT scale (1, 1/2,
    1/4, 1/8) that keeps the crop at least `size` pixels on each side."""
    import simplejpeg

    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        box = box_of(height, width)
        side = min(box[2] - box[0], box[3] - box[1])
        factor = 1
        while factor < 8 and side / (2 * factor) >= size:
            factor *= 2
        array = simplejpeg.decode_jpeg(
            data, "rgb" if channels == 3 else "gray",
            min_height=math.ceil(height / factor), min_width=math.ceil(width / factor))
    except ValueError as err:  # simplejpeg's error for damaged data
        raise CorruptImageError(f"{where}: cannot decode JPEG ({err})") from err
    sy, sx = array.shape[0] / height, array.shape[1] / width
    return array, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def crop_resize(data: bytes, where: str, size: int, choose_box, flip: bool = False,
                channels: int = 3) -> np.ndarray:
    """The region `choose_box(height, width)` of the encoded image, resized (bilinear) to
    size x size, optionally mirrored: uint8 (size, size, channels)."""
    from PIL import Image

    try:
        if _is_jpeg(data):
            array, box = _decode_jpeg(data, where, choose_box, size, channels)
            image = Image.fromarray(array[..., 0] if array.ndim == 3 and channels == 1 else array)
        else:
            image = open_image(data, where)
            box = choose_box(image.size[1], image.size[0])
            image = image.convert("RGB" if channels == 3 else "L")
        out = image.resize((size, size), Image.BILINEAR, box=box)
    except (OSError, ValueError, SyntaxError) as err:  # truncated or damaged data
        if isinstance(err, CorruptImageError):
            raise
        raise CorruptImageError(f"{where}: cannot decode ({err})") from err
    array = np.asarray(out)
    if array.ndim == 2:
        array = array[..., None]
    return array[:, ::-1] if flip else array


def decode(data: bytes, where: str) -> np.ndarray:
    """The whole image as uint8 HWC (RGB, or one channel for grayscale)."""
    image = open_image(data, where)
    try:
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        array = np.asarray(image)
    except (OSError, ValueError, SyntaxError) as err:
        raise CorruptImageError(f"{where}: cannot decode ({err})") from err
    return array[..., None] if array.ndim == 2 else array
