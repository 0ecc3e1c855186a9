"""Shared-memory slots: how worker processes hand batches to the training process without
fresh memory for every batch.

Fresh shared memory costs more than the copy into it: the kernel zeroes and maps every page
on first touch. So the training process creates SLOTS_PER_WORKER blocks per worker when a
pipeline starts, and they are reused for its whole life. A worker writes a batch's images
into one of its free slots, marks it busy and hands over only its name (`SlotRef`); the
training process reads the batch in place (on the CPU, `device_put` even aliases it) and
marks the slot free again when nothing refers to that batch any more (its array's
finalizer). With no slot free (the worker is ahead), a worker hands over a plain array,
which crosses pickled (the pipeline turns grain's shared memory off).

The training process owns the names: it unlinks them when the pipeline closes (after its
workers stopped), and unmaps each slot once no batch reads from it.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from multiprocessing import shared_memory
from typing import Any

import numpy as np

HEADER = 64  # bytes before the data: the busy flag, and 64-byte alignment of the data
SLOTS_PER_WORKER = 4


@dataclasses.dataclass(frozen=True)
class SlotRef:
    """A batch array waiting in a slot: what crosses the process boundary."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def _busy(buf) -> bool:
    return bytes(buf[:4]) != bytes(4)


class _WorkerSlots:
    """A worker process's view of its slots (attached on first use)."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.slots: list[shared_memory.SharedMemory] | None = None
        self.taken: set[int] = set()  # being filled by a thread of this worker
        self.lock = threading.Lock()

    def put(self, array: np.ndarray) -> SlotRef | np.ndarray:
        """`array` copied into a free slot (its SlotRef), or `array` itself when none is."""
        need = HEADER + array.nbytes
        with self.lock:  # a worker's decoding threads share its slots
            if self.slots is None:
                self.slots = [shared_memory.SharedMemory(name=n) for n in self.names]
            free = [k for k, s in enumerate(self.slots)
                    if k not in self.taken and s.size >= need and not _busy(s.buf)]
            if not free:
                return array
            k = free[0]
            self.taken.add(k)
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

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        image = batch.get("image")
        mine = self.names[_worker_index % len(self.names)] if self.names else ()
        if not mine or not isinstance(image, np.ndarray) or not image.flags.c_contiguous:
            return batch
        if mine not in _attached:
            _attached[mine] = _WorkerSlots(mine)
        return {**batch, "image": _attached[mine].put(image)}


class Slots:
    """The training process's side of one pipeline's slots: created here, read in place,
    unlinked and unmapped on `close`."""

    def __init__(self, workers: int, nbytes: int, per_worker: int = SLOTS_PER_WORKER):
        self.lock = threading.Lock()
        self.slots: dict[str, shared_memory.SharedMemory] = {}
        self.live: dict[str, int] = {}
        self.closing = False
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
        return ToSlot(self.names)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A batch whose "image" waits in a slot, with the array read in place."""
        ref = batch.get("image")
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
