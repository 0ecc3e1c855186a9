"""Batches for training and evaluation: one grain pipeline for every source.

    steps -> this process's part of the global batch: example indices and random draws
          -> read and augment (in-memory arrays, vectorised) or decode and crop (encoded
             images, one by one into the batch) -> [worker processes] -> normalise
          -> [prefetch to the devices]

The data order is a pure function of (seed, step): epoch e is the permutation
`default_rng([seed, e])` of the split, step s takes its slice of it, and the random draws of
a step's augmentation come from `default_rng([seed, e, s_in_epoch, 1])` for the whole global
batch, so they depend neither on how the batch is split across processes nor on the number
of worker processes nor on where a run was resumed. Each process keeps only its own
contiguous part of every global batch. Evaluation walks the split once in order; the last
batch is padded and carries a mask.

A train iterator's position is grain's iterator state (`get_state`), which a checkpoint
stores; `train_batches(..., state=...)` continues from it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np

from resnet_jax.data import images, transforms
from resnet_jax.data.sources import ArraySource, DatasetInfo

Batch = dict[str, np.ndarray]
log = logging.getLogger("resnet_jax")


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full training batches per epoch (the incomplete last batch is dropped)."""
    if num_examples < global_batch:
        raise ValueError(f"batch size {global_batch} exceeds the {num_examples} training examples")
    return num_examples // global_batch


def _local_batch(global_batch: int, process_index: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(
            f"batch size {global_batch} does not divide across {process_count} processes"
        )
    return global_batch // process_count


# --- transforms: picklable callables, so worker processes can run them ---

@dataclasses.dataclass
class TrainPositions:
    """Local example j of this process -> the example index and the random draws of its
    place in the global batch: {"index", "offset", "flip", "seed"}."""

    num_examples: int
    global_batch: int
    local_batch: int
    process_index: int
    seed: int
    pad: int  # pad-and-crop margin of in-memory images (0: none)
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def _epoch(self, epoch: int) -> np.ndarray:
        key = ("perm", epoch)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "perm"}
            self._cache[key] = np.random.default_rng([self.seed, epoch]).permutation(
                self.num_examples)
        return self._cache[key]

    def _draws(self, epoch: int, batch: int):
        key = ("draws", epoch, batch)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "draws"}
            rng = np.random.default_rng([self.seed, epoch, batch, 1])
            n = self.global_batch
            offsets, flips = transforms.crop_flip_params(rng, n, self.pad, True)
            seeds = rng.integers(0, 2**31, size=n)
            self._cache[key] = (offsets, flips, seeds)
        return self._cache[key]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(example indices, crop offsets, flips, per-example seeds) of this process's part
        of step `step`."""
        epoch, batch = divmod(int(step), self.num_examples // self.global_batch)
        place = slice(self.process_index * self.local_batch,
                      (self.process_index + 1) * self.local_batch)
        offsets, flips, seeds = self._draws(epoch, batch)
        order = self._epoch(epoch)[batch * self.global_batch:(batch + 1) * self.global_batch]
        return order[place], offsets[place], flips[place], seeds[place]

    def __call__(self, j: int) -> dict[str, Any]:
        spe = self.num_examples // self.global_batch
        step, k = divmod(int(j), self.local_batch)
        epoch, batch = divmod(step, spe)
        place = self.process_index * self.local_batch + k
        offsets, flips, seeds = self._draws(epoch, batch)
        return {"index": int(self._epoch(epoch)[batch * self.global_batch + place]),
                "offset": offsets[place], "flip": bool(flips[place]), "seed": int(seeds[place])}


@dataclasses.dataclass
class EvalPositions:
    """Local example j -> the example at its place of the padded split, and its mask."""

    num_examples: int
    global_batch: int
    local_batch: int
    process_index: int

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(example indices, mask) of this process's part of batch `step`."""
        start = int(step) * self.global_batch + self.process_index * self.local_batch
        places = np.arange(start, start + self.local_batch)
        valid = places < self.num_examples
        return np.where(valid, places, 0), valid.astype(np.float32)

    def __call__(self, j: int) -> dict[str, Any]:
        step, k = divmod(int(j), self.local_batch)
        place = step * self.global_batch + self.process_index * self.local_batch + k
        valid = place < self.num_examples
        return {"index": place if valid else 0, "mask": np.float32(valid)}


