"""The zoo as `flax.nnx` modules: a linen model wrapped by `flax.nnx.bridge.ToNNX`, its
parameters (`nnx.Param`) and batch statistics (`nnx.BatchStat`) held in the NNX module,
called as NNX code calls a model: `model(x, train=True)` updates the batch statistics in
place, `model(x)` evaluates with them.

`flax.nnx` is imported on first use, not with this module: flax 0.12.8's nnx does not
import under jax 0.12.0.1 (`jax.experimental.hijax` lacks `HiPrimitive`), and the rest of
the zoo must import there."""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
from flax import linen as nn


@functools.cache
def zoo_model_class() -> type:
    """ZooModel, the nnx.Module holding a zoo model (built on first use)."""
    from flax import nnx
    from flax.nnx import bridge

    class ZooModel(nnx.Module):
        """A zoo model in NNX; `linen` is the wrapped flax.linen module (its fields, its
        `tabulate`), `inner` the bridge holding the variables."""

        def __init__(self, linen: nn.Module, sample: jnp.ndarray, rngs: nnx.Rngs):
            self.linen = nnx.static(linen) if hasattr(nnx, "static") else linen
            self.inner = bridge.ToNNX(linen, rngs=rngs)
            bridge.lazy_init(self.inner, sample, train=False)

        def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
            """Logits (float32); in training BatchNorm uses and updates batch statistics and
            dropout/stochastic depth draw from the `dropout` stream of the module's rngs."""
            return self.inner(x, train=train, mutable=["batch_stats"] if train else False)

    return ZooModel


def nnx_model(linen: nn.Module, input_shape: tuple[int, ...], rngs: Any) -> Any:
    """`linen` as a ZooModel, its variables created for (1, *input_shape) inputs."""
    return zoo_model_class()(linen, jnp.zeros((1, *input_shape), jnp.float32), rngs)


def linen_variables(model: Any) -> dict[str, Any]:
    """{"params", "batch_stats"} of a ZooModel as the linen model takes them (plain dicts
    of arrays): for `model.linen.apply`, checkpoints and the converters."""
    from flax import nnx

    return {"params": nnx.to_pure_dict(nnx.state(model.inner, nnx.Param)),
            "batch_stats": nnx.to_pure_dict(nnx.state(model.inner, nnx.BatchStat))}
