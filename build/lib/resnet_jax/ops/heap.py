"""Keep freed heap memory in the process, so that XLA:CPU's per-step buffers are not
page-faulted in again on every step.

XLA:CPU allocates an executable's temporary buffer (300 MB for a CIFAR ResNet-20 train step
at batch 128) with malloc on every call and frees it afterwards. glibc serves an allocation
that large with mmap and returns it to the kernel on free, so each step page-faults the
whole buffer in again: 73,000 minor faults and 170-210 ms of system time per ResNet-20
step on the 2-core CPU of docs/cpu_speed_log.md (section 10). With one
arena, no mmap'd chunks and no trimming, the buffer stays in the heap and the next step
reuses it (0-50 faults per step).

`retain_freed_memory()` sets that through `mallopt`. It only takes effect for threads that
have not allocated yet, so it has to run before JAX creates its CPU client (the first
`jax.devices()` or computation): the entry points (`experiments.train`, ...) call it first
thing when the config's `cpu_kernels` switch is on; importing resnet_jax never does. It is meant for hosts where
JAX computes on the CPU: with one arena, every thread's malloc shares one lock (glibc's
per-thread caches take most small allocations without it), so it stays off where a GPU/TPU
plugin for JAX is installed or `JAX_PLATFORMS` names no CPU. `RESNET_JAX_HEAP=retain` forces
it on, `RESNET_JAX_HEAP=default` leaves glibc's defaults alone. On other C libraries it does
nothing.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform

ENV = "RESNET_JAX_HEAP"

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest on 64-bit hosts

_INT_MAX = 2**31 - 1

_state = {"applied": None}


def _jax_computes_on_cpu() -> bool:
    """Whether JAX will (most likely) compute on this host's CPU: JAX_PLATFORMS puts the CPU
    first, or it is unset and no accelerator plugin is installed. Imports nothing."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    plugins = importlib.util.find_spec("jax_plugins")
    locations = list(plugins.submodule_search_locations or []) if plugins else []
    if any(os.path.isdir(loc) and os.listdir(loc) for loc in locations):
        return False
    return importlib.util.find_spec("libtpu") is None


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring). Returns whether
    the settings were applied; idempotent."""
    if _state["applied"] is not None:
        return _state["applied"]
    value = os.environ.get(ENV)
    if value not in (None, "retain", "default"):
        raise ValueError(f"{ENV}={value!r}: expected 'retain' or 'default'")
    wanted = value == "retain" or (value is None and _jax_computes_on_cpu())
    applied = False
    if wanted and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            applied = all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0),
                           mallopt(_M_TRIM_THRESHOLD, _INT_MAX), mallopt(_M_TOP_PAD, 64 << 20)])
    _state["applied"] = applied
    return applied


def return_large_buffers() -> bool:
    """Undo the retention for large blocks: allocations of 32 MiB or more are mapped again
    and go back to the kernel when freed, and what the heap holds free now is trimmed.
    For steps large against the host's memory: in one retained heap, blocks of many sizes
    fragment it, and the process can grow to several times the step's buffers
    (docs/cpu_speed_log.md, "A retained heap and large steps"). Returns whether anything
    changed."""
    if not _state["applied"]:
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = all([mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), mallopt(_M_MMAP_MAX, 65536),
                mallopt(_M_TRIM_THRESHOLD, 128 << 10)])
    ctypes.CDLL(None).malloc_trim(0)
    _state["applied"] = False
    return done

