"""What happens to a batch on the device, inside the jitted steps: uint8 images become the
model's float32 input (channel order, scale to [0, 1], per-channel standardisation), with
random erasing in training.

The host hands over uint8 (a quarter of float32's bytes) and does no per-pixel float work.
Random draws come from a key that is a function of (seed, step) and of each example's index
in the global batch, so they do not depend on how the batch is split over devices or
processes, nor on where a run was resumed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from resnet_jax.data.transforms import CHANNEL_ORDERS

ERASE_TRIES = 10  # candidate rectangles per image; the first that fits is used


@dataclasses.dataclass(frozen=True)
class DeviceInput:
    """uint8 NHWC images -> the model's float32 input: channels reversed for "BGR", x / 255
    standardised by `mean` and `std` (on the [0, 1] scale, in that channel order); one
    channel repeated to `channels` = 3 where the model takes RGB. With a key and `erase` > 0,
    each image is erased (Zhong et al. 2020) with probability `erase`."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_order: str = "RGB"
    channels: int = 0  # 0: as the images come
    erase: float = 0.0

    def __post_init__(self):
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order={self.channel_order!r}; expected one of "
                             f"{CHANNEL_ORDERS}")
        if not 0.0 <= self.erase <= 1.0:
            raise ValueError(f"random_erasing={self.erase}; expected a probability in [0, 1]")

    def __call__(self, images: jax.Array, key: jax.Array | None = None,
                 first_index: jax.Array | int = 0) -> jax.Array:
        """The float32 input of `images`; `key` (training) draws the erasing of example
        `first_index + i` of the global batch from `fold_in(key, first_index + i)`."""
        if jnp.issubdtype(images.dtype, jnp.floating):
            return images  # already the model's input (a caller that normalised itself)
        if self.channels == 3 and images.shape[-1] == 1:
            images = jnp.repeat(images, 3, axis=-1)
        if self.channel_order == "BGR" and images.shape[-1] == 3:
            images = images[..., ::-1]
        channels = images.shape[-1]
        mean = jnp.asarray(self.mean, jnp.float32)
        std = jnp.asarray(self.std, jnp.float32)
        if mean.shape not in ((1,), (channels,)) or std.shape not in ((1,), (channels,)):
            raise ValueError(f"mean {list(self.mean)} and std {list(self.std)} do not fit "
                             f"images with {channels} channel(s) (shape {images.shape})")
        x = images.astype(jnp.float32)
        if key is not None and self.erase > 0:
            n = images.shape[0]
            index = first_index + jnp.arange(n)
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
            x = jax.vmap(lambda k, im: erase_one(k, im, self.erase))(keys, x)
        return x * (1.0 / (255.0 * std)) - mean / std


def erase_one(key: jax.Array, image: jax.Array, probability: float, area=(0.02, 0.4),
              ratio=(0.3, 1 / 0.3)) -> jax.Array:
    """With `probability`, one rectangle of `area` of the (H, W, C) image and aspect `ratio`
    filled with uniform random values in [0, 255]; the first of ERASE_TRIES candidates that
    fits in the image (none fits: unchanged)."""
    h, w, c = image.shape
    k_apply, k_area, k_aspect, k_top, k_left, k_fill = jax.random.split(key, 6)
    target = h * w * jax.random.uniform(k_area, (ERASE_TRIES,), minval=area[0], maxval=area[1])
    aspect = jnp.exp(jax.random.uniform(k_aspect, (ERASE_TRIES,), minval=jnp.log(ratio[0]),
                                        maxval=jnp.log(ratio[1])))
    eh = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    ew = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (eh > 0) & (eh < h) & (ew > 0) & (ew < w)
    pick = jnp.argmax(fits)
    eh, ew = eh[pick], ew[pick]
    top = jnp.floor(jax.random.uniform(k_top) * (h - eh + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left) * (w - ew + 1)).astype(jnp.int32)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
    apply = (jax.random.uniform(k_apply) < probability) & fits[pick]
    fill = jnp.floor(jax.random.uniform(k_fill, image.shape) * 256.0)
    return jnp.where((inside & apply)[..., None], fill, image)
