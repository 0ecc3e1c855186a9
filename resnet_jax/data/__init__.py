"""Data: sources (tfds, local IDX files), per-batch transforms, and the batch pipeline."""

from resnet_jax.data.order import steps_per_epoch
from resnet_jax.data.pipeline import EvalInput, TrainInput, eval_batches, train_batches
from resnet_jax.data.sources import DATASETS, ArraySource, load_source

__all__ = ["DATASETS", "ArraySource", "EvalInput", "TrainInput", "eval_batches", "load_source",
           "steps_per_epoch", "train_batches"]
