"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on a batch, on the device: each
image is mixed with the next one in the batch (a roll by one), the labels kept as a pair
and a weight, so that any loss linear in its targets is lam * L(labels) + (1 - lam) *
L(partner labels)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mix_batch(key: jax.Array, images: jax.Array, labels: jax.Array, mixup_alpha: float,
              cutmix_alpha: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(mixed images, labels, partner labels, lam): mixup with lam ~ Beta(mixup_alpha,
    mixup_alpha) or CutMix with a box of area 1 - lam, lam ~ Beta(cutmix_alpha,
    cutmix_alpha); with both alphas set, one of the two per batch, each with probability
    1/2. lam is the weight of `labels` (for CutMix, the share of pixels kept)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, labels, labels, jnp.ones((), jnp.float32)
    k_choice, k_mix, k_cut, k_box = jax.random.split(key, 4)
    partner_images, partner_labels = jnp.roll(images, 1, axis=0), jnp.roll(labels, 1, axis=0)
    outputs = []
    if mixup_alpha > 0:
        lam = jax.random.beta(k_mix, mixup_alpha, mixup_alpha).astype(jnp.float32)
        mixed = lam * images + (1.0 - lam) * partner_images
        outputs.append((mixed.astype(images.dtype), lam))
    if cutmix_alpha > 0:
        lam = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha).astype(jnp.float32)
        height, width = images.shape[1], images.shape[2]
        side = jnp.sqrt(1.0 - lam)
        cy, cx = jax.random.uniform(k_box, (2,)) * jnp.array([height, width], jnp.float32)
        half_h, half_w = side * height / 2, side * width / 2
        top = jnp.clip(jnp.round(cy - half_h), 0, height).astype(jnp.int32)
        bottom = jnp.clip(jnp.round(cy + half_h), 0, height).astype(jnp.int32)
        left = jnp.clip(jnp.round(cx - half_w), 0, width).astype(jnp.int32)
        right = jnp.clip(jnp.round(cx + half_w), 0, width).astype(jnp.int32)
        rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
        box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
        mixed = jnp.where(box[None, :, :, None], partner_images, images)
        kept = 1.0 - jnp.sum(box) / (height * width)  # the box as clipped to the image
        outputs.append((mixed, kept.astype(jnp.float32)))
    if len(outputs) == 1:
        mixed, lam = outputs[0]
    else:
        use_cutmix = jax.random.bernoulli(k_choice)
        mixed = jnp.where(use_cutmix, outputs[1][0], outputs[0][0])
        lam = jnp.where(use_cutmix, outputs[1][1], outputs[0][1])
    return mixed, labels, partner_labels, lam
