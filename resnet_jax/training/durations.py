"""Every duration of a run in steps, from the config's durations in their natural units."""

from __future__ import annotations

import dataclasses

import ml_collections


@dataclasses.dataclass(frozen=True)
class Durations:
    """Every duration of a run, in steps."""

    steps_per_epoch: int
    total_steps: int
    end_step: int  # total_steps, or halt_after_steps when that comes first
    warmup_steps: int
    lr_boundaries: tuple[int, ...]
    eval_every_steps: int
    checkpoint_every_steps: int  # 0: only at evaluations


def durations(c: ml_collections.ConfigDict, steps_per_epoch: int) -> Durations:
    """The config's durations converted to steps, with `steps_per_epoch` full batches."""
    total = c.num_steps or c.num_epochs * steps_per_epoch
    unit = steps_per_epoch if c.lr_boundaries_unit == "epochs" else 1
    return Durations(
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        end_step=min(total, c.halt_after_steps) if c.halt_after_steps else total,
        warmup_steps=int(round(c.warmup_epochs * steps_per_epoch)),
        lr_boundaries=tuple(int(round(b * unit)) for b in c.lr_boundaries),
        eval_every_steps=c.eval_every_epochs * steps_per_epoch,
        checkpoint_every_steps=c.checkpoint_every_steps
        or c.checkpoint_every_epochs * steps_per_epoch,
    )