@dataclasses.dataclass
class ArrayBatch:
    """In-memory images, a whole local batch per element: gathered by index, then (train)
    zero-padded by `pad`, cropped back at the drawn offsets and mirrored where drawn, all
    vectorised; evaluation batches carry the mask."""

    positions: Any  # TrainPositions or EvalPositions
    source: ArraySource
    augment: str
    pad: int
    ops: transforms.ImageOps = transforms.ImageOps()  # per-image random operations (train)

    def __call__(self, step: int) -> Batch:
        if isinstance(self.positions, EvalPositions):
            indices, mask = self.positions.batch(step)
            images, labels = self.source.get_batch(indices)
            return {"image": images, "label": labels, "mask": mask}
        indices, offsets, flips, seeds = self.positions.batch(step)
        images, labels = self.source.get_batch(indices)
        if self.augment in ("flip", "crop_flip"):
            images = transforms.pad_crop_flip(
                images, offsets, flips, self.pad if self.augment == "crop_flip" else 0)
        if self.ops:
            images = np.stack([self.ops(image, seed) for image, seed in zip(images, seeds)])
        return {"image": images, "label": labels}


@dataclasses.dataclass
class DecodeCrop:
    """Encoded images: Inception-style random-resized crop and flip (train), or the central
    crop (eval), decoded at a reduced scale where the crop allows. A corrupt image stops the
    run with its path, or with `skip_corrupt` is replaced: in training by the next readable
    example, in evaluation by a masked-out blank."""

    source: Any
    size: int
    train: bool
    skip_corrupt: bool = False
    channels: int = 3
    ops: transforms.ImageOps = transforms.ImageOps()  # per-image random operations (train)

    def _load(self, index: int, seed: int | None) -> tuple[np.ndarray, Any]:
        item = self.source[index]
        if seed is None:
            box = images.center_crop_box
            flip = False
        else:
            rng = np.random.default_rng(seed)
            flip = bool(rng.random() < 0.5)

            def box(h, w):
                return images.random_resized_crop_box(rng, h, w) or images.center_crop_box(h, w)
        image = images.crop_resize(item["data"], item["where"], self.size, box, flip,
                                   self.channels)
        if self.ops and seed is not None:
            image = self.ops(image, seed)
        return image, item["label"]

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        index, seed = item["index"], item.get("seed") if self.train else None
        corrupt = 0
        for _ in range(len(self.source)):
            try:
                image, label = self._load(index, seed)
                break
            except images.CorruptImageError as err:
                if not self.skip_corrupt:
                    raise images.CorruptImageError(
                        f"{err}; set --config.skip_corrupt_images=True to skip such files "
                        f"(counted as corrupt_images in the metrics)") from err
                log.warning("skipped corrupt image: %s", err)
                corrupt += 1
                if not self.train:
                    shape = (self.size, self.size, self.channels)
                    return {"image": np.zeros(shape, np.uint8), "label": np.int32(0),
                            "mask": np.float32(0), "corrupt": np.int32(1)}
                index = (index + 1) % len(self.source)
        else:
            raise images.CorruptImageError("no readable image in the whole source")
        out = {"image": image, "label": np.int32(label), "corrupt": np.int32(corrupt)}
        if "mask" in item:
            out["mask"] = item["mask"]
        return out


