"""Optimizers and learning-rate schedules built from the config (optax)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adam", "adamw", "lars")
SCHEDULES = ("constant", "piecewise", "cosine", "onecycle", "plateau")
WEIGHT_DECAY_MODES = ("l2", "decoupled")


def kernel_mask(params: Any) -> Any:
    """True for conv/dense kernels, False for biases and BatchNorm scales/offsets."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def make_schedule(config, steps_per_epoch: int) -> optax.Schedule:
    """The base learning-rate schedule (per step); 'plateau' scales it at run time."""
    lr = config.learning_rate
    total = config.get("num_steps", 0) or config.num_epochs * steps_per_epoch
    warmup = int(round(config.get("warmup_epochs", 0.0) * steps_per_epoch))
    kind = config.schedule
    if kind in ("constant", "plateau"):
        return optax.constant_schedule(lr)
    if kind == "piecewise":
        unit = steps_per_epoch if config.get("lr_boundaries_unit", "steps") == "epochs" else 1
        factor = config.get("lr_decay_factor", 0.1)
        boundaries = {int(round(b * unit)): factor for b in config.lr_boundaries}
        base = optax.piecewise_constant_schedule(lr, boundaries)
        if warmup:
            return optax.join_schedules(
                [optax.linear_schedule(0.0, lr, warmup), lambda s: base(s + warmup)], [warmup]
            )
        return base
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1))
    if kind == "onecycle":
        return optax.cosine_onecycle_schedule(
            total, lr, pct_start=config.get("onecycle_pct_start", 0.25),
            div_factor=config.get("onecycle_div_factor", 25.0),
            final_div_factor=config.get("onecycle_final_div_factor", 1e4),
        )
    raise ValueError(f"schedule={kind!r}; expected one of {SCHEDULES}")


def make_optimizer(config, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
    """The optax chain of the config and its base schedule.

    Weight decay is the paper's L2 term (added to the gradient, so it passes through momentum
    and adaptive scaling) or decoupled (Loshchilov & Hutter 2019), masked to kernels unless
    `weight_decay_all` is set. 'plateau' multiplies the schedule by optax's reduce-on-plateau
    scale, fed with the training loss averaged over `plateau_accumulation` steps.
    """
    schedule = make_schedule(config, steps_per_epoch)
    wd = config.weight_decay
    mask = None if config.get("weight_decay_all", False) else kernel_mask
    mode = config.get("weight_decay_mode", "l2")
    if mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode={mode!r}; expected one of {WEIGHT_DECAY_MODES}")
    name = config.optimizer
    parts: list[optax.GradientTransformation] = []
    if config.get("grad_clip", 0.0):
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    if wd and mode == "l2" and name != "lars":
        parts.append(optax.add_decayed_weights(wd, mask))
    decoupled = wd if mode == "decoupled" else 0.0
    if name == "sgd":
        parts.append(optax.trace(decay=config.momentum, nesterov=config.get("nesterov", False))
                     if config.momentum else optax.identity())
        if decoupled:
            parts.append(optax.add_decayed_weights(decoupled, mask))
    elif name in ("adam", "adamw"):
        parts.append(optax.scale_by_adam(b1=config.get("adam_b1", 0.9),
                                         b2=config.get("adam_b2", 0.999),
                                         eps=config.get("adam_eps", 1e-8)))
        if name == "adamw" or decoupled:
            parts.append(optax.add_decayed_weights(decoupled or wd, mask))
    elif name == "lars":
        return (_with_plateau(config, optax.lars(schedule, weight_decay=wd, weight_decay_mask=mask,
                                                 trust_ratio_mask=mask, momentum=config.momentum),
                              parts), schedule)
    else:
        raise ValueError(f"optimizer={name!r}; expected one of {OPTIMIZERS}")
    parts.append(optax.scale_by_learning_rate(schedule))
    return _with_plateau(config, optax.identity(), parts), schedule


def _with_plateau(config, core, parts):
    chain = [*parts, core]
    if config.schedule == "plateau":
        chain.append(optax.contrib.reduce_on_plateau(
            factor=config.get("plateau_factor", 0.1),
            patience=config.get("plateau_patience", 5),
            cooldown=config.get("plateau_cooldown", 0),
            accumulation_size=config.get("plateau_accumulation", 1),
        ))
    return optax.chain(*chain)


def plateau_scale(opt_state: Any) -> jax.Array:
    """The reduce-on-plateau multiplier inside `opt_state` (1 when there is none)."""
    scales = [s.scale for s in jax.tree.leaves(
        opt_state, is_leaf=lambda s: isinstance(s, optax.contrib.ReduceLROnPlateauState))
        if isinstance(s, optax.contrib.ReduceLROnPlateauState)]
    return scales[0] if scales else jnp.ones((), jnp.float32)


def current_learning_rate(schedule: Callable, opt_state: Any, step: jax.Array) -> jax.Array:
    """The learning rate applied at `step`: the schedule times any plateau reduction."""
    return jnp.asarray(schedule(step), jnp.float32) * plateau_scale(opt_state)
