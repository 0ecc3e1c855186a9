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


def thresholded_targets(labels: jax.Array, partners: jax.Array, lam: jax.Array,
                        num_classes: int, label_smoothing: float, threshold: float
                        ) -> jax.Array:
    """The mixed, smoothed one-hot targets lam * t(labels) + (1 - lam) * t(partners), each
    entry above `threshold` set to 1 and the others to 0 (timm's BinaryCrossEntropy with
    target_threshold: a mixed image is then fully of both classes)."""
    mixed = (lam * _targets(labels, num_classes, label_smoothing)
             + (1.0 - lam) * _targets(partners, num_classes, label_smoothing))
    return (mixed > threshold).astype(jnp.float32)


def get_loss(name: str, label_smoothing: float = 0.0, target_threshold: float = 0.0) -> Loss:
    """loss(logits, labels) -> per-example losses for loss `name`. With `target_threshold`
    (sigmoid_cross_entropy only) the loss also has `.mixed(logits, labels, partners, lam)`,
    against the thresholded mixed targets, which the train step uses when it mixes."""
    if name not in LOSSES:
        raise ValueError(f"loss={name!r}; expected one of {tuple(LOSSES)}")
    fn = LOSSES[name]
    if not target_threshold:
        return lambda logits, labels: fn(logits, labels, label_smoothing)
    if name != "sigmoid_cross_entropy":
        raise ValueError(f"target_threshold={target_threshold} is for sigmoid_cross_entropy, "
                         f"not {name!r}")

    def mixed(logits, labels, partners, lam):
        logits = logits.astype(jnp.float32)
        targets = thresholded_targets(labels, partners, lam, logits.shape[-1],
                                      label_smoothing, target_threshold)
        return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)

    def loss(logits, labels):
        return mixed(logits, labels, labels, 1.0)
    loss.mixed = mixed
    return loss
