"""What keeps a run's workdir safe: one run per workdir, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
import time
from typing import Iterator


from resnet_jax.training.rundir import LOCK, WorkdirBusyError


def check_workdir(workdir: str) -> None:
    """A ValueError when `workdir`, or the nearest part of its path that exists, is a file."""
    path = os.path.abspath(workdir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "is" if path == os.path.abspath(workdir) else f"is inside {path}, which is"
        raise ValueError(f"workdir {workdir} {where} a file; expected a directory for the run "
                         "(a new one, or an earlier run's to resume)")


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Hold `workdir/.lock` for the duration: a second run on the same workdir gets a
    WorkdirBusyError instead of interleaving checkpoints. The lock is an flock, so the
    kernel releases it when the holder dies, even by SIGKILL."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise WorkdirBusyError(
            f"workdir {workdir} is in use by another run ({holder}); wait for it to finish, "
            "stop it, or choose another --workdir") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def stop_requested(stop: "StopSignal", step: int, every: int) -> bool:
    """Whether to stop after `step`. One process: as soon as a signal arrived. Several: every
    `every` steps, all processes agree (any one signalled), so they save the same step."""
    import jax

    if jax.process_count() == 1:
        return stop.received is not None
    if step % max(every, 1):
        return False
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(stop.received is not None))
    return bool(np.any(flags))


class StopSignal:
    """Records SIGTERM / SIGINT instead of dying, so the loop can finish its step, save and
    leave. A second SIGINT while the first is pending raises KeyboardInterrupt (to force
    the way out). Handlers are installed only from the main thread and restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