@dataclasses.dataclass
class Normalize:
    """A batch of uint8 images to float32, scaled to [0, 1] and standardised per channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channel_order: str = "RGB"

    def __call__(self, batch: Batch) -> Batch:
        return {**batch, "image": transforms.normalize(batch["image"], self.mean, self.std,
                                                       self.channel_order)}


@dataclasses.dataclass
class DecodeBatch:
    """Encoded images, a whole local batch per element: each example decoded and cropped
    (DecodeCrop) straight into its slot of a uint8 batch. In a worker process the batch
    lives in shared memory, which grain hands to the training process without a copy;
    uint8 keeps that memory, whose first touch costs more than the copy, a quarter of
    float32's."""

    positions: Callable[[int], dict[str, Any]]
    decode: DecodeCrop
    local_batch: int
    with_mask: bool

    def __call__(self, step: int) -> Batch:
        import multiprocessing

        n, size, c = self.local_batch, self.decode.size, self.decode.channels
        shape = (n, size, size, c)
        if multiprocessing.parent_process() is not None:
            from grain.multiprocessing import SharedMemoryArray

            image = SharedMemoryArray(shape, np.uint8)
        else:
            image = np.empty(shape, np.uint8)
        label, corrupt = np.empty(n, np.int32), np.zeros(n, np.int32)
        mask = np.ones(n, np.float32)
        for k in range(n):
            out = self.decode(self.positions(int(step) * n + k))
            image[k] = out["image"]
            label[k], corrupt[k] = out["label"], out["corrupt"]
            mask[k] = out.get("mask", 1.0)
        batch = {"image": image, "label": label, "corrupt": corrupt}
        if self.with_mask:
            batch["mask"] = mask
        return batch


# --- the pipelines ---

def _with_workers(dataset, workers: int, threads: int, info: DatasetInfo):
    """The grain IterDataset of normalised batches: `workers` processes compute the uint8
    batches (0: this one), each with `threads` threads (0: one by one as they are asked
    for); this process normalises them (a quarter of the bytes cross between processes)."""
    import grain

    iter_ds = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=2 * threads if threads else 0))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (library use)
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                                      worker_init_fn=_init_worker)
    return iter_ds.map(Normalize(info.mean, info.std, info.channel_order))


def _init_worker(index: int, count: int) -> None:
    """In each worker process: OpenCV on one thread (the workers are the parallelism), and a
    watch that ends the worker when the training process is gone (a SIGKILL gives it no
    chance to stop its workers, which would otherwise live on, orphaned)."""
    del index, count
    import cv2

    cv2.setNumThreads(1)
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="resnet_jax-parent-watch", daemon=True).start()


def _example_transform(source, info: DatasetInfo, train: bool, augment: str, image_size,
                       skip_corrupt: bool, channels: int,
                       ops: transforms.ImageOps = transforms.ImageOps()):
    if train and augment not in ("inception", "none"):
        raise ValueError(f"augment={augment!r} is for in-memory images; {info.tfds_name} "
                         f"images are decoded per example: use 'inception' or 'none'")
    return DecodeCrop(source, image_size or 224, train and augment == "inception", skip_corrupt,
                      channels, ops if train else transforms.ImageOps())


def _pad(info: DatasetInfo) -> int:
    return 4 if (info.image_shape or (32,))[0] >= 32 else 2


def train_batches(source, info: DatasetInfo, global_batch: int, seed: int, start_step: int = 0,
                  augment: str | None = None, image_size: int | None = None,
                  process_index: int = 0, process_count: int = 1, workers: int = 0,
                  state: dict | None = None, skip_corrupt: bool = False, channels: int = 3,
                  end_step: int | None = None, threads: int | None = None,
                  erase: float = 0.0, policy: str = "", policy_ops: int = 2,
                  policy_magnitude: int = 9):
    """Training batches from `start_step` on (or from grain iterator `state`): an iterator of
    {'image': float32, 'label': int32[, 'corrupt': per-example count of unreadable files
    replaced]} with `get_state()`.

    Endless unless `end_step` is given. `workers` processes decode and augment (0: in this
    process); the batches and their order do not depend on it. After the crop and flip, each
    image gets the automatic augmentation `policy` ('rand_augment': `policy_ops` operations
    at bin `policy_magnitude` of 31; 'trivial_augment_wide'), then random erasing with
    probability `erase`.
    """
    augment = info.augment if augment is None else augment
    if augment not in transforms.AUGMENTATIONS:
        raise ValueError(f"augment={augment!r}; expected one of {transforms.AUGMENTATIONS}")
    steps_per_epoch(len(source), global_batch)  # at least one full batch
    local = _local_batch(global_batch, process_index, process_count)
    positions = TrainPositions(len(source), global_batch, local, process_index, seed,
                               _pad(info) if augment == "crop_flip" else 0)
    stop = end_step if end_step is not None else 2**62 // global_batch
    dataset = _examples_to_batches(positions, source, info, True, augment, image_size,
                                   skip_corrupt, channels, local, stop,
                                   transforms.ImageOps(erase, policy, policy_ops,
                                                       policy_magnitude))
    if state is None and start_step:
        dataset = dataset[start_step:]
    iterator = _with_workers(dataset, workers, _threads(source, threads), info).__iter__()
    if state is not None:
        iterator.set_state(state)
    return iterator


