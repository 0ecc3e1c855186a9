"""Orbax checkpoints of the train state: the latest few and the best by test accuracy."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Two orbax managers under `directory`: `latest/` (last `keep` steps) and `best/`."""

    def __init__(self, directory: str, keep: int = 2):
        directory = os.path.abspath(directory)
        self.latest = ocp.CheckpointManager(
            os.path.join(directory, "latest"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        self.best = ocp.CheckpointManager(
            os.path.join(directory, "best"),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        )

    def save_latest(self, state: Any, step: int) -> None:
        """Save `state` as step `step` (asynchronously; `wait` blocks until written)."""
        if step not in self.latest.all_steps():
            self.latest.save(step, args=ocp.args.StandardSave(state))

    def save_best(self, state: Any, step: int) -> None:
        if step not in self.best.all_steps():
            self.best.save(step, args=ocp.args.StandardSave(state))

    def restore(self, target: Any, which: str = "latest", step: int | None = None) -> Any | None:
        """The saved state shaped like `target` (latest step by default), or None if none."""
        manager = self.latest if which == "latest" else self.best
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()
