"""BatchNorm with a hand-written backward pass: `nn.BatchNorm`'s numbers, fewer passes over
memory on XLA:CPU.

Differentiating `nn.BatchNorm` lets XLA keep the centred input `x - mean` as a residual: one
extra full-size write and read per layer (2-7 ms each at batch 128, 32x32x16 on the 2-core
CPU of docs/cpu_speed_log.md, section 11). Here the backward pass is the
closed form

    dx = scale * rstd * (dy - mean(dy) - xhat * mean(dy * xhat)),   xhat = (x - mean) * rstd

which needs only the layer's input (the convolution output, in memory anyway), the batch
statistics and one fused reduction of (dy, dy * x). The forward pass is `nn.BatchNorm`'s
formula, operation for operation (fast variance E[x^2] - E[x]^2 clipped at 0, statistics in
float32); gradients agree with autodiff of `nn.BatchNorm` to float32 rounding
(tests/ops/test_batch_norm.py), with `axis_name` (statistics synchronised over a mapped axis)
included.

`BatchNorm` is a drop-in `nn.BatchNorm` for the zoo's models (same arguments, parameter and
statistic names); `ops.cpu.layers()` offers it as the models' `norm`, together with
`ops.cpu_conv`'s convolution. In inference mode it is `nn.BatchNorm`'s computation unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

Array = jax.Array


def _sums(*xs: Array) -> tuple[Array, ...]:
    """Per-channel sums (over every axis but the last) of each argument."""
    axes = tuple(range(xs[0].ndim - 1))
    return tuple(x.sum(axes) for x in xs)


def _count(x: Array, axis_name: str | None) -> Array:
    count = jnp.asarray(x.size // x.shape[-1], jnp.float32)
    return count if axis_name is None else lax.psum(count, axis_name)


def _statistics(x: Array, axis_name: str | None) -> tuple[Array, Array]:
    """Mean and (fast, clipped) variance over all but the last axis, as nn.BatchNorm."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean, mean2 = xf.mean(axes), (xf * xf).mean(axes)
    if axis_name is not None:
        both = lax.pmean(jnp.stack([mean, mean2]), axis_name)
        mean, mean2 = both[0], both[1]
    return mean, jnp.maximum(0.0, mean2 - mean * mean)


def _normalize(x, mean, var, scale, bias, epsilon, dtype):
    y = x - mean
    mul = lax.rsqrt(var + epsilon) * scale
    return jnp.asarray(y * mul + bias, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float,
                     axis_name: str | None, dtype: Any) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm over the last axis: (y, batch mean, batch variance)."""
    mean, var = _statistics(x, axis_name)
    return _normalize(x, mean, var, scale, bias, epsilon, dtype), mean, var


def _forward(x, scale, bias, epsilon, axis_name, dtype):
    mean, var = _statistics(x, axis_name)
    y = _normalize(x, mean, var, scale, bias, epsilon, dtype)
    return (y, mean, var), (x, scale, mean, var)


def _backward(epsilon, axis_name, dtype, residuals, cotangents):
    x, scale, mean, var = residuals
    dy, dmean, dvar = cotangents
    f32 = jnp.promote_types(x.dtype, jnp.float32)
    dyf, xf = dy.astype(f32), x.astype(f32)
    # Sums of dy and dy * x (not dy * (x - mean)): then no centred copy of x is written for
    # YNNPACK's reduction to read (1.04 -> 1.06x on the ResNet-20 step, cpu_speed_log.md
    # section 11). Same conditioning as the forward's E[x^2] - E[x]^2.
    sum_dy, sum_dy_x = _sums(dyf, dyf * xf)
    sum_dy_centred = sum_dy_x - mean * sum_dy
    rstd = lax.rsqrt(var + epsilon)
    dbias, dscale = sum_dy, sum_dy_centred * rstd
    # The statistics are over the whole (possibly mapped) batch, so the terms of dx that
    # go through them are too; the parameter gradients stay per-device, as autodiff's.
    dvar = jnp.where(var > 0, dvar, 0.0)  # the variance was clipped at 0 there
    if axis_name is not None:
        sum_dy, sum_dy_centred, dmean, dvar = lax.psum(
            (sum_dy, sum_dy_centred, dmean, dvar), axis_name)
    count = _count(x, axis_name)
    gain = scale * rstd
    # dx = gain (dy - mean(dy) - xhat mean(dy xhat)) + dmean / n + 2 dvar (x - mean) / n
    #    = gain dy + coef x + offset
    coef = 2.0 * dvar / count - gain * rstd * rstd * sum_dy_centred / count
    offset = dmean / count - gain * sum_dy / count - coef * mean
    dx = gain * dyf + coef * xf + offset
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_forward, _backward)


class BatchNorm(nn.Module):
    """`nn.BatchNorm` over the last axis with `batch_norm_train`'s backward pass. Same
    arguments (the subset the zoo uses), parameters (`scale`, `bias`) and statistics
    (`batch_stats/mean`, `batch_stats/var`)."""

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Callable = nn.initializers.zeros
    scale_init: Callable = nn.initializers.ones
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average)
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                                features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                               features)
        scale = (self.param("scale", self.scale_init, features, self.param_dtype)
                 if self.use_scale else jnp.ones(features, jnp.float32))
        bias = (self.param("bias", self.bias_init, features, self.param_dtype)
                if self.use_bias else jnp.zeros(features, jnp.float32))
        dtype = self.dtype or jnp.result_type(x, scale, bias)
        if use_running_average:
            return _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, dtype)
        if self.is_initializing():
            mean, var = _statistics(x, self.axis_name)
            y = _normalize(x, mean, var, scale, bias, self.epsilon, dtype)
        else:
            y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.axis_name, dtype)
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y
