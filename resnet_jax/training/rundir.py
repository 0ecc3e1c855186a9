"""A run's directory: the names of what a run writes there, whether it finished, and the
train command's exit statuses. Every writer and reader of a run directory takes them from
here.

    DIR/config.json          the config the run was started with (`--config DIR/config.json`
                             starts that run again)
    DIR/metrics.jsonl        one record per evaluation (and the final one)
    DIR/train_metrics.jsonl  the training metrics between evaluations
    DIR/selected.json        the model the finished run hands over; its presence = finished
    DIR/checkpoints/         orbax checkpoints (latest/, best/)
    DIR/plots/               the curves, as PNG
    DIR/tensorboard/         the metrics for TensorBoard
    DIR/.lock                held (flock) while a process runs it
"""

from __future__ import annotations

import json
import os
from typing import Any

CONFIG = "config.json"
METRICS = "metrics.jsonl"
TRAIN_METRICS = "train_metrics.jsonl"
SELECTED = "selected.json"
CHECKPOINTS = "checkpoints"
PLOTS = "plots"
TENSORBOARD = "tensorboard"
TRACKERS = "trackers.json"  # the tracked runs' ids (W&B, MLflow) and the last step each got
LOCK = ".lock"


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir."""


class CheckpointError(RuntimeError):
    """No usable checkpoint although some exist (all damaged)."""


# The train command's exit statuses (0: finished or stopped with a checkpoint saved).
EXIT_BAD_INPUT = 2  # a config, data or a checkpoint of another run that cannot be used
EXIT_BUSY = 3  # another process holds the workdir
EXIT_DIVERGED = 4  # the loss or a gradient went non-finite
EXIT_NO_CHECKPOINT = 5  # checkpoints exist but none is intact
_STATUS = ((ValueError, EXIT_BAD_INPUT), (FileNotFoundError, EXIT_BAD_INPUT),
           (WorkdirBusyError, EXIT_BUSY), (FloatingPointError, EXIT_DIVERGED),
           (CheckpointError, EXIT_NO_CHECKPOINT))
# the errors a run ends with that are reported as one line and an exit status, no traceback
FAILURES = tuple(kind for kind, _ in _STATUS)


def exit_status(err: BaseException) -> int:
    """The train command's exit status for a run that ended with `err` (one of FAILURES)."""
    return next(code for kind, code in _STATUS if isinstance(err, kind))


def path(workdir: str, name: str) -> str:
    """`workdir/name`, for one of this module's names."""
    return os.path.join(workdir, name)


def is_finished(workdir: str) -> bool:
    """Whether the run in `workdir` finished (it wrote the model it hands over)."""
    return os.path.exists(path(workdir, SELECTED))


def read_selected(workdir: str) -> dict[str, Any]:
    """The run's selected.json (the model a finished run handed over), or {}."""
    if not is_finished(workdir):
        return {}
    with open(path(workdir, SELECTED)) as f:
        return json.load(f)
