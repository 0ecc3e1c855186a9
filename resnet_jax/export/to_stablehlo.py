"""A JAX function of images as a serialized `jax.export` artefact (StableHLO with its calling
convention) with a dynamic batch dimension: `jax.export.deserialize(data).call(images)` runs
it in any process with jax installed, without the code that made it."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

BATCH = "batch"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def to_stablehlo(fn: Callable, image_shape: tuple[int, ...], dtype=jnp.float32,
                 platforms: tuple[str, ...] = PLATFORMS) -> bytes:
    """The serialized export of `fn(images)` (images: (batch, *image_shape), any batch),
    lowered for each of `platforms`; whatever `fn` closes over (the weights) is stored in it."""
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
        raise ValueError(f"platforms={tuple(platforms)!r}; expected some of {PLATFORMS}")
    batch, = jax.export.symbolic_shape(BATCH)
    images = jax.ShapeDtypeStruct((batch, *image_shape), dtype)
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(images)
    return bytes(exported.serialize())
