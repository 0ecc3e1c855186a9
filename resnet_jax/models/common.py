"""Partials of nn.Conv / nn.BatchNorm / nn.Dense with the zoo's conventions."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax.numpy as jnp
from flax import linen as nn

from resnet_jax.models.layers import kaiming_normal_fan_out, torch_linear_kernel_init

ModuleDef = Any
Dtype = Any


def make_conv(
    dtype: Dtype,
    use_bias: bool = False,
    conv_general_dilated: Callable | None = None,
    kernel_init: Callable = kaiming_normal_fan_out,
) -> ModuleDef:
    """nn.Conv with float32 parameters, `dtype` compute and an optional conv primitive."""
    return functools.partial(
        nn.Conv,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        conv_general_dilated=conv_general_dilated,
    )


def make_norm(
    train: bool,
    dtype: Dtype,
    momentum: float,
    epsilon: float,
    axis_name: str | None,
    batch_norm: ModuleDef | None = None,
) -> ModuleDef:
    """nn.BatchNorm (or the drop-in `batch_norm` class) in batch-statistics mode when
    training, running averages otherwise."""
    return functools.partial(
        batch_norm or nn.BatchNorm,
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=jnp.float32,
        axis_name=axis_name if train else None,
    )


def make_dense(dtype: Dtype, kernel_init: Callable = torch_linear_kernel_init) -> ModuleDef:
    """nn.Dense with float32 parameters and PyTorch's default initialisation."""
    return functools.partial(
        nn.Dense, dtype=dtype, param_dtype=jnp.float32, kernel_init=kernel_init
    )


def pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric explicit padding of k//2, as torchvision's convolutions use."""
    return ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """Raise a ValueError naming `value` unless it is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; expected one of {allowed}")
