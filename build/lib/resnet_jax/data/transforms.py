"""Per-batch image transforms in NumPy. Random choices are drawn for the whole global batch
from a generator seeded by (seed, step), so they do not depend on how the batch is split
across processes or on where a run was resumed."""

from __future__ import annotations

import dataclasses

import numpy as np

AUGMENTATIONS = ("none", "flip", "crop_flip", "inception")


CHANNEL_ORDERS = ("RGB", "BGR")


def normalize(images: np.ndarray, mean, std, channel_order: str = "RGB") -> np.ndarray:
    """uint8 NHWC (or HWC) -> float32, scaled to [0, 1] then standardised per channel:
    x / (255 std) - mean / std, in place in one float32 buffer. With channel_order "BGR",
    three channels are reversed first (Caffe's and Keras' 'caffe' mode); mean and std are
    then in that order."""
    if channel_order not in CHANNEL_ORDERS:
        raise ValueError(f"channel_order={channel_order!r}; expected one of {CHANNEL_ORDERS}")
    if channel_order == "BGR" and images.shape[-1] == 3:
        images = images[..., ::-1]
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    channels = images.shape[-1]
    if mean.shape not in ((1,), (channels,)) or std.shape not in ((1,), (channels,)):
        raise ValueError(f"mean {mean.tolist()} and std {std.tolist()} do not fit images with "
                         f"{channels} channel(s) (shape {images.shape})")
    images = np.ascontiguousarray(images)
    out = np.empty(images.shape, np.float32)
    # per-channel factors tiled along whole rows: an inner loop of W*C, not of C
    width = images.shape[-2] * channels
    rows = out.reshape(-1, width)
    scale = np.broadcast_to(1.0 / (255.0 * std), (images.shape[-2], channels)).reshape(-1)
    shift = np.broadcast_to(mean / std, (images.shape[-2], channels)).reshape(-1)
    np.multiply(images.reshape(-1, width), scale, out=rows, casting="unsafe")
    rows -= shift
    return out


def crop_flip_params(rng: np.random.Generator, n: int, pad: int, flip: bool):
    """Offsets in [0, 2*pad] and flip flags for n images."""
    offsets = rng.integers(0, 2 * pad + 1, size=(n, 2)) if pad else np.zeros((n, 2), np.int64)
    flips = rng.random(n) < 0.5 if flip else np.zeros(n, bool)
    return offsets, flips


def pad_crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int):
    """Zero-pad by `pad`, crop back to the original size at `offsets`, mirror where `flips`."""
    n, h, w, _ = images.shape
    if pad:
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        rows = offsets[:, 0, None] + np.arange(h)[None, :]  # (n, h)
        cols = offsets[:, 1, None] + np.arange(w)[None, :]  # (n, w)
        images = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if flips.any():
        images = images.copy()
        images[flips] = images[flips, :, ::-1]
    return images


@dataclasses.dataclass(frozen=True)
class ImageOps:
    """The per-image random operations of training, after the crop and flip: an automatic
    augmentation `policy` ('rand_augment' with `num_ops` at bin `magnitude`, or
    'trivial_augment_wide'; '' for none), drawn from the example's seed. (Random erasing
    works on the device: `on_device.DeviceInput`.)"""

    policy: str = ""
    num_ops: int = 2
    magnitude: int = 9

    def __post_init__(self):
        from resnet_jax.data.autoaugment import BINS, POLICIES

        if self.policy and self.policy not in POLICIES:
            raise ValueError(f"auto_augment={self.policy!r}; expected one of {('',) + POLICIES}")
        if not 0 <= self.magnitude < BINS:
            raise ValueError(f"magnitude={self.magnitude}; expected 0..{BINS - 1}")

    def __bool__(self) -> bool:
        return bool(self.policy)

    def __call__(self, image: np.ndarray, seed: int) -> np.ndarray:
        if self.policy:
            from resnet_jax.data import autoaugment

            rng = np.random.default_rng([int(seed), 3])
            if self.policy == "rand_augment":
                image = autoaugment.rand_augment(image, rng, self.num_ops, self.magnitude)
            else:
                image = autoaugment.trivial_augment_wide(image, rng)
        return image


def _resize(image: np.ndarray, size: tuple[int, int], interpolation: str = "bilinear"
            ) -> np.ndarray:
    from PIL import Image

    squeeze = image.shape[-1] == 1
    pil = Image.fromarray(image[..., 0] if squeeze else image)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    out = np.asarray(pil.resize((size[1], size[0]), resample))
    return out[..., None] if squeeze else out


def random_resized_crop(rng: np.random.Generator, image: np.ndarray, size: int,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """Inception-style crop (Szegedy et al. 2015) of a decoded image: the box of
    `images.random_resized_crop_box`, resized to size by PIL (the pipeline before grain)."""
    from resnet_jax.data.images import random_resized_crop_box

    box = random_resized_crop_box(rng, image.shape[0], image.shape[1], scale, ratio)
    if box is None:
        return center_crop(image, size)
    left, top, right, bottom = box
    return _resize(image[top:bottom, left:right], (size, size))


def center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875,
                interpolation: str = "bilinear") -> np.ndarray:
    """Resize the shorter side to size / crop_fraction (PIL, antialiased), then take the
    central size x size."""
    h, w = image.shape[:2]
    short = int(round(size / crop_fraction))
    nh, nw = (short, max(short, round(w * short / h))) if h <= w else (max(short, round(h * short / w)), short)
    image = _resize(image, (nh, nw), interpolation)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[top:top + size, left:left + size]
