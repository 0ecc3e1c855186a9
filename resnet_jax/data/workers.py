"""Worker processes: grain's multiprocess prefetch computes the batches in `workers`
processes (or, with none, this one), and they hand the images over in the pipeline's
reused shared-memory slots (`slots`); labels and masks cross pickled. `close` stops the
workers and unlinks every block of shared memory the pipeline named, however it stops.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

from resnet_jax.data import grain_compat, slots

# grain's min_shm_size: no array is that large, so grain never puts one in shared memory of
# its own (one still on its way when a pipeline closed was never unlinked: Python's
# "leaked shared_memory" warning at exit); the images travel in this pipeline's slots.
NO_GRAIN_SHM = 1 << 62


class Pipeline:
    """A pipeline's grain iterator (`get_state`/`set_state` as grain's) and, on `close`, the
    stop of its workers and the release of its shared-memory slots."""

    def __init__(self, iterator, shared: slots.Slots):
        self.grain_iterator, self.slots = iterator, shared

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.grain_iterator)

    def get_state(self):
        return self.grain_iterator.get_state()

    def set_state(self, state) -> None:
        self.grain_iterator.set_state(state)

    def close(self) -> None:
        if getattr(self.grain_iterator, "close", None) is not None:
            grain_compat.close(self.grain_iterator)
        self.slots.close()


def with_workers(dataset, workers: int, threads: int, image_bytes: int = 0) -> Pipeline:
    """The iterator of grain MapDataset `dataset` (uint8 batches): `workers` processes compute
    them (0: this one), each with `threads` threads (0: one by one as they are asked for),
    and hand them over in reused shared-memory slots of `image_bytes` (a batch's images)."""
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
        iter_ds = grain.experimental.WithOptionsIterDataset(
            iter_ds, grain.experimental.DatasetOptions(min_shm_size=NO_GRAIN_SHM))
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                                      worker_init_fn=init_worker).map(shared)
    return Pipeline(iter_ds.__iter__(), shared)


def init_worker(index: int, count: int) -> None:
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


def close(iterator) -> None:
    """Stop a pipeline iterator's worker processes (no-op without workers or for a plain
    iterator) and release the shared memory of the batches they handed over."""
    closer: Callable[[], None] | None = getattr(iterator, "close", None)
    if closer is not None:
        closer()
