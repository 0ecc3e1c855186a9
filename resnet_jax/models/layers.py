"""Layers shared by the model families: LRN, shortcuts, pooling and initialisers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

# He et al. 2015 ("Delving deep into rectifiers"), fan-out mode as in torchvision's ResNet.
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def local_response_norm(
    x: jax.Array, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0
) -> jax.Array:
    """Local response normalisation across channels (Krizhevsky et al. 2012, section 3.3).

    b[c] = a[c] / (k + alpha * sum_{c' in window(c)} a[c']^2) ** beta, where the window
    holds the `size` channels centred on c, clipped at the ends. alpha multiplies the plain
    sum as in the paper (PyTorch's LocalResponseNorm divides alpha by `size`).
    """
    if size < 1:
        raise ValueError(f"LRN size must be >= 1, got {size}")
    squares = jnp.square(x.astype(jnp.float32))
    half = size // 2
    window_sum = jax.lax.reduce_window(
        squares,
        0.0,
        jax.lax.add,
        window_dimensions=(1,) * (x.ndim - 1) + (size,),
        window_strides=(1,) * x.ndim,
        padding=((0, 0),) * (x.ndim - 1) + ((half, size - 1 - half),),
    )
    return (x / jnp.power(k + alpha * window_sum, beta).astype(x.dtype)).astype(x.dtype)


class LocalResponseNorm(nn.Module):
    """Flax module wrapper of `local_response_norm` with the paper's constants."""

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return local_response_norm(x, self.size, self.alpha, self.beta, self.k)


def zero_pad_shortcut(x: jax.Array, out_channels: int, strides: int) -> jax.Array:
    """Option A shortcut of He et al. 2015: subsample by `strides`, zero-pad new channels."""
    if strides > 1:  # a strided slice (x[:, ::s, ::s] is a gather when the batch is symbolic)
        x = jax.lax.slice(x, (0, 0, 0, 0), x.shape, (1, strides, strides, 1))
    extra = out_channels - x.shape[-1]
    if extra < 0:
        raise ValueError(
            f"zero-pad shortcut cannot reduce channels ({x.shape[-1]} -> {out_channels})"
        )
    if extra:
        # Pad the new channels on both sides, as the reference CIFAR implementations do.
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Averaging weights of PyTorch's AdaptiveAvgPool along one axis, shape (out, in)."""
    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """Average-pool NHWC `x` to `output_size` with PyTorch's adaptive bins."""
    h, w = x.shape[1:3]
    oh, ow = output_size
    if (h, w) == (oh, ow):
        return x
    ph = jnp.asarray(_adaptive_pool_matrix(h, oh), x.dtype)
    pw = jnp.asarray(_adaptive_pool_matrix(w, ow), x.dtype)
    return jnp.einsum("ih,jw,nhwc->nijc", ph, pw, x)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes of an NHWC tensor."""
    return jnp.mean(x, axis=(1, 2))
