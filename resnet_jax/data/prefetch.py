"""Batches put on the devices ahead of the step that needs them: a background thread draws
the next batches from the input pipeline and transfers them while a step runs."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator


class prefetch:
    """Prepare the next `size` batches in a background thread and hand them to `put`
    (device transfer) before they are needed: up to `size` transferred batches wait while
    a step runs, and one more is in transfer. With `state`, yields (batch, state()) where
    state() is taken right after the batch was drawn: the position to resume after it.
    `ready()` says whether the next one is there already (a `next` would not wait)."""

    _END = object()

    def __init__(self, iterator: Iterator[dict], put: Callable[[dict], Any], size: int = 2,
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
