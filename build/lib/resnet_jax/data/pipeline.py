"""Batches for training and evaluation: one grain pipeline for every source.

    steps -> this process's part of the global batch: example indices and random draws
          -> read and augment (in-memory arrays, vectorised) or decode and crop (encoded
             images, one by one into the batch) -> [worker processes] -> uint8 batches
          -> [prefetch to the devices] -> normalised (and erased) inside the jitted step

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

from resnet_jax.data import images, slots, transforms
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
    place in the global batch: {"index", "offset", "flip", "seed"}.

    With `repeats` r > 1 (repeated augmentation, Hoffer et al. 2020, as DeiT and timm train):
    each global batch holds m = ceil(B/r) images of the epoch's permutation, each r times (the
    last copies cut where r does not divide B), at places m apart, so that its copies fall
    on different devices (all of them when there are at least r), each copy with its own
    random draws. An epoch keeps its number of steps and sees about 1/r of its permutation."""

    num_examples: int
    global_batch: int
    local_batch: int
    process_index: int
    seed: int
    pad: int  # pad-and-crop margin of in-memory images (0: none)
    repeats: int = 1
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not 1 <= self.repeats <= self.global_batch:
            raise ValueError(f"num_repeats={self.repeats}: expected 1 to the global batch "
                             f"{self.global_batch}")

    def _epoch(self, epoch: int) -> np.ndarray:
        key = ("perm", epoch)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "perm"}
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            if self.repeats > 1:
                b, m = self.global_batch, -(-self.global_batch // self.repeats)
                steps = self.num_examples // b
                order = np.tile(order[:steps * m].reshape(steps, 1, m),
                                (1, self.repeats, 1)).reshape(steps, -1)[:, :b].reshape(-1)
            self._cache[key] = order
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
    vectorised (or, with augment 'inception', each image's random-resized crop and flip
    resized back to its size); evaluation batches carry the mask."""

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
        if self.augment == "inception":
            images = np.stack([inception_crop(image, seed) for image, seed in zip(images, seeds)])
        elif self.augment in ("flip", "crop_flip"):
            images = transforms.pad_crop_flip(
                images, offsets, flips, self.pad if self.augment == "crop_flip" else 0)
        if self.ops:
            images = np.stack([self.ops(image, seed) for image, seed in zip(images, seeds)])
        return {"image": images, "label": labels}


def inception_crop(image: np.ndarray, seed: int) -> np.ndarray:
    """An in-memory image's Inception-style random-resized crop, mirrored with probability
    1/2, resized back to the image's size (bilinear), drawn from `seed`."""
    import cv2

    rng = np.random.default_rng([int(seed), 4])
    h, w = image.shape[:2]
    left, top, right, bottom = images.random_resized_crop_box(rng, h, w) or (0, 0, w, h)
    out = cv2.resize(image[top:bottom, left:right], (w, h), interpolation=cv2.INTER_LINEAR)
    out = out.reshape(image.shape)
    return out[:, ::-1] if rng.random() < 0.5 else out


@dataclasses.dataclass
class DecodeCrop:
    """Encoded images, decoded at a reduced scale where the crop allows. Training crops by
    `augment`: 'inception' (random-resized crop and flip), or the evaluation crop followed by
    'flip' or 'crop_flip' (zero-pad by `pad`, crop back at the drawn offset, mirror) or
    nothing ('none'). The evaluation crop is the central `crop_pct` of the shorter side
    resized to `size` (with `interpolation`, as every crop), or the whole image when it is
    `size` x `size` already (a CIFAR-style folder). A corrupt image
    stops the run with its path, or with `skip_corrupt` is replaced: in training by the next
    readable example, in evaluation by a masked-out blank."""

    source: Any
    size: int
    train: bool
    skip_corrupt: bool = False
    channels: int = 3
    ops: transforms.ImageOps = transforms.ImageOps()  # per-image random operations (train)
    augment: str = "inception"  # of training
    pad: int = 0  # crop_flip's margin
    crop_pct: float = 0.875
    interpolation: str = "bilinear"

    def _eval_box(self, height: int, width: int):
        if height == width == self.size:
            return (0, 0, width, height)
        return images.center_crop_box(height, width, self.crop_pct, self.size)

    def _load(self, index: int, draws: dict[str, Any] | None) -> tuple[np.ndarray, Any]:
        item = self.source[index]
        box, flip = self._eval_box, False
        if draws is not None and self.augment == "inception":
            rng = np.random.default_rng(draws["seed"])
            flip = bool(rng.random() < 0.5)

            def box(h, w):
                return images.random_resized_crop_box(rng, h, w) or images.center_crop_box(h, w)
        elif draws is not None and self.augment == "flip":
            flip = bool(draws["flip"])
        image = images.crop_resize(item["data"], item["where"], self.size, box, flip,
                                   self.channels, self.interpolation)
        if draws is not None and self.augment == "crop_flip":  # as in memory: pad, crop, flip
            image = transforms.pad_crop_flip(image[None], np.asarray(draws["offset"])[None],
                                             np.asarray([bool(draws["flip"])]), self.pad)[0]
        if self.ops and draws is not None:
            image = self.ops(image, draws["seed"])
        return image, item["label"]

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        index, seed = item["index"], item if self.train else None
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
class DecodeBatch:
    """Encoded images, a whole local batch per element: each example decoded and cropped
    (DecodeCrop) straight into its place in a uint8 batch. In a worker process the finished
    batch is copied into one of the worker's reused shared-memory slots (`slots`: the
    worker's time, not the training process's), which the training process reads in
    place."""

    positions: Callable[[int], dict[str, Any]]
    decode: DecodeCrop
    local_batch: int
    with_mask: bool

    def __call__(self, step: int) -> Batch:
        n, size, c = self.local_batch, self.decode.size, self.decode.channels
        image = np.empty((n, size, size, c), np.uint8)
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

class _Pipeline:
    """A pipeline's grain iterator and, on `close`, the release of its shared-memory
    slots (`get_state`/`set_state` as grain's)."""

    def __init__(self, iterator, release: Callable[[], None]):
        self._iterator, self._release = iterator, release

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return next(self._iterator)

    def get_state(self):
        return self._iterator.get_state()

    def set_state(self, state) -> None:
        self._iterator.set_state(state)

    def close(self) -> None:
        if getattr(self._iterator, "close", None) is not None:
            close_grain(self._iterator)
        self._release()


_NOT_STARTED = "cannot join thread before it is started"


def close_grain(iterator) -> None:
    """grain's close of an iterator and everything below it. Where close meets grain's own
    race (a worker's prefetch thread that another grain thread has created but not yet
    started: "cannot join thread before it is started", seen with 8 workers closed after
    two steps), the rest is closed once that thread has started, so that no worker process
    or shared memory is left behind."""
    try:
        iterator.close()
    except RuntimeError as err:
        if _NOT_STARTED not in str(err):
            raise
        _close_tree(iterator, set())


def _close_tree(node, seen: set) -> None:
    if node is None or id(node) in seen:
        return
    seen.add(id(node))
    for _ in range(200):  # the racing thread starts within microseconds
        try:
            node.close()
            break
        except RuntimeError as err:
            if _NOT_STARTED not in str(err):
                raise
            time.sleep(0.01)
    # grain's private links to what is below: parents, an interleave's iterators in use
    below = [*getattr(node, "_parents", ()), *(getattr(node, "_iterators_in_use", None) or ()),
             getattr(node, "_prefetch_ds_iter", None)]
    for child in below:
        _close_tree(child, seen)


def _with_workers(dataset, workers: int, threads: int, image_bytes: int = 0) -> _Pipeline:
    """The grain IterDataset of uint8 batches: `workers` processes compute them (0: this
    one), each with `threads` threads (0: one by one as they are asked for), and hand them
    over in reused shared-memory slots (`slots`) of `image_bytes` (a batch's images). The
    host does no per-pixel float work: the steps normalise on the device."""
    import grain

    shared = slots.Slots(workers, image_bytes)
    if workers > 0:
        dataset = dataset.map(shared.to_slot())  # in the workers: into a reused shared slot
    iter_ds = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=2 * threads if threads else 0))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (library use)
            flags.FLAGS.mark_as_parsed()
        # Labels and masks cross pickled, the images in shared memory this pipeline names
        # (`slots`): grain would put each array in fresh shared memory of its own, and one
        # still on its way when the pipeline closes was never unlinked (Python's "leaked
        # shared_memory" warning at exit).
        iter_ds = grain.experimental.WithOptionsIterDataset(
            iter_ds, grain.experimental.DatasetOptions(min_shm_size=NO_GRAIN_SHM))
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                                      worker_init_fn=_init_worker).map(shared)
    return _Pipeline(iter_ds.__iter__(), shared.close)


