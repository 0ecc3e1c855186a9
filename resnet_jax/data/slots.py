"""Shared-memory slots: how worker processes hand batches to the training process without
fresh memory for every batch.

Fresh shared memory costs more than the copy into it: the kernel zeroes and maps every page
on first touch. So the training process creates SLOTS_PER_WORKER blocks per worker when a
pipeline starts, and they are reused for its whole life. A worker writes a batch's images
into one of its free slots, marks it busy and hands over only its name (`SlotRef`); the
training process reads the batch in place (on the CPU, `device_put` even aliases it) and
marks the slot free again when nothing refers to that batch any more (its array's
finalizer). With no slot free (the worker is ahead), a worker waits for one to be freed, up
to WAIT_FOR_SLOT_S: backpressure, which kept the feeder at 166,000 images/s with two workers
where a fresh block per batch gave 42,000 (RESULTS.md). Only after that (a consumer that
keeps its batches) does it copy the batch into fresh shared memory under a name of the
pipeline's (`FreshRef`); the training process copies it out and unlinks it at once, and at
close unlinks any such block still on its way, so nothing is left linked however the
pipeline stops.

The training process owns the names: it unlinks them when the pipeline closes (after its
workers stopped), and unmaps each slot once no batch reads from it.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
import weakref
from multiprocessing import shared_memory
from typing import Any

import numpy as np

HEADER = 64  # bytes before the data: the busy flag, and 64-byte alignment of the data
SLOTS_PER_WORKER = 4
# how long a worker waits for a free slot before handing a batch over in a fresh block
WAIT_FOR_SLOT_S = 0.25


@dataclasses.dataclass(frozen=True)
class SlotRef:
    """A batch array waiting in a slot: what crosses the process boundary."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class FreshRef:
    """A batch array in a fresh block of shared memory (no slot was free), read once."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def _busy(buf) -> bool:
    return bytes(buf[:4]) != bytes(4)


class _WorkerSlots:
    """A worker process's view of its slots (attached on first use)."""

    def __init__(self, names: tuple[str, ...], prefix: str):
        self.names, self.prefix = names, prefix
        self.slots: list[shared_memory.SharedMemory] | None = None
        self.taken: set[int] = set()  # being filled by a thread of this worker
        self.lock = threading.Lock()
        self.count = itertools.count()

    def fresh(self, array: np.ndarray) -> FreshRef:
        """`array` copied into a new block named by the pipeline's prefix."""
        name = f"{self.prefix}{os.getpid()}_{next(self.count)}"
        block = shared_memory.SharedMemory(name=name, create=True, size=max(1, array.nbytes))
        view = np.ndarray(array.shape, array.dtype, buffer=block.buf)
        np.copyto(view, array, casting="no")
        del view
        block.close()  # the block stays linked until the training process unlinks it
        return FreshRef(name, tuple(array.shape), array.dtype.str)

    def _take_free(self, need: int) -> int:
        """A free slot of at least `need` bytes, marked taken (-1: none is free)."""
        with self.lock:  # a worker's decoding threads share its slots
            if self.slots is None:
                self.slots = [shared_memory.SharedMemory(name=n) for n in self.names]
            for k, s in enumerate(self.slots):
                if k not in self.taken and s.size >= need and not _busy(s.buf):
                    self.taken.add(k)
                    return k
        return -1

    def put(self, array: np.ndarray) -> SlotRef | FreshRef:
        """`array` copied into a free slot (its SlotRef). With none free, the worker waits
        for one up to WAIT_FOR_SLOT_S (the training process frees one as it finishes with a
        batch), then copies into a fresh block: a consumer that keeps batches does not
        stall the workers."""
        need = HEADER + array.nbytes
        deadline = time.monotonic() + WAIT_FOR_SLOT_S
        k = self._take_free(need)
        while k < 0 and time.monotonic() < deadline:
            time.sleep(0.0005)
            k = self._take_free(need)
        if k < 0:
            return self.fresh(array)
        slot = self.slots[k]
        view = np.ndarray(array.shape, array.dtype, buffer=slot.buf, offset=HEADER)
        np.copyto(view, array, casting="no")
        del view
        slot.buf[:4] = b"\x01\x00\x00\x00"
        with self.lock:
            self.taken.discard(k)
        return SlotRef(slot.name, tuple(array.shape), array.dtype.str)


