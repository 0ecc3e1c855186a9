"""Experiment config files: found by name, loaded, and a user's overrides applied with the
rule of `overrides` (an overridden length wins; an overridden field that would be ignored is
an error)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import ml_collections

from resnet_jax.training.config import with_overrides
from resnet_jax.training.overrides import apply_overrides

log = logging.getLogger("resnet_jax")

# The experiment configs of a checkout, found by name by load_config.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "experiments" / "configs"


def config_names() -> list[str]:
    """The experiment configs `load_config` knows by name."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                  if not p.stem.startswith("_") and p.stem != "common")


def load_config(path_or_name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """A validated config: the `get_config()` of a config file (a path ending in .py) or of
    the experiment config of that name (experiments/configs/NAME.py), with fields overridden
    (`overrides.apply_overrides`)."""
    path = Path(path_or_name)
    if path.suffix != ".py":
        path = CONFIG_DIR / f"{path_or_name}.py"
        if not path.exists():
            raise ValueError(f"no experiment config named {path_or_name!r}; known: "
                             f"{', '.join(config_names())} (or pass a path to a .py file)")
    elif not path.exists():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    spec = importlib.util.spec_from_file_location(f"resnet_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} has no get_config()")
    config, lines = apply_overrides(with_overrides(module.get_config(), **overrides), overrides)
    for line in lines:
        log.info("%s", line)
    return config
