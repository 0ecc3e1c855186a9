"""A 2-D convolution whose weight gradient runs well on XLA:CPU.

XLA:CPU lowers the weight gradient of a convolution to another convolution that contracts
over the batch, which runs at a few GFLOP/s (about 2.4 s for a 3x3, 64-channel conv at
batch 128 and 32x32). Here the forward pass and the input gradient stay lax convolutions,
and the weight gradient is one matmul per kernel tap: the strided view of the padded input
that meets the tap, contracted with the output gradient (about 0.3 s for that conv). For
small channel counts XLA's own weight gradient is faster and is kept. Same numbers as
`lax.conv_general_dilated` up to float rounding.

`conv_general_dilated` has lax's signature, so it plugs into `nn.Conv(conv_general_dilated=...)`;
cases it does not cover (dilation, batch groups, other layouts) fall through to lax.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")
# Below this many kernel channels (cin/groups * cout) XLA's own weight gradient is faster.
MIN_CHANNEL_PRODUCT = 1024


def _is_nhwc(dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == lax.conv_dimension_numbers(
            (1, 1, 1, 1), (1, 1, 1, 1), NHWC
        )
    return tuple(dimension_numbers) == NHWC


def _ones(v) -> bool:
    return v is None or all(int(d) == 1 for d in v)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """`lax.conv_general_dilated` with an im2col weight gradient for 2-D NHWC convs."""
    supported = (
        lhs.ndim == 4
        and _is_nhwc(dimension_numbers)
        and _ones(lhs_dilation)
        and _ones(rhs_dilation)
        and batch_group_count == 1
        and preferred_element_type is None
    )
    if not supported:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count, batch_group_count, precision,
            preferred_element_type,
        )
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    strides = tuple(int(s) for s in window_strides)
    return _conv(lhs, rhs, strides, pads, int(feature_group_count), precision)


def _lax_conv(x, w, strides, pads, groups, precision):
    return lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=NHWC, feature_group_count=groups,
        precision=precision,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, pads, groups, precision):
    return _lax_conv(x, w, strides, pads, groups, precision)


def _conv_fwd(x, w, strides, pads, groups, precision):
    return _lax_conv(x, w, strides, pads, groups, precision), (x, w)


def _conv_bwd(strides, pads, groups, precision, residuals, dy):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x_: _lax_conv(x_, w, strides, pads, groups, precision), x)
    (dx,) = input_vjp(dy)
    if w.shape[2] * w.shape[3] < MIN_CHANNEL_PRODUCT:
        _, weight_vjp = jax.vjp(lambda w_: _lax_conv(x, w_, strides, pads, groups, precision), w)
        (dw,) = weight_vjp(dy)
    else:
        dw = weight_gradient(x, dy, w.shape, strides, pads, groups)
    return dx, dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def weight_gradient(
    x: jax.Array,
    dy: jax.Array,
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
    groups: int = 1,
) -> jax.Array:
    """d(loss)/d(kernel) of an NHWC/HWIO convolution as one matmul per kernel tap (float32).

    For each tap (i, j) the strided view of the padded input that meets that tap is
    contracted with the output gradient over all batch and spatial positions.
    """
    kh, kw, cin_g, cout = kernel_shape
    n, oh, ow, _ = dy.shape
    sh, sw = strides
    cout_g = cout // groups
    rows = n * oh * ow
    grad = dy.reshape(rows, groups, cout_g)
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    taps = []
    for i in range(kh):
        for j in range(kw):
            view = lax.slice(
                xp, (0, i, j, 0),
                (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, xp.shape[3]),
                (1, sh, sw, 1),
            ).reshape(rows, groups, cin_g)
            taps.append(
                jnp.einsum("mgc,mgo->cgo", view, grad, preferred_element_type=jnp.float32)
            )
    return jnp.stack(taps).reshape(kh, kw, cin_g, cout)