_worker_index = 0  # set in each worker process (`set_worker`)
_attached: dict[tuple[str, ...], _WorkerSlots] = {}


def set_worker(index: int) -> None:
    """In a worker process, before its first batch: which worker this is."""
    global _worker_index
    _worker_index = index


@dataclasses.dataclass
class ToSlot:
    """In a worker process: the batch's "image" moved into one of that worker's slots
    (`names[worker]`)."""

    names: tuple[tuple[str, ...], ...]
    prefix: str = ""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        image = batch.get("image")
        mine = self.names[_worker_index % len(self.names)] if self.names else ()
        if not mine or not isinstance(image, np.ndarray) or not image.flags.c_contiguous:
            return batch
        if mine not in _attached:
            _attached[mine] = _WorkerSlots(mine, self.prefix)
        return {**batch, "image": _attached[mine].put(image)}


_pipelines = itertools.count()


class Slots:
    """The training process's side of one pipeline's slots: created here, read in place,
    unlinked and unmapped on `close`."""

    def __init__(self, workers: int, nbytes: int, per_worker: int = SLOTS_PER_WORKER):
        self.lock = threading.Lock()
        self.slots: dict[str, shared_memory.SharedMemory] = {}
        self.live: dict[str, int] = {}
        self.closing = False
        # names of this pipeline's fresh blocks (short: macOS allows 31 characters)
        self.prefix = f"rj{os.getpid()}_{next(_pipelines)}_"
        names = []
        for _ in range(workers if nbytes > 0 else 0):
            mine = []
            for _ in range(per_worker):
                slot = shared_memory.SharedMemory(create=True, size=HEADER + nbytes)
                self.slots[slot.name] = slot
                self.live[slot.name] = 0
                mine.append(slot.name)
            names.append(tuple(mine))
        self.names = tuple(names)

    def to_slot(self) -> ToSlot:
        return ToSlot(self.names, self.prefix)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A batch whose "image" waits in a slot, with the array read in place."""
        ref = batch.get("image")
        if isinstance(ref, FreshRef):
            return {**batch, "image": _take(ref.name, ref.shape, ref.dtype)}
        if not isinstance(ref, SlotRef):
            return batch
        with self.lock:
            slot = self.slots[ref.name]
            self.live[ref.name] += 1
        array = np.ndarray(ref.shape, np.dtype(ref.dtype), buffer=slot.buf, offset=HEADER)
        done = weakref.finalize(array, self._release, ref.name)  # the batch is gone
        done.atexit = False  # at exit the mapping goes with the process
        return {**batch, "image": array}

    def _release(self, name: str) -> None:
        with self.lock:
            slot = self.slots[name]
            slot.buf[:4] = bytes(4)  # free: the worker may fill it again
            self.live[name] -= 1
            if self.closing and not self.live[name]:
                self._unmap(name)

    def _unmap(self, name: str) -> None:
        slot = self.slots.pop(name)
        self.live.pop(name, None)
        try:
            slot.close()
        except BufferError:  # a view is still alive somewhere: it goes with the process
            pass

    def close(self) -> None:
        """After the workers stopped: unlink every name; unmap the slots no batch reads
        from (the others when their last batch goes)."""
        with self.lock:
            if self.closing:
                return
            self.closing = True
            for name, slot in self.slots.items():
                try:
                    slot.unlink()
                except FileNotFoundError:
                    pass
            for name in [n for n, count in self.live.items() if not count]:
                self._unmap(name)
        # fresh blocks still on their way when the workers stopped
        if os.path.isdir(SHM_DIR):
            for name in os.listdir(SHM_DIR):
                if name.startswith(self.prefix):
                    try:
                        shared_memory.SharedMemory(name=name).unlink()
                    except FileNotFoundError:
                        pass


SHM_DIR = "/dev/shm"  # where Linux lists POSIX shared memory


def _take(name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A fresh block's array, copied out; the block unlinked."""
    block = shared_memory.SharedMemory(name=name)
    try:
        array = np.array(np.ndarray(shape, np.dtype(dtype), buffer=block.buf))
    finally:
        block.close()
        block.unlink()
    return array