NO_GRAIN_SHM = 1 << 62  # grain's min_shm_size: no array is that large


def _init_worker(index: int, count: int) -> None:
    """In each worker process: OpenCV on one thread (the workers are the parallelism), and a
    watch that ends the worker when the training process is gone (a SIGKILL gives it no
    chance to stop its workers, which would otherwise live on, orphaned)."""
    del count
    import cv2

    slots.set_worker(index)
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
                       ops: transforms.ImageOps = transforms.ImageOps(),
                       crop: tuple[float, str] = (0.875, "bilinear")):
    return DecodeCrop(source, image_size or 224, train, skip_corrupt, channels,
                      ops if train else transforms.ImageOps(), augment, _pad(info, image_size),
                      *crop)


def _pad(info: DatasetInfo, image_size: int | None = None) -> int:
    return crop_flip_pad((info.image_shape or (image_size or 32,))[0])


def crop_flip_pad(side: int) -> int:
    """crop_flip's margin for images of `side` pixels: 4 from 32 on (the CIFAR recipes), else
    2 (the MNIST-sized ones)."""
    return 4 if side >= 32 else 2


def train_batches(source, info: DatasetInfo, global_batch: int, seed: int, start_step: int = 0,
                  augment: str | None = None, image_size: int | None = None,
                  process_index: int = 0, process_count: int = 1, workers: int = 0,
                  state: dict | None = None, skip_corrupt: bool = False, channels: int = 3,
                  end_step: int | None = None, threads: int | None = None,
                  policy: str = "", policy_ops: int = 2,
                  policy_magnitude: int = 9, interpolation: str = "bilinear",
                  repeats: int = 1):
    """Training batches from `start_step` on (or from grain iterator `state`): an iterator of
    {'image': uint8, 'label': int32[, 'corrupt': per-example count of unreadable files
    replaced]} with `get_state()`; the steps normalise the images on the device
    (`on_device.DeviceInput`, which also does random erasing).

    Endless unless `end_step` is given. `workers` processes decode and augment (0: in this
    process); the batches and their order do not depend on it. After the crop and flip, each
    image gets the automatic augmentation `policy` ('rand_augment': `policy_ops` operations
    at bin `policy_magnitude` of 31; 'trivial_augment_wide'). Decoded images are resized
    with `interpolation`. `repeats` > 1: repeated augmentation (`TrainPositions`).
    """
    augment = info.augment if augment is None else augment
    if augment not in transforms.AUGMENTATIONS:
        raise ValueError(f"augment={augment!r}; expected one of {transforms.AUGMENTATIONS}")
    steps_per_epoch(len(source), global_batch)  # at least one full batch
    local = _local_batch(global_batch, process_index, process_count)
    positions = TrainPositions(len(source), global_batch, local, process_index, seed,
                               _pad(info, image_size) if augment == "crop_flip" else 0,
                               repeats)
    stop = end_step if end_step is not None else 2**62 // global_batch
    dataset = _examples_to_batches(positions, source, info, True, augment, image_size,
                                   skip_corrupt, channels, local, stop,
                                   transforms.ImageOps(policy, policy_ops,
                                                       policy_magnitude),
                                   (0.875, interpolation))
    if state is None and start_step:
        dataset = dataset[start_step:]
    iterator = _with_workers(dataset, workers, _threads(source, threads),
                             _image_bytes(source, image_size, channels, local))
    if state is not None:
        iterator.set_state(state)
    return iterator


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


