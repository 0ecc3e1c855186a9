"""Encoded images (JPEG, PNG, ...) to fixed-size arrays: the crop is chosen on the image's
header size, then only that region is resized, from a JPEG decoded at a reduced scale
(libjpeg-turbo's DCT scaling, through simplejpeg) wherever the crop leaves at least twice the
output's resolution, and resized by OpenCV. Other formats are decoded by PIL."""

from __future__ import annotations

import io
import math

import numpy as np

INTERPOLATIONS = ("bilinear", "bicubic")  # the resize filters of decoded images
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


def center_crop_box(height: int, width: int, crop_fraction: float = 0.875,
                    size: int = 0) -> Box:
    """The central square covering `crop_fraction` of the shorter side: the same pixels as
    resizing the shorter side to size / crop_fraction and cutting the central size x size.
    Given the output `size`, exactly the box of torchvision's and timm's evaluation
    transform (Resize(floor(size / crop_fraction)), then CenterCrop(size), their roundings
    included), in the image's pixels."""
    if not size:
        side = min(height, width) * crop_fraction
        top, left = (height - side) / 2, (width - side) / 2
        return (left, top, left + side, top + side)
    short = math.floor(size / crop_fraction + 1e-6)
    if height <= width:
        new_h, new_w = short, int(short * width / height)
    else:
        new_h, new_w = int(short * height / width), short
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    sy, sx = height / new_h, width / new_w
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


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
        # libjpeg's fast integer IDCT with smooth chroma upsampling: tf.image.decode_jpeg's
        # default ("The TensorFlow-chosen default for jpeg decoding is IFAST")
        array = simplejpeg.decode_jpeg(
            data, "rgb" if channels == 3 else "gray", fastdct=True, fastupsample=False,
            min_height=math.ceil(height / factor), min_width=math.ceil(width / factor))
    except ValueError as err:  # simplejpeg's error for damaged data
        raise CorruptImageError(f"{where}: cannot decode JPEG ({err})") from err
    sy, sx = array.shape[0] / height, array.shape[1] / width
    return array, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def crop_resize(data: bytes, where: str, size: int, choose_box, flip: bool = False,
                channels: int = 3, interpolation: str = "bilinear") -> np.ndarray:
    """The region `choose_box(height, width)` of the encoded image, resized to size x size,
    optionally mirrored: uint8 (size, size, channels). 'bilinear': OpenCV's INTER_LINEAR of
    the region (half-pixel centres, no antialiasing, as tf.image.resize); 'bicubic': PIL's
    antialiased bicubic of the box within the whole decoded image, as timm's and
    torchvision's evaluation transforms resize (pixels beyond the box feed its edges)."""
    import cv2

    flag = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}.get(interpolation)
    if flag is None:
        raise ValueError(f"interpolation={interpolation!r}; expected one of {INTERPOLATIONS}")

    array = None
    if _is_jpeg(data):
        try:
            array, box = _decode_jpeg(data, where, choose_box, size, channels)
        except CorruptImageError:
            pass  # CMYK JPEGs, which libjpeg-turbo does not turn into RGB: PIL decides
    if array is None:
        array = decode(data, where)
        if channels == 3 and array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        elif channels == 1 and array.shape[-1] == 3:
            array = cv2.cvtColor(array, cv2.COLOR_RGB2GRAY)
        box = choose_box(array.shape[0], array.shape[1])
    if interpolation == "bicubic":
        out = _pil_resize(array, box, size)
    else:
        left, top, right, bottom = (int(round(v)) for v in box)
        region = array[max(0, top):max(top + 1, bottom), max(0, left):max(left + 1, right)]
        out = cv2.resize(region, (size, size), interpolation=flag)
    if out.ndim == 2:
        out = out[..., None]
    return out[:, ::-1] if flip else out


def _pil_resize(array: np.ndarray, box: Box, size: int) -> np.ndarray:
    from PIL import Image

    squeeze = array.ndim == 3 and array.shape[-1] == 1
    image = Image.fromarray(array[..., 0] if squeeze else array)
    return np.asarray(image.resize((size, size), Image.BICUBIC, box=tuple(float(v) for v in box)))


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