def _threads(source, threads: int | None) -> int:
    """Threads per process computing elements: none for in-memory arrays (the GIL makes them
    slower), DECODE_THREADS for encoded images (decoding and resizing release the GIL)."""
    if threads is not None:
        return threads
    return 0 if isinstance(source, ArraySource) else DECODE_THREADS


DECODE_THREADS = 2


def _examples_to_batches(positions, source, info: DatasetInfo, train: bool, augment: str,
                         image_size, skip_corrupt: bool, channels: int, local: int, n: int,
                         ops: transforms.ImageOps = transforms.ImageOps()):
    """The grain MapDataset of n local uint8 batches, one element per step.

    In-memory images are gathered and augmented a batch at a time, vectorised (ArrayBatch);
    encoded ones are decoded and cropped one by one straight into their batch (DecodeBatch):
    no per-example stacking copy, and in worker processes the batch is built in shared
    memory.
    """
    import grain

    if isinstance(source, ArraySource):
        return grain.MapDataset.range(0, n).map(
            ArrayBatch(positions, source, augment if train else "none", _pad(info),
                       ops if train else transforms.ImageOps()))
    transform = _example_transform(source, info, train, augment, image_size, skip_corrupt,
                                   channels, ops)
    return grain.MapDataset.range(0, n).map(DecodeBatch(positions, transform, local, not train))


def eval_batches(source, info: DatasetInfo, global_batch: int, image_size: int | None = None,
                 process_index: int = 0, process_count: int = 1, workers: int = 0,
                 skip_corrupt: bool = False, channels: int = 3, threads: int | None = None
                 ) -> Iterator[Batch]:
    """Every example once, in order; the last batch is zero-padded with mask 0."""
    local = _local_batch(global_batch, process_index, process_count)
    n_batches = -(-len(source) // global_batch)
    dataset = _examples_to_batches(
        EvalPositions(len(source), global_batch, local, process_index), source, info, False,
        "none", image_size, skip_corrupt, channels, local, n_batches)
    iterator = _with_workers(dataset, workers, _threads(source, threads), info).__iter__()
    try:
        yield from iterator
    finally:
        close(iterator)


def close(iterator) -> None:
    """Stop a pipeline iterator's worker processes (no-op without workers)."""
    closer = getattr(iterator, "close", None)
    if closer is not None:
        closer()


def prefetch(iterator: Iterator[Batch], put: Callable[[Batch], Any], size: int = 2,
             state: Callable[[], Any] | None = None) -> Iterator:
    """Prepare the next `size` batches in a background thread and hand them to `put`
    (device transfer) before they are needed. With `state`, yields (batch, state()) where
    state() is taken right after the batch was drawn: the position to resume after it."""
    q: queue.Queue = queue.Queue(maxsize=size)
    sentinel = object()
    stop = threading.Event()

    def worker():
        try:
            for batch in iterator:
                if stop.is_set():
                    return
                item = put(batch)
                q.put((item, state()) if state is not None else item)
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
