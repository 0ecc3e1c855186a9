"""Shared fixtures and helpers for the test suite."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")  # the Keras parity tests run Keras on JAX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def rngs(seed: int = 0) -> dict[str, jax.Array]:
    """Init rngs for params and dropout."""
    key = jax.random.key(seed)
    return {"params": key, "dropout": jax.random.fold_in(key, 1)}


def init_variables(model, input_shape, batch: int = 2, seed: int = 0):
    """Real, jit-compiled initialisation of `model` on a zero batch of `input_shape`."""
    x = jnp.zeros((batch, *input_shape), jnp.float32)
    return jax.jit(model.init)(rngs(seed), x)


def cheap_variables(model, input_shape, seed: int = 0):
    """Variables with the shapes `model.init` would give, filled cheaply with NumPy.

    Tracing `init` under `jax.eval_shape` builds every layer without compiling it, which keeps
    shape tests of 150-layer nets fast. BatchNorm statistics are mean 0, variance 1.
    """
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    shapes = jax.eval_shape(model.init, rngs(seed), x)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "'var'" in name or "'scale'" in name:
            return jnp.ones(s.shape, s.dtype)
        if "'mean'" in name or "'bias'" in name:
            return jnp.zeros(s.shape, s.dtype)
        fan_in = int(np.prod(s.shape[:-1])) or 1
        return jnp.asarray(rng.normal(0, (1.0 / fan_in) ** 0.5, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def param_count(tree) -> int:
    """Number of scalars in a pytree of arrays or shape structs."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# --- parallel runs in fresh processes (tests/parallel_worker.py) ----------------------------

WORKER = os.path.join(ROOT, "tests", "parallel_worker.py")


def run_worker(tmp_path, devices: int, strategies: list[str], sync_bn: bool,
               ops_bn: bool = False) -> dict:
    out = tmp_path / f"{devices}_{'_'.join(strategies)}_{sync_bn}_{ops_bn}.npz"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, WORKER, str(out), *strategies] + (["--sync-bn"] if sync_bn else [])
    cmd += ["--ops-bn"] if ops_bn else []
    subprocess.run(cmd, env=env, check=True, cwd=ROOT, timeout=600)
    data = dict(np.load(out))
    assert int(data.pop("device_count")) == devices
    return data


def by_strategy(data: dict, strategy: str) -> dict:
    return {k[len(strategy):]: v for k, v in data.items() if k.startswith(strategy + "[")}


def assert_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        scale = max(np.max(np.abs(a[key])), 1e-6)
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=rtol * scale, err_msg=key)
