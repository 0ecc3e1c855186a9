"""A config as JSON: what a run's config.json holds, written and read back (fields renamed
or removed since a run was written are migrated), and the JSON values of config fields."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from resnet_jax.training import rundir
from resnet_jax.training.config import base_config, validate_config


# Fields renamed since runs were written: their config.json files still load.
RENAMED = {"fast_cpu_conv": "cpu_kernels"}
# Fields removed since: dropped when an old config.json is read.
REMOVED = {"plateau_accumulation"}


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was started with (its config.json), validated."""
    path = rundir.path(workdir, rundir.CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a training run directory?")
    with open(path) as f:
        return config_from_dict(json.load(f))


def config_from_dict(values: dict[str, Any]) -> ml_collections.ConfigDict:
    """A validated config from its JSON form (a run's config.json, a sweep's base config)."""
    values = {RENAMED.get(k, k): v for k, v in values.items() if k not in REMOVED}
    config = base_config()
    config.update(tuples_from_json(values))
    validate_config(config)
    return config


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The JSON form of a config, as a run's config.json holds it."""
    return json.loads(config.to_json_best_effort())


def tuples_from_json(value: Any) -> Any:
    """JSON's lists back to the tuples configs hold (model fields must be hashable)."""
    if isinstance(value, dict):
        return {k: tuples_from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(tuples_from_json(v) for v in value)
    return value
