"""Batches for training and evaluation: one grain pipeline for every source.

    steps -> this process's part of the global batch: example indices and random draws
             (`order`)
          -> read and augment (in-memory arrays, vectorised) or decode and crop (encoded
             images, one by one into the batch) (`examples`)
          -> [worker processes, shared-memory slots] (`workers`, `slots`) -> uint8 batches
          -> [put on the devices ahead of the step] (`prefetch`)
          -> normalised (and erased) inside the jitted step (`on_device`)

What a pipeline does is one frozen options object (`TrainInput`, `EvalInput`). A train
iterator's position is grain's iterator state (`get_state`), which a checkpoint stores;
`train_batches(..., state=...)` continues from it.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from resnet_jax.data import order, transforms, workers
from resnet_jax.data.examples import ArrayBatch, Batch, DecodeBatch, DecodeCrop, crop_flip_pad
from resnet_jax.data.sources import ArraySource, DatasetInfo

DECODE_THREADS = 2  # threads per process decoding encoded images (decoding releases the GIL)


@dataclasses.dataclass(frozen=True)
class _Input:
    """What every pipeline is told: the global batch, and (by keyword) the image size (None:
    the source's for in-memory arrays, 224 for encoded images), this process's place among
    `process_count`, `workers` processes (0: this one; the batches do not depend on it, nor
    on `threads`, None: `DECODE_THREADS` for encoded images, 0 for arrays), whether a
    corrupt image is skipped, the channels decoded."""

    global_batch: int
    _: dataclasses.KW_ONLY
    image_size: int | None = None
    process_index: int = 0
    process_count: int = 1
    workers: int = 0
    threads: int | None = None
    skip_corrupt: bool = False
    channels: int = 3
    interpolation: str = "bilinear"  # decoded images' resize filter


@dataclasses.dataclass(frozen=True)
class TrainInput(_Input):
    """The training batches: `augment` (None: the dataset's own), then each image's automatic
    augmentation `policy` ('rand_augment': `policy_ops` operations at bin `policy_magnitude`
    of 31; 'trivial_augment_wide'); `repeats` > 1: repeated augmentation;
    `alternate_flips`: 'flip' and 'crop_flip' mirror each image every other epoch
    (`order.TrainPositions`). Endless unless `end_step` is given."""

    seed: int
    augment: str | None = None
    end_step: int | None = None
    policy: str = ""
    policy_ops: int = 2
    policy_magnitude: int = 9
    repeats: int = 1
    alternate_flips: bool = False


@dataclasses.dataclass(frozen=True)
class EvalInput(_Input):
    """The evaluation batches: every example once, in order, the last batch zero-padded with
    mask 0; decoded images are the central `crop_pct` of their shorter side."""

    crop_pct: float = 0.875


def train_batches(source, info: DatasetInfo, options: TrainInput, start_step: int = 0,
                  state: dict | None = None) -> workers.Pipeline:
    """Training batches from `start_step` on (or from grain iterator `state`): an iterator of
    {'image': uint8, 'label': int32[, 'corrupt': per-example count of unreadable files
    replaced]} with `get_state()`; the steps normalise the images on the device
    (`on_device.DeviceInput`, which also does random erasing)."""
    o = options
    augment = info.augment if o.augment is None else o.augment
    if augment not in transforms.AUGMENTATIONS:
        raise ValueError(f"augment={augment!r}; expected one of {transforms.AUGMENTATIONS}")
    if o.alternate_flips and augment not in ("flip", "crop_flip"):
        raise ValueError(f"alternate_flips with augment={augment!r}: it alternates the "
                         "mirroring of 'flip' and 'crop_flip'")
    order.steps_per_epoch(len(source), o.global_batch)  # at least one full batch
    local = order.local_batch(o.global_batch, o.process_count)
    positions = order.TrainPositions(
        len(source), o.global_batch, local, o.process_index, o.seed,
        _pad(info, o.image_size) if augment == "crop_flip" else 0, o.repeats, o.alternate_flips)
    ops = transforms.ImageOps(o.policy, o.policy_ops, o.policy_magnitude)
    if isinstance(source, ArraySource):
        per_step = ArrayBatch(positions, source, augment, _pad(info), ops)
    else:
        per_step = DecodeBatch(positions, DecodeCrop(
            source, o.image_size or 224, True, o.skip_corrupt, o.channels, ops, augment,
            _pad(info, o.image_size), interpolation=o.interpolation), local, with_mask=False)
    stop = o.end_step if o.end_step is not None else 2**62 // o.global_batch
    dataset = _per_step(per_step, stop)
    if state is None and start_step:
        dataset = dataset[start_step:]
    iterator = workers.with_workers(dataset, o.workers, _threads(source, o.threads),
                                    _image_bytes(source, o.image_size, o.channels, local))
    if state is not None:
        iterator.set_state(state)
    return iterator


def eval_batches(source, info: DatasetInfo, options: EvalInput) -> Iterator[Batch]:
    """Every example once, in order (`EvalInput`); the workers stop when the iteration ends
    or the generator is closed."""
    o = options
    local = order.local_batch(o.global_batch, o.process_count)
    positions = order.EvalPositions(len(source), o.global_batch, local, o.process_index)
    if isinstance(source, ArraySource):
        per_step = ArrayBatch(positions, source, "none", _pad(info))
    else:
        per_step = DecodeBatch(positions, DecodeCrop(
            source, o.image_size or 224, False, o.skip_corrupt, o.channels, augment="none",
            pad=_pad(info, o.image_size), crop_pct=o.crop_pct, interpolation=o.interpolation),
            local, with_mask=True)
    dataset = _per_step(per_step, -(-len(source) // o.global_batch))
    iterator = workers.with_workers(dataset, o.workers, _threads(source, o.threads),
                                    _image_bytes(source, o.image_size, o.channels, local))
    try:
        yield from iterator
    finally:
        workers.close(iterator)


def _per_step(per_step, n: int):
    """The grain MapDataset of `n` local uint8 batches, one element per step: in-memory
    images gathered and augmented a batch at a time (ArrayBatch), encoded ones decoded and
    cropped one by one straight into their batch (DecodeBatch: no per-example stacking copy,
    and in worker processes the batch is built there)."""
    import grain

    return grain.MapDataset.range(0, n).map(per_step)


def _pad(info: DatasetInfo, image_size: int | None = None) -> int:
    return crop_flip_pad((info.image_shape or (image_size or 32,))[0])


def _image_bytes(source, image_size: int | None, channels: int, local: int) -> int:
    """The bytes of the uint8 images of one local batch."""
    if isinstance(source, ArraySource):
        return local * int(np.prod(source.images.shape[1:]))
    size = image_size or 224
    return local * size * size * channels


def _threads(source, threads: int | None) -> int:
    """Threads per process computing elements: none for in-memory arrays (the GIL makes them
    slower), DECODE_THREADS for encoded images (decoding and resizing release the GIL)."""
    if threads is not None:
        return threads
    return 0 if isinstance(source, ArraySource) else DECODE_THREADS
