"""Partials of the injected conv / norm constructors and nn.Dense with the zoo's conventions.

LAYER_FIELDS names the constructors a model takes in the Flax idiom (`conv: ModuleDef =
nn.Conv`, `norm`, `pool`): a backend's drop-in set replaces them without the model knowing.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax.numpy as jnp
from flax import linen as nn

from resnet_jax.models.layers import kaiming_normal_fan_out, torch_linear_kernel_init

ModuleDef = Any
LAYER_FIELDS = ("conv", "norm", "pool")
Dtype = Any


def make_conv(
    conv: ModuleDef,
    dtype: Dtype,
    use_bias: bool = False,
    kernel_init: Callable = kaiming_normal_fan_out,
) -> ModuleDef:
    """The model's `conv` constructor with float32 parameters and `dtype` compute."""
    return functools.partial(
        conv,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
    )


def make_norm(
    norm: ModuleDef,
    train: bool,
    dtype: Dtype,
    momentum: float,
    epsilon: float,
    axis_name: str | None,
) -> ModuleDef:
    """The model's `norm` constructor (BatchNorm's arguments) in batch-statistics mode when
    training, running averages otherwise."""
    return functools.partial(
        norm,
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
