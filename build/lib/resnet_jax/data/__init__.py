"""Data: sources (tfds, local IDX files), per-batch transforms, and the batch pipeline."""

from resnet_jax.data.pipeline import eval_batches, steps_per_epoch, train_batches
from resnet_jax.data.sources import DATASETS, ArraySource, load_source

__all__ = ["DATASETS", "ArraySource", "eval_batches", "load_source", "steps_per_epoch",
           "train_batches"]
