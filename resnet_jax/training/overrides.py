"""Fields that another field silently overrides: the rule for a user's overrides of a config.

A run's length is `num_steps` when it is set, else `num_epochs`: of the two, the one a user
overrides last wins (on a config that sets the other too), and a line says so. Other fields
only matter under another field's setting (`lr_boundaries` with the piecewise schedule,
`image_size` on variable-size datasets, ...): overriding one where it would be ignored is an
error naming both; a config file that sets one is worth a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Iterable

import ml_collections

from resnet_jax.data.sources import DATASETS
from resnet_jax.training.config import FIELDS, with_overrides

log = logging.getLogger("resnet_jax")


@dataclasses.dataclass(frozen=True)
class Unused:
    """`fields`, away from their defaults, are ignored when `ignored(config)`: `reason`."""

    fields: tuple[str, ...]
    ignored: Callable[[ml_collections.ConfigDict], bool]
    reason: Callable[[ml_collections.ConfigDict], str]


def _fixed_size(c: ml_collections.ConfigDict) -> bool:
    return DATASETS[c.dataset].image_shape is not None


def _folder_has_val(c: ml_collections.ConfigDict) -> bool:
    return (c.dataset == "image_folder" and bool(c.data_dir)
            and os.path.isdir(os.path.join(c.data_dir, "val")))


RULES = (
    Unused(("image_size", "eval_image_size", "eval_crop_pct"), _fixed_size,
           lambda c: f"dataset={c.dataset!r} has fixed-size images "
                     f"{DATASETS[c.dataset].image_shape}; these crop variable-size ones"),
    Unused(("lr_boundaries", "lr_decay_factor", "lr_boundaries_unit"),
           lambda c: c.schedule != "piecewise",
           lambda c: f"schedule={c.schedule!r}; they shape schedule='piecewise'"),
    Unused(("warmup_epochs", "warmup_init_fraction"),
           lambda c: c.schedule not in ("cosine", "piecewise"),
           lambda c: f"schedule={c.schedule!r} has no warm-up (cosine and piecewise do)"),
    Unused(("cosine_end_fraction",), lambda c: c.schedule != "cosine",
           lambda c: f"schedule={c.schedule!r}; it ends schedule='cosine'"),
    Unused(("onecycle_pct_start", "onecycle_div_factor", "onecycle_final_div_factor"),
           lambda c: c.schedule != "onecycle",
           lambda c: f"schedule={c.schedule!r}; they shape schedule='onecycle'"),
    Unused(tuple(f for f in FIELDS if f.startswith("plateau_")),
           lambda c: c.schedule != "plateau",
           lambda c: f"schedule={c.schedule!r}; they drive schedule='plateau'"),
    Unused(("rand_augment_num_ops", "rand_augment_magnitude"),
           lambda c: c.auto_augment != "rand_augment",
           lambda c: f"auto_augment={c.auto_augment!r}; they set 'rand_augment'"),
    Unused(("cpu_conv_dtype",), lambda c: not c.cpu_kernels,
           lambda c: "cpu_kernels=False; it is the CPU kernels' multiply type"),
    Unused(("ema_warmup",), lambda c: not c.ema_decay,
           lambda c: "ema_decay=0: there is no EMA"),
    Unused(("holdout_fraction",), _folder_has_val,
           lambda c: f"{c.data_dir} has val/, which is the validation split"),
    Unused(("early_stopping_min_delta",), lambda c: not c.early_stopping_patience,
           lambda c: "early_stopping_patience=0: no early stopping"),
)


def unused_fields(config: ml_collections.ConfigDict) -> dict[str, str]:
    """{field: why it is ignored} for every field set away from its default that the
    config's other fields make unused."""
    out = {}
    for rule in RULES:
        for name in rule.fields:
            if config[name] != FIELDS[name].default and rule.ignored(config):
                out[name] = rule.reason(config)
    return out


def apply_overrides(config: ml_collections.ConfigDict, given: Iterable[str]
                    ) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(config, lines to log) for a config whose fields `given` (in the order given) a user
    overrode. Of num_epochs and num_steps, the one given last sets the length: num_epochs
    makes the config's num_steps 0, and a line says which won. A ValueError names an
    overridden field that the config's other fields make unused."""
    given = list(given)
    lengths = [name for name in given if name in ("num_epochs", "num_steps")]
    lines = []
    if lengths and config.num_steps:
        other = {"num_epochs": f"num_steps={config.num_steps}",
                 "num_steps": f"num_epochs={config.num_epochs}"}[lengths[-1]]
        where = "given before it" if len(set(lengths)) == 2 else "the config's"
        if lengths[-1] == "num_epochs":
            lines.append(f"num_epochs={config.num_epochs} given: the run counts "
                         f"{config.num_epochs} epochs; {where} {other} is now 0")
            config = with_overrides(config, num_steps=0)
        else:
            lines.append(f"num_steps={config.num_steps} given: the run is {config.num_steps} "
                         f"steps; {where} {other} is not used")
    if "trackers" in given:  # --config.trackers=tensorboard,mlflow: one string, two names
        config = with_overrides(config, trackers=tuple(
            name.strip() for item in config.trackers for name in str(item).split(",")
            if name.strip()))
    unused = unused_fields(config)
    for name in sorted(set(given) & set(unused)):
        raise ValueError(f"{name}={config[name]!r} is given but has no effect: "
                         f"{unused[name]}")
    return config, lines


def warn_unused(config: ml_collections.ConfigDict) -> None:
    """One warning per field the config sets that its other fields make unused."""
    for name, why in unused_fields(config).items():
        log.warning("%s=%r has no effect: %s", name, config[name], why)
