"""A 2-D convolution that runs well on the CPU backend, and the compiler options that go
with it.

Three things made the train step slow on the CPU (docs/cpu_speed_log.md):

1. XLA:CPU hands convolutions to YNNPACK by default, whose weight gradient runs at a few
   GFLOP/s (2.4 s for a 3x3, 64-channel conv at batch 128 and 32x32; Eigen's takes 0.14 s).
   `ops.cpu.jit_options()` keeps YNNPACK for dots and reductions only.
2. The weight gradient is a convolution over the batch, so XLA transposes its two inputs to
   batch-minor layouts. It fuses the producers of those inputs (BatchNorm, ReLU, residual
   adds of up to four blocks) into the transposes and recomputes them with strided reads:
   60-130 ms per transpose in a ResNet-20 step against 2-4 ms for a plain one. Here the
   backward pass passes its saved input and the output gradient through a conditional,
   a boundary XLA does not fuse across, so the transposes read materialized buffers.
3. Eigen's convolutions themselves: at 16-64 channels they take 1.5-3x oneDNN's (PyTorch's
   library). `conv_general_dilated` sends float32 convolutions with output maps of 8x8 and
   more to oneDNN (`ops.dnnl_conv`, where its library is built); the rest stay XLA's
   (`xla_conv_general_dilated`), with the materialized weight gradient of point 2, and maps
   smaller than the kernel become one matmul (`im2col_conv`).

Both hooks have lax's signature, so they plug into `nn.Conv(conv_general_dilated=...)`; cases
they do not cover (dilation, batch groups, other layouts) fall through to lax.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.ops import dnnl_conv

NHWC = ("NHWC", "HWIO", "NHWC")

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


def conv_general_dilated(*args, operands: str = "float32", **kwargs) -> jax.Array:
    """`lax.conv_general_dilated` (same signature) through oneDNN (`ops.dnnl_conv`) where its
    library is available and it pays (`_onednn_pays`), else as `xla_conv_general_dilated`.

    `operands="bfloat16"` (bind it with functools.partial) hands oneDNN bfloat16 operands
    with float32 accumulation and results, and sends it every float32 convolution whose maps
    are not smaller than the kernel: at bfloat16 it is faster than XLA's float32 at 4x4 and
    7x7 maps too (docs/cpu_speed_log.md section 16)."""
    return _conv_general_dilated(*args, **kwargs, native=True, operands=operands)


def xla_conv_general_dilated(*args, **kwargs) -> jax.Array:
    """`lax.conv_general_dilated` (same signature) on XLA's convolutions, with a weight
    gradient that reads materialized inputs."""
    return _conv_general_dilated(*args, **kwargs, native=False)


def _conv_general_dilated(
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
    *,
    native: bool,
    operands: str = "float32",
) -> jax.Array:
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
    out_dtype = jnp.result_type(lhs, rhs)
    if jnp.finfo(out_dtype).bits < 32:
        # Eigen accumulates half-precision convolutions in half precision (1-2% off for an
        # 11x11 kernel); compute in float32 and round once, as XLA's other CPU paths do.
        return _conv_general_dilated(
            lhs.astype(jnp.float32), rhs.astype(jnp.float32), window_strides, padding,
            lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
            batch_group_count, precision, native=native, operands=operands).astype(out_dtype)
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    strides = tuple(int(s) for s in window_strides)
    if feature_group_count == 1 and _smaller_than_kernel(lhs.shape, rhs.shape, strides, pads):
        return im2col_conv(lhs, rhs, strides, pads, precision)
    groups = int(feature_group_count)
    if native and _onednn_pays(lhs.shape, rhs.shape, strides, pads, operands) and (
            dnnl_conv.supports(lhs, rhs, pads, groups)):
        return dnnl_conv.conv(lhs, rhs, strides, pads, groups, operands)
    return _conv(lhs, rhs, strides, pads, int(feature_group_count), precision)


def _onednn_pays(x_shape, w_shape, strides, pads, operands: str = "float32") -> bool:
    """Whether oneDNN runs this convolution faster than XLA in a train step: output maps of
    at least 8x8 (any size with bfloat16 operands), and not a strided 1x1 convolution (XLA's
    is a strided slice and a matmul).
    Measured in-step (`python -m benchmarks.probes.ab_step --op conv`, cpu_speed_log.md section
    14): with oneDNN on every convolution the ResNet-50 on 28x28 images (maps of 7x7 and
    less, 64-2048 channels) ran at 0.91x, with this rule at 1.01x; the CIFAR ResNets (maps
    of 32x32 to 8x8) at 1.43-1.45x either way."""
    out = [(x_shape[1 + d] + sum(pads[d]) - w_shape[d]) // strides[d] + 1 for d in range(2)]
    if min(out) < 8 and operands == "float32":
        return False
    return w_shape[0] * w_shape[1] != 1 or tuple(strides) == (1, 1)


def _smaller_than_kernel(x_shape, w_shape, strides, pads) -> bool:
    """Whether the input or the output map is smaller than the kernel in either dimension
    (the input gradient is a convolution over the output map)."""
    for d in range(2):
        k = w_shape[d]
        out = (x_shape[1 + d] + sum(pads[d]) - k) // strides[d] + 1
        if x_shape[1 + d] < k or out < k:
            return True
    return False


def _lax_conv(x, w, strides, pads, groups, precision):
    return lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=NHWC, feature_group_count=groups,
        precision=precision,
    )


def im2col_conv(x: jax.Array, w: jax.Array, strides: Sequence[int],
                pads: Sequence[tuple[int, int]], precision=None) -> jax.Array:
    """An NHWC/HWIO convolution as one matmul of the input's patches with the kernel.

    For maps smaller than the kernel (a 3x3 conv on 2x2 or 1x1 maps, as in a ResNet-50 on
    28x28 images) XLA:CPU swaps the operands into a convolution that took 100-380 ms where
    this matmul takes a few; the same happens to the input gradient when the output map is
    smaller than the kernel. Differentiated by JAX as written (pads, slices and dots).
    """
    kh, kw, cin, cout = w.shape
    n, h, wd, _ = x.shape
    (pt, pb), (pl, pr) = pads
    sh, sw = strides
    oh = (h + pt + pb - kh) // sh + 1
    ow = (wd + pl + pr - kw) // sw + 1
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    taps = [lax.slice(xp, (0, i, j, 0), (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, cin),
                      (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
    patches = jnp.stack(taps, axis=3).reshape(n * oh * ow, kh * kw * cin)
    y = jnp.dot(patches, w.reshape(kh * kw * cin, cout), precision=precision)
    return y.reshape(n, oh, ow, cout)


def materialize(x: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x, dy) through a conditional, so that XLA cannot fuse their producers into consumers.

    The branch taken when dy's first element is a number returns its operands; the other one
    (a step that has already gone NaN) returns NaNs (zeros for an integer x). Two different
    branches keep XLA from folding the conditional away.
    """
    ok = dy.reshape(-1)[0] == dy.reshape(-1)[0]
    return lax.cond(ok, lambda a, b: (a, b), lambda a, b: (_poison(a), _poison(b)), x, dy)


def _poison(a: jax.Array) -> jax.Array:
    """NaNs for floating point arrays, zeros for integer ones (e.g. ops.max_pool's index)."""
    return a * (jnp.nan if jnp.issubdtype(a.dtype, jnp.floating) else 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, pads, groups, precision):
    return _lax_conv(x, w, strides, pads, groups, precision)


def _conv_fwd(x, w, strides, pads, groups, precision):
    return _lax_conv(x, w, strides, pads, groups, precision), (x, w)


def _conv_bwd(strides, pads, groups, precision, residuals, dy):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x_: _lax_conv(x_, w, strides, pads, groups, precision), x)
    (dx,) = input_vjp(dy)
    x_m, dy_m = materialize(x, dy)
    _, weight_vjp = jax.vjp(lambda w_: _lax_conv(x_m, w_, strides, pads, groups, precision), w)
    (dw,) = weight_vjp(dy_m)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)
