"""Evaluation over a whole split: every example exactly once, on any strategy."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from resnet_jax.data import pipeline
from resnet_jax.data.sources import DatasetInfo
from resnet_jax.training.metrics import summarize_eval
from resnet_jax.training.parallel import Strategy, fetch


def evaluate(eval_step: Callable, state: Any, source: Any, info: DatasetInfo, batch_size: int,
             image_size: int | None = None, strategy: Strategy | None = None, workers: int = 0,
             skip_corrupt: bool = False) -> dict[str, Any]:
    """Means of the eval step's sums (loss, accuracy, top5_accuracy, ...), the count and the
    confusion matrix over every example of `source`, in batches of `batch_size`.

    The last batch is padded and masked. With a strategy, each process feeds its part of
    every batch and the mapped step sums over all devices; `eval_step` is then the strategy's.
    `workers` processes decode the images (0: this one); with `skip_corrupt` an unreadable
    image is masked out and counted in "corrupt_images".
    """
    put = strategy.put_eval_batch if strategy else (lambda b: b)
    first = strategy.first if strategy else (lambda m: m)
    totals, corrupt = None, 0
    for batch in pipeline.eval_batches(source, info, batch_size, image_size,
                                       jax.process_index(), jax.process_count(), workers,
                                       skip_corrupt):
        corrupt += int(np.sum(batch.pop("corrupt", 0)))
        sums = jax.tree.map(fetch, first(eval_step(state, put(batch))))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    result = summarize_eval(totals)
    if skip_corrupt:
        result["corrupt_images"] = corrupt
    return result
