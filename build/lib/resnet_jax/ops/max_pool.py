"""Max-pooling with a hand-written backward pass: `nn.max_pool`'s numbers, cheaper on XLA:CPU.

Autodiff of `nn.max_pool` (a max `reduce_window`) transposes into `select_and_scatter_add`,
which XLA:CPU expands into an iota, a variadic `reduce_window` over (value, index) pairs and
a scatter: 190-330 ms for the ResNet stem's 3x3/2 pool at batch 32, 112x112x64 on the 2-core
CPU of docs/cpu_speed_log.md (section 13), where the pool's input is 103 MB.
Here:

- forward: the maximum of the window's k*k strided slices of the (-inf padded) input, one
  element-wise fusion; the values are the same (max is exact).
- backward: one fusion finds, for every output, which window offset held its maximum (the
  first one in row-major window order, as XLA's `select_and_scatter` with `ge` picks on
  ties) as an int8 index; then, for every phase (row % stride, column % stride) of the
  input, the output gradient is added at the offsets that land there (at most
  ceil(k / stride)^2 shifted copies, no interior padding), and the phases are interleaved
  by a reshape.

Gradients equal autodiff of `nn.max_pool` exactly for non-overlapping windows and to float
rounding where windows overlap (an input that is the maximum of several windows sums their
gradients in another order); tests/ops/test_max_pool.py checks both, ties included.

`max_pool` takes `nn.max_pool`'s arguments; inputs it does not cover (not NHWC 4-D, not
floating point) go to `nn.max_pool` unchanged. `ops.cpu.layers()` offers it as the models'
`pool`, together with `ops.cpu_conv`'s convolution and `ops.batch_norm`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from resnet_jax.ops.cpu_conv import materialize

Array = jax.Array
Pairs = tuple[tuple[int, int], tuple[int, int]]


def _pads(shape: Sequence[int], window: tuple[int, int], strides: tuple[int, int],
          padding) -> Pairs | None:
    """Spatial (low, high) padding as nn.max_pool would apply it, or None if unsupported."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            return None
        pads = lax.padtype_to_pads(tuple(shape[1:3]), window, strides, padding.upper())
        return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]
    pads = tuple(tuple(p) for p in padding)
    if len(pads) != 2 or any(len(p) != 2 for p in pads):
        return None
    return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]


def _padded(x: Array, pads: Pairs) -> Array:
    if all(p == (0, 0) for p in pads):
        return x
    return lax.pad(x, jnp.array(-jnp.inf, x.dtype),
                   ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))


def _out_size(padded: int, window: int, stride: int) -> int:
    return (padded - window) // stride + 1


def _views(xp: Array, window: tuple[int, int], strides: tuple[int, int]) -> list[Array]:
    """The k*k strided slices of the padded input, one per window offset, row-major."""
    oh, ow = (_out_size(xp.shape[1 + d], window[d], strides[d]) for d in range(2))
    views = []
    for i in range(window[0]):
        for j in range(window[1]):
            limit = (xp.shape[0], i + (oh - 1) * strides[0] + 1,
                     j + (ow - 1) * strides[1] + 1, xp.shape[3])
            views.append(lax.slice(xp, (0, i, j, 0), limit, (1, strides[0], strides[1], 1)))
    return views


def _forward(x: Array, window, strides, pads) -> Array:
    return functools.reduce(lax.max, _views(_padded(x, pads), window, strides))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: Array, window, strides, pads) -> Array:
    return _forward(x, window, strides, pads)


def _max_pool_fwd(x, window, strides, pads):
    y = _forward(x, window, strides, pads)
    return y, (x, y)


def _max_pool_bwd(window, strides, pads, residuals, dy):
    x, y = residuals
    xp = _padded(x, pads)
    views = _views(xp, window, strides)
    # Offset of each output's maximum: the first in row-major window order (XLA's tie rule).
    index = jnp.full(y.shape, len(views), jnp.int32)
    for k in reversed(range(len(views))):
        index = jnp.where(views[k] == y, k, index)
    # Through a conditional, so that XLA computes the index once instead of fusing its
    # comparisons into every consumer.
    index, dy = materialize(index.astype(jnp.int8 if len(views) < 127 else jnp.int32), dy)

    (kh, kw), (sh, sw) = window, strides
    oh, ow = y.shape[1:3]
    rows, cols = -(-xp.shape[1] // sh), -(-xp.shape[2] // sw)  # phase grid
    zero = jnp.zeros((), dy.dtype)
    phase_rows = []
    for a in range(sh):
        phase_cols = []
        for b in range(sw):
            acc = jnp.zeros((x.shape[0], rows, cols, x.shape[3]), dy.dtype)
            # Offsets (a + sh*m, b + sw*n) land on this phase, shifted by (m, n) outputs.
            for m in range(-(-(kh - a) // sh)):
                for n in range(-(-(kw - b) // sw)):
                    k = (a + sh * m) * kw + (b + sw * n)
                    g = jnp.where(index == k, dy, zero)
                    acc = acc + lax.pad(g, zero, ((0, 0, 0), (m, rows - oh - m, 0),
                                                  (n, cols - ow - n, 0), (0, 0, 0)))
            phase_cols.append(acc)
        phase_rows.append(jnp.stack(phase_cols, axis=3))  # (N, rows, cols, sw, C)
    dxp = jnp.stack(phase_rows, axis=2)  # (N, rows, sh, cols, sw, C)
    dxp = dxp.reshape(x.shape[0], rows * sh, cols * sw, x.shape[3])
    (top, _), (left, _) = pads
    dx = lax.slice(dxp, (0, top, left, 0),
                   (x.shape[0], top + x.shape[1], left + x.shape[2], x.shape[3]))
    return (dx,)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(inputs: Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: str | Sequence[tuple[int, int]] = "VALID") -> Array:
    """`nn.max_pool` for NHWC inputs with the backward pass above; other inputs go to
    `nn.max_pool`."""
    window = tuple(int(w) for w in window_shape)
    stride = tuple(int(s) for s in strides) if strides is not None else (1,) * len(window)
    pads = None
    if (inputs.ndim == 4 and len(window) == 2 and len(stride) == 2
            and jnp.issubdtype(inputs.dtype, jnp.floating)):
        pads = _pads(inputs.shape, window, stride, padding)
    if pads is None or any(_out_size(inputs.shape[1 + d] + sum(pads[d]), window[d], stride[d])
                           < 1 for d in range(2)):
        return nn.max_pool(inputs, window_shape, strides, padding)
    return _max_pool(inputs, window, stride, pads)
