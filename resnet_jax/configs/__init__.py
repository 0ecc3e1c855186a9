"""The experiment configs, installed with the package, and the one way to load a config:
by name (`fashion_mnist`: the module `resnet_jax.configs.fashion_mnist`), from a config file
(a path ending in .py, whose `get_config()` gives it) or from a run's `config.json` (a JSON
file holds the config a run was started with: that run again), with a user's overrides
applied by the rule of `training.overrides` (an overridden length wins; an overridden field
that would be ignored is an error)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import pkgutil
from pathlib import Path
from typing import Any

import ml_collections

from resnet_jax.training.config import with_overrides
from resnet_jax.training.config_json import config_from_dict
from resnet_jax.training.overrides import apply_overrides

log = logging.getLogger("resnet_jax")

# modules here that are not experiments: the recipes the experiments share
_NOT_EXPERIMENTS = {"common"}


def config_names() -> list[str]:
    """The experiment configs known by name."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if not m.name.startswith("_") and m.name not in _NOT_EXPERIMENTS)


def _from_python(path: Path) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"resnet_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config()")
    return module.get_config()


def _from_json(path: Path) -> ml_collections.ConfigDict:
    try:
        with open(path) as f:
            values = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of config fields (a run's "
                         f"config.json), got {type(values).__name__}")
    return config_from_dict(values)


def read_config(path_or_name: str) -> ml_collections.ConfigDict:
    """The config of an experiment name, a .py config file or a .json config (a run's
    config.json), before overrides; a ValueError or FileNotFoundError says what is wrong."""
    path = Path(path_or_name)
    if path.suffix not in (".py", ".json"):
        if path_or_name not in config_names():
            raise ValueError(f"no experiment config named {path_or_name!r}; known: "
                             f"{', '.join(config_names())} (or give a path to a .py config "
                             "file or a run's config.json)")
        return importlib.import_module(f"{__name__}.{path_or_name}").get_config()
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found; expected a .py config "
                                f"file, a run's config.json or one of: {', '.join(config_names())}")
    return _from_python(path) if path.suffix == ".py" else _from_json(path)


def load_config(path_or_name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """A validated config (`read_config`) with fields overridden (`overrides.apply_overrides`)."""
    config = read_config(path_or_name)
    config, lines = apply_overrides(with_overrides(config, **overrides), overrides)
    for line in lines:
        log.info("%s", line)
    return config
