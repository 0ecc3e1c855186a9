"""Decisions taken on the validation split after each period: the best checkpoint, the
plateau schedule's cuts (Keras' ReduceLROnPlateau) and early stopping (Keras' EarlyStopping).

Each is a small record of plain numbers, updated by a pure function from the period's
validation metric and saved in the checkpoint's meta, so a resumed run decides exactly as
an uninterrupted one. The test split never reaches this module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections
import numpy as np

from resnet_jax.training.config import has_validation


def metric_mode(metric: str, mode: str) -> str:
    """'min' or 'max': `mode`, or for 'auto' max for accuracies and min otherwise (Keras)."""
    if mode != "auto":
        return mode
    return "max" if "acc" in metric else "min"


def improves(value: float, best: float, mode: str, min_delta: float) -> bool:
    """Keras' rule: `value` beats `best` by more than `min_delta` in direction `mode`."""
    if mode == "min":
        return value < best - min_delta
    return value > best + min_delta


def _start(mode: str) -> float:
    return math.inf if mode == "min" else -math.inf


@dataclasses.dataclass(frozen=True)
class Plateau:
    """ReduceLROnPlateau's state: the best monitored value, periods waited, cooldown left,
    and the learning rate's current multiplier."""

    best: float
    wait: int = 0
    cooldown: int = 0
    scale: float = 1.0


def plateau_update(p: Plateau, value: float, mode: str, min_delta: float, patience: int,
                   factor: float, cooldown: int, min_lr: float, base_lr: float) -> Plateau:
    """The plateau state after a period whose monitored metric is `value`, as Keras'
    ReduceLROnPlateau.on_epoch_end: after `patience` periods without improvement the
    learning rate (`base_lr * scale`) is multiplied by `factor`, not below `min_lr`, and
    `cooldown` periods pass before waiting starts again."""
    best, wait, left, scale = p.best, p.wait, p.cooldown, p.scale
    if left > 0:
        left -= 1
        wait = 0
    if improves(value, best, mode, min_delta):
        best, wait = value, 0
    elif left == 0:  # Keras asks again after counting down, so a cooldown's last period counts
        wait += 1
        if wait >= patience:
            old_lr = base_lr * scale
            if old_lr > np.float32(min_lr):  # Keras compares with min_lr as float32
                scale = max(old_lr * factor, min_lr) / base_lr
                left, wait = cooldown, 0
    return Plateau(best, wait, left, scale)


@dataclasses.dataclass(frozen=True)
class Decisions:
    """Everything decided on validation so far: best value and its step, the plateau, and
    the early-stopping counter."""

    best: float
    best_step: int = -1
    stale: int = 0  # periods since selection_metric last improved by early_stopping_min_delta
    stop_best: float = math.nan  # early stopping's own best (min_delta may differ)
    plateau: Plateau | None = None
    best_weights: str = ""  # "trained" or "ema": the weights of the best; "" before one

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Decisions":
        plateau = d.get("plateau")
        return cls(**{**d, "plateau": Plateau(**plateau) if plateau else None})


def initial(c: ml_collections.ConfigDict) -> Decisions | None:
    """The decisions of a run that has not evaluated yet; None without a validation split."""
    if not has_validation(c):
        return None
    mode = metric_mode(c.selection_metric, c.selection_mode)
    plateau = None
    if c.schedule == "plateau":
        plateau = Plateau(_start(metric_mode(c.plateau_monitor, c.plateau_mode)))
    return Decisions(best=_start(mode), stop_best=_start(mode), plateau=plateau)


def candidates(c: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """(weights, metric) pairs selection compares at each evaluation: the trained or the EMA
    weights on selection_metric, or with selection_weights='either' both, trained first."""
    if c.selection_weights == "either":
        return [("trained", c.selection_metric),
                ("ema", "val_ema_" + c.selection_metric[len("val_"):])]
    return [("ema" if c.selection_metric.startswith("val_ema_") else "trained",
             c.selection_metric)]


def best_weights(c: ml_collections.ConfigDict, d: Decisions | None) -> str:
    """"trained" or "ema": the weights of the best checkpoint decided in `d`."""
    if d is not None and d.best_weights:
        return d.best_weights
    return candidates(c)[0][0]  # decisions saved before best_weights was recorded


def decide(c: ml_collections.ConfigDict, d: Decisions, record: dict[str, Any], step: int
           ) -> tuple[Decisions, bool, bool]:
    """(decisions after the period's `record`, whether it is the new best, whether to stop
    early). Reads only the record's val_* metrics. With two candidate weights the period
    counts with the better of the two (the trained weights on a tie)."""
    mode = metric_mode(c.selection_metric, c.selection_mode)
    weights, value = None, None
    for name, metric in candidates(c):
        v = float(record[metric])
        if value is None or improves(v, value, mode, 0.0):
            weights, value = name, v
    new_best = improves(value, d.best, mode, 0.0)
    best, best_step = (value, step) if new_best else (d.best, d.best_step)
    chosen = weights if new_best else d.best_weights
    stale, stop_best = d.stale + 1, d.stop_best
    if improves(value, stop_best, mode, c.early_stopping_min_delta):
        stale, stop_best = 0, value
    plateau = d.plateau
    if plateau is not None:
        plateau = plateau_update(
            plateau, float(record[c.plateau_monitor]), metric_mode(c.plateau_monitor,
                                                                   c.plateau_mode),
            c.plateau_min_delta, c.plateau_patience, c.plateau_factor, c.plateau_cooldown,
            c.plateau_min_lr, c.learning_rate)
    stop = bool(c.early_stopping_patience) and stale >= c.early_stopping_patience
    return Decisions(best, best_step, stale, stop_best, plateau, chosen), new_best, stop
