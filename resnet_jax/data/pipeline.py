"""Batches for training and evaluation.

The data order is a pure function of (seed, step): epoch e is the permutation
`default_rng([seed, e])` of the split, and step s takes its slice of it. A resumed run
therefore continues the same order with no iterator state to save. Each process keeps only
its own contiguous part of every global batch. Evaluation walks the split once in order;
the last batch is padded and carries a mask.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import numpy as np

from resnet_jax.data import transforms
from resnet_jax.data.sources import ArraySource, DatasetInfo, RecordSource

Batch = dict[str, np.ndarray]


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full training batches per epoch (the incomplete last batch is dropped)."""
    if num_examples < global_batch:
        raise ValueError(f"batch size {global_batch} exceeds the {num_examples} training examples")
    return num_examples // global_batch


def _local_slice(global_batch: int, process_index: int, process_count: int) -> slice:
    if global_batch % process_count:
        raise ValueError(
            f"batch size {global_batch} does not divide across {process_count} processes"
        )
    local = global_batch // process_count
    return slice(process_index * local, (process_index + 1) * local)


def _load(source, info: DatasetInfo, indices: np.ndarray, rng: np.random.Generator | None,
          augment: str, image_size: int | None, local: slice) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images and labels of the process-local part of a global batch of `indices`."""
    n = len(indices)
    if isinstance(source, ArraySource):
        pad = 4 if (info.image_shape or (32,))[0] >= 32 else 2
        if rng is not None and augment in ("crop_flip", "flip"):
            offsets, flips = transforms.crop_flip_params(rng, n, pad if augment == "crop_flip" else 0, True)
        images, labels = source.get_batch(indices[local])
        if rng is not None and augment in ("crop_flip", "flip"):
            images = transforms.pad_crop_flip(
                images, offsets[local], flips[local], pad if augment == "crop_flip" else 0
            )
        return images, labels
    assert isinstance(source, RecordSource)
    size = image_size or 224
    seeds = rng.integers(0, 2**31, size=n) if rng is not None else None
    images, labels = [], []
    for k, (image, label) in zip(range(local.start, local.stop), source.get_records(indices[local])):
        if image.ndim == 2:
            image = image[..., None]
        if seeds is not None and augment == "inception":
            r = np.random.default_rng(seeds[k])
            image = transforms.random_resized_crop(r, image, size)
            if r.random() < 0.5:
                image = image[:, ::-1]
        else:
            image = transforms.center_crop(image, size)
        images.append(image)
        labels.append(label)
    return np.stack(images), np.asarray(labels, np.int32)


def train_batches(source, info: DatasetInfo, global_batch: int, seed: int, start_step: int = 0,
                  augment: str | None = None, image_size: int | None = None,
                  process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
    """Endless training batches from `start_step` on: {'image': float32, 'label': int32}."""
    augment = info.augment if augment is None else augment
    if augment not in transforms.AUGMENTATIONS:
        raise ValueError(f"augment={augment!r}; expected one of {transforms.AUGMENTATIONS}")
    spe = steps_per_epoch(len(source), global_batch)
    local = _local_slice(global_batch, process_index, process_count)
    step = start_step
    while True:
        epoch, index = divmod(step, spe)
        perm = np.random.default_rng([seed, epoch]).permutation(len(source))
        indices = perm[index * global_batch:(index + 1) * global_batch]
        rng = np.random.default_rng([seed, epoch, index, 1])
        images, labels = _load(source, info, indices, rng, augment, image_size, local)
        yield {"image": transforms.normalize(images, info.mean, info.std), "label": labels}
        step += 1


def eval_batches(source, info: DatasetInfo, global_batch: int, image_size: int | None = None,
                 process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
    """Every example once, in order; the last batch is zero-padded with mask 0."""
    local = _local_slice(global_batch, process_index, process_count)
    n = len(source)
    for start in range(0, n, global_batch):
        indices = np.arange(start, min(start + global_batch, n))
        valid = len(indices)
        indices = np.concatenate([indices, np.zeros(global_batch - valid, np.int64)])
        mask = (np.arange(global_batch) < valid).astype(np.float32)
        images, labels = _load(source, info, indices, None, "none", image_size, local)
        yield {"image": transforms.normalize(images, info.mean, info.std), "label": labels,
               "mask": mask[local]}


def prefetch(iterator: Iterator[Batch], put: Callable[[Batch], Batch], size: int = 2
             ) -> Iterator[Batch]:
    """Prepare the next `size` batches in a background thread and hand them to `put`
    (device transfer) before they are needed."""
    q: queue.Queue = queue.Queue(maxsize=size)
    sentinel = object()
    stop = threading.Event()

    def worker():
        try:
            for batch in iterator:
                if stop.is_set():
                    return
                q.put(put(batch))
            q.put(sentinel)
        except BaseException as err:  # hand errors to the consumer
            q.put(err)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is sentinel:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
