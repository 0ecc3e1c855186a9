"""Automatic augmentation policies on uint8 HWC images (1 or 3 channels): RandAugment
(Cubuk et al. 2020) and TrivialAugmentWide (Muller & Hutter 2021), with torchvision's
operation set, 31 magnitude bins and signed magnitudes. Each image draws from its own
generator, so a batch is a function of (seed, step) whatever the worker count."""

from __future__ import annotations

from typing import Callable

import numpy as np

POLICIES = ("rand_augment", "trivial_augment_wide")
BINS = 31


def _affine(image: np.ndarray, a: float, b: float, c: float, d: float, e: float, f: float
            ) -> np.ndarray:
    """PIL's Image.transform(AFFINE, (a, b, c, d, e, f), NEAREST): the output pixel (x, y)
    takes the input pixel under (a x + b y + c, d x + e y + f), pixel centres at +0.5;
    zeros outside."""
    h, w = image.shape[:2]
    y, x = np.mgrid[0:h, 0:w] + 0.5
    xi = np.floor(a * x + b * y + c).astype(np.int64)
    yi = np.floor(d * x + e * y + f).astype(np.int64)
    inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    out = np.zeros_like(image)
    out[inside] = image[yi[inside], xi[inside]]
    return out


def shear_x(image, m):
    return _affine(image, 1.0, m, 0.0, 0.0, 1.0, 0.0)


def shear_y(image, m):
    return _affine(image, 1.0, 0.0, 0.0, m, 1.0, 0.0)


def translate_x(image, m):
    return _affine(image, 1.0, 0.0, -float(round(m)), 0.0, 1.0, 0.0)


def translate_y(image, m):
    return _affine(image, 1.0, 0.0, 0.0, 0.0, 1.0, -float(round(m)))


def rotate(image, degrees):
    """Counter-clockwise about the image centre, as PIL's Image.rotate."""
    h, w = image.shape[:2]
    t = -np.radians(degrees)
    a, b = round(np.cos(t), 15), round(np.sin(t), 15)
    cx, cy = w / 2.0, h / 2.0
    return _affine(image, a, b, cx - a * cx - b * cy, -b, a, cy + b * cx - a * cy)


def _blend(image: np.ndarray, other: np.ndarray, factor: float) -> np.ndarray:
    """PIL's ImageEnhance: other + factor * (image - other), clipped to uint8."""
    out = other + factor * (image.astype(np.float32) - other)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _gray(image: np.ndarray) -> np.ndarray:
    if image.shape[-1] == 1:
        return image.astype(np.float32)
    weights = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601-2, as PIL's "L"
    return (image.astype(np.float32) @ weights)[..., None]


def brightness(image, m):
    return _blend(image, np.zeros_like(image, np.float32), 1.0 + m)


def color(image, m):
    return _blend(image, _gray(image), 1.0 + m)


def contrast(image, m):
    mean = int(np.mean(np.rint(_gray(image))) + 0.5)  # PIL: the grey image's rounded mean
    return _blend(image, np.full(image.shape, mean, np.float32), 1.0 + m)


def sharpness(image, m):
    import cv2

    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
    smooth = image.astype(np.float32).copy()
    inner = cv2.filter2D(image.astype(np.float32), -1, kernel).reshape(image.shape)
    smooth[1:-1, 1:-1] = np.rint(inner[1:-1, 1:-1])  # PIL leaves the border as it was
    return _blend(image, smooth, 1.0 + m)


def posterize(image, bits):
    shift = 8 - int(bits)
    return (image >> shift) << shift


def solarize(image, threshold):
    return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


def autocontrast(image, _=None):
    """PIL's ImageOps.autocontrast (no cutoff): each channel stretched to 0-255, truncated."""
    lo = image.min(axis=(0, 1), keepdims=True).astype(np.float64)
    hi = image.max(axis=(0, 1), keepdims=True).astype(np.float64)
    scale = 255.0 / np.maximum(hi - lo, 1)
    out = np.where(hi > lo, np.trunc(image * scale - lo * scale), image)
    return np.clip(out, 0, 255).astype(np.uint8)


def equalize(image, _=None):
    """PIL's ImageOps.equalize, channel by channel."""
    out = np.empty_like(image)
    for c in range(image.shape[-1]):
        channel = image[..., c]
        histogram = np.bincount(channel.ravel(), minlength=256)
        nonzero = histogram[histogram > 0]
        step = (int(histogram.sum()) - int(nonzero[-1])) // 255 if len(nonzero) else 0
        if step == 0:
            out[..., c] = channel
            continue
        lut = (np.concatenate([[0], np.cumsum(histogram)[:-1]]) + step // 2) // step
        out[..., c] = np.clip(lut, 0, 255).astype(np.uint8)[channel]
    return out


def identity(image, _=None):
    return image


# name -> (operation, magnitudes of the 31 bins given the image size, signed)
Space = dict[str, tuple[Callable, Callable[[int, int], np.ndarray], bool]]


def _space(wide: bool) -> Space:
    """torchvision's augmentation spaces: RandAugment's and TrivialAugmentWide's."""
    lin = lambda top: (lambda h, w: np.linspace(0.0, top, BINS))  # noqa: E731
    none = lambda h, w: np.zeros(BINS)  # noqa: E731
    bits = 6 if wide else 4
    return {
        "identity": (identity, none, False),
        "shear_x": (shear_x, lin(0.99 if wide else 0.3), True),
        "shear_y": (shear_y, lin(0.99 if wide else 0.3), True),
        "translate_x": (translate_x, (lin(32.0) if wide else
                                      (lambda h, w: np.linspace(0, 150 / 331 * w, BINS))), True),
        "translate_y": (translate_y, (lin(32.0) if wide else
                                      (lambda h, w: np.linspace(0, 150 / 331 * h, BINS))), True),
        "rotate": (rotate, lin(135.0 if wide else 30.0), True),
        "brightness": (brightness, lin(0.99 if wide else 0.9), True),
        "color": (color, lin(0.99 if wide else 0.9), True),
        "contrast": (contrast, lin(0.99 if wide else 0.9), True),
        "sharpness": (sharpness, lin(0.99 if wide else 0.9), True),
        "posterize": (posterize,
                      lambda h, w: 8 - np.round(np.arange(BINS) / ((BINS - 1) / bits)), False),
        "solarize": (solarize, lambda h, w: np.linspace(255.0, 0.0, BINS), False),
        "autocontrast": (autocontrast, none, False),
        "equalize": (equalize, none, False),
    }


RAND_AUGMENT, TRIVIAL_AUGMENT_WIDE = _space(False), _space(True)


def _apply(image: np.ndarray, space: Space, name: str, bin_: int, rng: np.random.Generator):
    op, magnitudes, signed = space[name]
    m = float(magnitudes(*image.shape[:2])[bin_])
    if signed and rng.random() < 0.5:
        m = -m
    return op(image, m)


def rand_augment(image: np.ndarray, rng: np.random.Generator, num_ops: int = 2,
                 magnitude: int = 9) -> np.ndarray:
    """`num_ops` operations drawn uniformly (with replacement), each at bin `magnitude`."""
    names = list(RAND_AUGMENT)
    for _ in range(num_ops):
        image = _apply(image, RAND_AUGMENT, names[rng.integers(len(names))], magnitude, rng)
    return image


def trivial_augment_wide(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One operation drawn uniformly, at a magnitude bin drawn uniformly."""
    names = list(TRIVIAL_AUGMENT_WIDE)
    name = names[rng.integers(len(names))]
    return _apply(image, TRIVIAL_AUGMENT_WIDE, name, int(rng.integers(BINS)), rng)