DECODE_THREADS = 2


def _examples_to_batches(positions, source, info: DatasetInfo, train: bool, augment: str,
                         image_size, skip_corrupt: bool, channels: int, local: int, n: int,
                         ops: transforms.ImageOps = transforms.ImageOps(),
                         crop: tuple[float, str] = (0.875, "bilinear")):
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
                                   channels, ops, crop)
    return grain.MapDataset.range(0, n).map(DecodeBatch(positions, transform, local, not train))


def eval_batches(source, info: DatasetInfo, global_batch: int, image_size: int | None = None,
                 process_index: int = 0, process_count: int = 1, workers: int = 0,
                 skip_corrupt: bool = False, channels: int = 3, threads: int | None = None,
                 crop_pct: float = 0.875, interpolation: str = "bilinear") -> Iterator[Batch]:
    """Every example once, in order; the last batch is zero-padded with mask 0. Decoded
    images are the central `crop_pct` of their shorter side, resized with `interpolation`."""
    local = _local_batch(global_batch, process_index, process_count)
    n_batches = -(-len(source) // global_batch)
    dataset = _examples_to_batches(
        EvalPositions(len(source), global_batch, local, process_index), source, info, False,
        "none", image_size, skip_corrupt, channels, local, n_batches,
        crop=(crop_pct, interpolation))
    iterator = _with_workers(dataset, workers, _threads(source, threads),
                             _image_bytes(source, image_size, channels, local))
    try:
        yield from iterator
    finally:
        close(iterator)


def close(iterator) -> None:
    """Stop a pipeline iterator's worker processes (no-op without workers) and release the
    shared memory of the batches they handed over."""
    closer = getattr(iterator, "close", None)
    if closer is not None:
        closer()
        release_shared_memory()


def release_shared_memory() -> None:
    """Unlink now the shared memory of worker batches no longer referenced. grain unlinks it
    from a background thread pool, whose last requests a process exit can cut short (Python
    then warns of leaked shared_memory objects); this waits for them, and later batches are
    unlinked as they are freed (grain starts the pool again with new workers)."""
    import gc

    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:  # another grain layout: nothing to wait for here
        return
    gc.collect()  # batches in reference cycles (tracebacks, frames) are freed first
    with SharedMemoryArray._lock:
        workers = SharedMemoryArray._del_thread_pool
        SharedMemoryArray._del_thread_pool = None
        SharedMemoryArray._outstanding_del_requests = None
    if workers is not None:
        workers.close()
        workers.join()


class prefetch:
    """Prepare the next `size` batches in a background thread and hand them to `put`
    (device transfer) before they are needed: up to `size` transferred batches wait while
    a step runs, and one more is in transfer. With `state`, yields (batch, state()) where
    state() is taken right after the batch was drawn: the position to resume after it.
    `ready()` says whether the next one is there already (a `next` would not wait)."""

    _END = object()

    def __init__(self, iterator: Iterator[Batch], put: Callable[[Batch], Any], size: int = 2,
                 state: Callable[[], Any] | None = None):
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._done = False

        def work():
            try:
                for batch in iterator:
                    if self._stop.is_set():
                        return
                    item = put(batch)
                    self._put((item, state()) if state is not None else item)
                self._put(self._END)
            except BaseException as err:  # hand errors to the consumer
                self._put(err)

        self._thread = threading.Thread(target=work, name="resnet_jax-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def ready(self) -> bool:
        return not self._queue.empty()

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is self._END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (it ends after the batch in hand) and drop what it prepared."""
        self._stop.set()
        self._done = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=1.0)  # a daemon: one stuck in a slow source is left
