"""Classification losses, chosen by name from the config (`loss`): per-example values in
float32 from logits (N, K) and integer labels (N,)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

Loss = Callable[[jax.Array, jax.Array], jax.Array]


def _targets(labels: jax.Array, num_classes: int, label_smoothing: float) -> jax.Array:
    one_hot = jax.nn.one_hot(labels, num_classes)
    return optax.smooth_labels(one_hot, label_smoothing) if label_smoothing else one_hot


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                          ) -> jax.Array:
    """Softmax cross-entropy against (optionally smoothed) one-hot labels."""
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy(logits, _targets(labels, logits.shape[-1], label_smoothing))


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                          ) -> jax.Array:
    """Independent binary cross-entropies per class, summed over classes (as big_vision's
    sigmoid_xent; Beyer et al. 2020, "Are we done with ImageNet?")."""
    logits = logits.astype(jnp.float32)
    targets = _targets(labels, logits.shape[-1], label_smoothing)
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "softmax_cross_entropy": softmax_cross_entropy,
    "sigmoid_cross_entropy": sigmoid_cross_entropy,
}


def get_loss(name: str, label_smoothing: float = 0.0) -> Loss:
    """loss(logits, labels) -> per-example losses for loss `name`."""
    if name not in LOSSES:
        raise ValueError(f"loss={name!r}; expected one of {tuple(LOSSES)}")
    fn = LOSSES[name]
    return lambda logits, labels: fn(logits, labels, label_smoothing)
