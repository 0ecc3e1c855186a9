"""jax's persistent compilation cache, on by default: a second start of the same run (or a
notebook's re-run) loads the compiled steps from disk instead of compiling them again."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("resnet_jax")

MIN_COMPILE_SECONDS = 0.2  # cache what took longer to compile (jax's default is 1 s)


def default_dir() -> str:
    """The user's cache directory for compiled programs: $XDG_CACHE_HOME/resnet_jax/jax
    (~/.cache/resnet_jax/jax)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "resnet_jax", "jax")


OFF = ("", "off")  # the settings that turn the cache off ("off" is no directory name here)


def resolve(setting: str) -> str:
    """The directory that `compilation_cache` = `setting` names ('' when off): "auto" is
    $JAX_COMPILATION_CACHE_DIR where that is set, else `default_dir()`; '' and "off" are
    off; a path is itself (`./off` for a directory of that name)."""
    if setting == "auto":
        return os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_dir()
    return "" if setting in OFF else os.path.abspath(os.path.expanduser(setting))


def configure(setting: str) -> str:
    """Point jax's persistent compilation cache at `resolve(setting)` (or turn it off for
    '' or "off"); returns the directory. Takes effect for this process's later compilations."""
    from jax.experimental.compilation_cache import compilation_cache as cache

    path = resolve(setting)
    current = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache \
        else None
    if (path or None) == current:
        return path
    if not path:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            raise ValueError(f"compilation_cache={setting!r}: cannot create {path} ({err}); "
                             f"set --config.compilation_cache to a writable directory, or "
                             f"'off'") from err
        jax.config.update("jax_enable_compilation_cache", True)
        cache.set_cache_dir(path)
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs",
                              MIN_COMPILE_SECONDS)
    cache.reset_cache()  # the next compilation reads the new setting
    log.info("compilation cache: %s", path or "off")
    return path
