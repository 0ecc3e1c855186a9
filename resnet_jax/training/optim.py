"""Optimizers and learning-rate schedules built from the config (optax), with every
duration already in steps (`durations.durations`)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from resnet_jax.training.durations import Durations

OPTIMIZERS = ("sgd", "adam", "adamw", "lars", "lamb")
SCHEDULES = ("constant", "piecewise", "cosine", "onecycle", "plateau")
WEIGHT_DECAY_MODES = ("l2", "decoupled")


def kernel_mask(params: Any) -> Any:
    """True for conv/dense kernels, False for biases and BatchNorm scales/offsets."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params
    )


def make_schedule(config, d: Durations) -> optax.Schedule:
    """The base learning-rate schedule (per step); 'plateau' scales it at run time."""
    lr, kind, warmup = config.learning_rate, config.schedule, d.warmup_steps
    if kind in ("constant", "plateau"):
        return optax.constant_schedule(lr)
    if kind == "piecewise":
        boundaries = {b: config.lr_decay_factor for b in d.lr_boundaries}
        base = optax.piecewise_constant_schedule(lr, boundaries)
        if warmup:
            return optax.join_schedules(
                [optax.linear_schedule(config.warmup_init_fraction * lr, lr, warmup),
                 lambda s: base(s + warmup)], [warmup]
            )
        return base
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            config.warmup_init_fraction * lr, lr, warmup, max(d.total_steps, warmup + 1),
            end_value=config.cosine_end_fraction * lr)
    if kind == "onecycle":  # optax's cosine_onecycle_schedule, either interpolation
        div, total = config.onecycle_div_factor, d.total_steps
        return optax.piecewise_interpolate_schedule(
            {"cos": "cosine", "linear": "linear"}[config.onecycle_anneal], lr / div,
            {int(config.onecycle_pct_start * total): div,
             int(total): 1.0 / (div * config.onecycle_final_div_factor)})
    raise ValueError(f"schedule={kind!r}; expected one of {SCHEDULES}")


def decoupled_weight_decay(rate: float, schedule: optax.Schedule, mask: Any = None
                           ) -> optax.GradientTransformation:
    """Adds -schedule(step) * rate * param to the (already learning-rate-scaled) updates: the
    decay decoupled from the gradient's path (Loshchilov & Hutter 2019), at the schedule's
    pace, through no momentum or adaptive scaling."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("decoupled weight decay needs the parameters")
        factor = -rate * schedule(state.count)
        decayed = jax.tree.map(lambda u, p: u + factor * p, updates, params)
        return decayed, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))

    inner = optax.GradientTransformation(init, update)
    return optax.masked(inner, mask) if mask is not None else inner


def make_optimizer(config, d: Durations
                   ) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
    """The optax chain of the config and its base schedule.

    Weight decay is applied once, in one of two modes: 'l2', the paper's term added to the
    gradient (so it passes through momentum, Adam's scaling or LARS' trust ratio), or
    'decoupled' (Loshchilov & Hutter 2019), subtracted from the parameters at the learning
    rate's pace, outside the gradient's path. 'adamw' is Adam with decoupled decay, so it
    takes only that mode. 'lamb' (You et al. 2020) takes 'decoupled' as its own definition
    does: the decay is added to Adam's update before each tensor's trust ratio
    ||w|| / ||update||, then scaled by the learning rate. Masked to kernels unless
    `weight_decay_all`. 'plateau' multiplies
    the whole update by a multiplier that the loop cuts on the validation metric
    (`selection.plateau_update`, Keras' ReduceLROnPlateau).
    """
    schedule = make_schedule(config, d)
    wd, mode, name = config.weight_decay, config.weight_decay_mode, config.optimizer
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r}; expected one of {OPTIMIZERS}")
    if name == "adamw" and wd and mode != "decoupled":
        raise ValueError(f"optimizer='adamw' is Adam with decoupled weight decay, but "
                         f"weight_decay_mode={mode!r}: set weight_decay_mode='decoupled', or "
                         f"optimizer='adam' for L2 decay")
    mask = None if config.weight_decay_all else kernel_mask
    parts: list[optax.GradientTransformation] = []
    if config.grad_clip:
        parts.append(optax.clip_by_global_norm(config.grad_clip))
    if wd and mode == "l2":
        parts.append(optax.add_decayed_weights(wd, mask))
    if name == "sgd":
        parts.append(optax.trace(decay=config.momentum, nesterov=config.nesterov)
                     if config.momentum else optax.identity())
        parts.append(optax.scale_by_learning_rate(schedule))
    elif name == "lamb":  # optax.lamb's order: Adam, decay, trust ratio, learning rate
        parts.append(optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2,
                                         eps=config.adam_eps))
        if wd and mode == "decoupled":  # LAMB's own decay: inside the trust ratio
            parts.append(optax.add_decayed_weights(wd, mask))
        parts.append(optax.scale_by_trust_ratio())
        parts.append(optax.scale_by_learning_rate(schedule))
    elif name in ("adam", "adamw"):
        parts.append(optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2,
                                         eps=config.adam_eps))
        parts.append(optax.scale_by_learning_rate(schedule))
    else:  # lars: optax.lars' order (trust ratio, learning rate, then momentum), decay apart
        trust = optax.scale_by_trust_ratio(trust_coefficient=config.lars_trust_coefficient,
                                           eps=config.lars_eps)
        parts.append(optax.masked(trust, mask) if mask is not None else trust)
        parts.append(optax.scale_by_learning_rate(schedule))
        parts.append(optax.trace(decay=config.momentum, nesterov=config.nesterov))
    if wd and mode == "decoupled" and name != "lamb":
        parts.append(decoupled_weight_decay(wd, schedule, mask))
    return _with_plateau(config, d, optax.identity(), parts), schedule


class PlateauScale(NamedTuple):
    """The learning rate's multiplier set by the plateau schedule (selection.Plateau)."""

    scale: jax.Array


def scale_by_plateau() -> optax.GradientTransformation:
    """Multiplies the updates by the multiplier in its state. The step never changes it: the
    loop sets it (`with_plateau_scale`) when a validation period decides on a cut."""

    def init(params):
        del params
        return PlateauScale(jnp.ones((), jnp.float32))

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates), state

    return optax.GradientTransformation(init, update)


def _with_plateau(config, d: Durations, core, parts):
    del d
    chain = [*parts, core]
    if config.schedule == "plateau":
        chain.append(scale_by_plateau())
    return optax.chain(*chain)


def _is_plateau(s: Any) -> bool:
    return isinstance(s, PlateauScale)


def plateau_scale(opt_state: Any) -> jax.Array:
    """The plateau multiplier inside `opt_state` (1 when there is none)."""
    scales = [s.scale for s in jax.tree.leaves(opt_state, is_leaf=_is_plateau) if _is_plateau(s)]
    return scales[0] if scales else jnp.ones((), jnp.float32)


def with_plateau_scale(opt_state: Any, scale: float) -> Any:
    """`opt_state` with the plateau multiplier set to `scale` (same shape and placement)."""
    return jax.tree.map(
        lambda s: PlateauScale(jnp.full_like(s.scale, scale)) if _is_plateau(s) else s,
        opt_state, is_leaf=_is_plateau)


def current_learning_rate(schedule: Callable, opt_state: Any, step: jax.Array) -> jax.Array:
    """The learning rate applied at `step`: the schedule times any plateau reduction."""
    return jnp.asarray(schedule(step), jnp.float32) * plateau_scale(opt_state)
