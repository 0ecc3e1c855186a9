"""Orbax checkpoints of the train state: the latest few and the best by test accuracy.

States are saved as host NumPy arrays (one global copy, whatever the strategy that trained
them) and restored as NumPy arrays that the caller places on its devices, so a checkpoint
written by a 4-device run resumes on 1 device or on several processes."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from resnet_jax.training.parallel import fetch


def to_host(state: Any) -> Any:
    """A NumPy copy of a (replicated) state."""
    return jax.tree.map(fetch, state)


class Checkpointer:
    """Two orbax managers under `directory`: `latest/` (last `keep` steps) and `best/`."""

    def __init__(self, directory: str, keep: int = 2):
        directory = os.path.abspath(directory)
        # Distinct barrier names: both managers may save the same step at once, and on
        # several processes orbax synchronises each save with barriers keyed by step.
        self.latest = ocp.CheckpointManager(
            os.path.join(directory, "latest"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix="latest")),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(directory, "best"),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix="best")),
        )

    def save_latest(self, state: Any, step: int) -> None:
        """Save `state` as step `step` (asynchronously; `wait` blocks until written)."""
        if step not in self.latest.all_steps():
            self.latest.save(step, args=ocp.args.StandardSave(to_host(state)))

    def save_best(self, state: Any, step: int) -> None:
        if step not in self.best.all_steps():
            self.best.save(step, args=ocp.args.StandardSave(to_host(state)))

    def restore(self, target: Any, which: str = "latest", step: int | None = None) -> Any | None:
        """The saved state (NumPy) shaped like `target` (latest step by default), or None."""
        manager = self.latest if which == "latest" else self.best
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        like = jax.tree.map(lambda x: np.empty(x.shape, x.dtype), target)
        return manager.restore(step, args=ocp.args.StandardRestore(like))

    def restore_raw(self, which: str = "latest") -> tuple[int, Any] | None:
        """(step, saved tree as nested dicts of NumPy arrays) with no target, or None."""
        manager = self.latest if which == "latest" else self.best
        step = manager.latest_step()
        if step is None:
            return None
        meta = manager.item_metadata(step)
        like = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), meta)
        return step, manager.restore(step, args=ocp.args.StandardRestore(like))

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()
