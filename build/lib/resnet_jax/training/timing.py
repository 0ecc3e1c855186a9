"""Where a run's time goes: throughput counted from the first step, the share of the time
the loop waited for data (`data_wait`, with a warning), the time to the first step, and a
`jax.profiler` trace of a window of steps (`profile_steps`)."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax

from resnet_jax.training import metrics

log = logging.getLogger("resnet_jax")

DATA_WAIT_WARNING = 0.10  # a period's share of time waiting for data that is worth a warning


def data_wait_warning(share: float, workers: int) -> str:
    """What to tell the user when the training loop waited for data `share` of the time."""
    return (f"data_wait {share:.0%}: the training loop waited for input batches {share:.0%} "
            f"of this period's time, so the devices were idle that long. Raise "
            f"--config.data_workers (now {workers}) or measure the input path "
            f"with: python -m experiments.benchmark --input-pipeline")


ESTIMATE_AFTER = 10  # steps after the first (compiled, warmed up) before estimating


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_line(seconds_per_step: float, d, step: int) -> str:
    """The expected time of an epoch and of the rest of the run at `seconds_per_step`
    (training only: evaluations add their share)."""
    return (f"{seconds_per_step:.3g} s per step: an epoch ({d.steps_per_epoch:,} steps) takes "
            f"about {_duration(seconds_per_step * d.steps_per_epoch)}, the remaining "
            f"{d.end_step - step:,} steps about {_duration(seconds_per_step * (d.end_step - step))}"
            f" (training only)")


class Profile:
    """A jax.profiler trace of steps first..last (counting from 1; `steps` = () for none)
    written to `where`, readable in TensorBoard's profile tab or XProf; the chief only."""

    def __init__(self, steps, where: str, enabled: bool):
        self.first, self.last = (tuple(steps) or (0, -1)) if enabled else (0, -1)
        self.where, self.active = where, False

    def before(self, step: int) -> None:
        if step == self.first and not self.active:
            os.makedirs(self.where, exist_ok=True)
            jax.profiler.start_trace(self.where)
            self.active = True
            log.info("profiling steps %d-%d into %s", self.first, self.last, self.where)

    def after(self, step: int, out) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(out)  # the window's steps have run
            self.close()

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


class Clock:
    """The training loop's clock: `speed` (images/s and data_wait over windows and periods),
    the profile window, and what a period's record says of the time."""

    def __init__(self, config, workdir: str, chief: bool, start_step: int, entered: float,
                 durations=None):
        self.speed = metrics.Throughput(config.batch_size, start_step)
        self.durations = durations  # steps per epoch and the run's end, for the estimate
        self.first: tuple[int, float] | None = None  # (step, time) when the first step was done
        self.profile = Profile(config.profile_steps, os.path.join(workdir, "profile"), chief)
        self.workers = config.data_workers
        self.entered = entered  # time.monotonic() when the run started
        self.last_out: Any = None  # the newest step's outputs, maybe still computing
        self.to_first_step: float | None = None
        self.reported = self.warned = False

    def next_batch(self, batches, step: int):
        """The batch of step `step` (from 1); the time spent waiting for it, once the
        devices have run out of queued steps, counts as `data_wait` (a wait while they
        compute is not one)."""
        self.profile.before(step)
        if self.last_out is not None and not batches.ready():
            jax.block_until_ready(self.last_out)
        waited = time.perf_counter()
        with jax.profiler.TraceAnnotation("data_wait"):
            item = next(batches)
        self.speed.wait(time.perf_counter() - waited)
        return item

    def after(self, step: int, out) -> None:
        """After step `step` was dispatched with outputs `out`."""
        self.last_out = out
        self.profile.after(step, out)
        if self.to_first_step is None:
            # start-up and compilation are not training: throughput counts from here
            jax.block_until_ready(out)
            self.to_first_step = round(time.monotonic() - self.entered, 2)
            log.info("first step done %.2f s after the start", self.to_first_step)
            self.speed.restart(step)
            self.first = (step, time.monotonic())
        elif self.first and step == self.first[0] + ESTIMATE_AFTER and self.durations:
            jax.block_until_ready(out)
            log.info("%s", estimate_line((time.monotonic() - self.first[1]) / ESTIMATE_AFTER,
                                         self.durations, step))

    def annotate(self, record: dict[str, Any]) -> None:
        """A period's record: the time to the first step (the first record of this start);
        the warning, once, when the period waited for data too long."""
        if not self.reported and self.to_first_step is not None:
            self.reported = True
            record["seconds_to_first_step"] = self.to_first_step
        if record.get("train_data_wait", 0.0) > DATA_WAIT_WARNING and not self.warned:
            self.warned = True
            log.warning(data_wait_warning(record["train_data_wait"], self.workers))

    def close(self) -> None:
        self.profile.close()
