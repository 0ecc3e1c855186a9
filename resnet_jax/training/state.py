"""The training state: a plain pytree, so every strategy can map, shard and save it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """step, params, batch_stats and opt_state; the model and optimizer live outside."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def create_train_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                       input_shape: tuple[int, ...]) -> TrainState:
    """Initialise parameters on a dummy batch of `input_shape` (H, W, C) and the optimizer."""
    x = jnp.zeros((1, *input_shape), jnp.float32)
    variables = model.init({"params": rng, "dropout": rng}, x)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
    )
