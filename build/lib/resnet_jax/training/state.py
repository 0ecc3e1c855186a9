"""The training state: a plain pytree, so every strategy can map, shard and save it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    """step, params, batch_stats, opt_state and the exponential moving average `ema`
    ({"params", "batch_stats"}, or {} when off); the model and optimizer live outside."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema: Any = struct.field(default_factory=dict)

    def averaged(self) -> "TrainState":
        """This state with the EMA weights as its params and batch statistics."""
        if not self.ema:
            raise ValueError("this run keeps no EMA of its weights (ema_decay=0)")
        return self.replace(params=self.ema["params"], batch_stats=self.ema["batch_stats"])


def create_train_state(model, tx: optax.GradientTransformation, rng: jax.Array,
                       input_shape: tuple[int, ...], ema: bool = False) -> TrainState:
    """Initialise parameters on a dummy batch of `input_shape` (H, W, C) and the optimizer;
    with `ema`, the moving average starts at the initial weights."""
    x = jnp.zeros((1, *input_shape), jnp.float32)
    variables = model.init({"params": rng, "dropout": rng}, x)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema={"params": params, "batch_stats": batch_stats} if ema else {},
    )
