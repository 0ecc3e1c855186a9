"""Shared fixtures and helpers for the test suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import traceback

os.environ.setdefault("KERAS_BACKEND", "jax")  # the Keras parity tests run Keras on JAX

# One persistent compilation cache for the whole session: its xdist workers, the training
# processes and notebook kernels they start (which inherit the environment) compile the same
# steps again and again (the main job's ResNet-8 at the suite's batch sizes above all). It is
# new for every session, so a run of the suite costs what it costs on a fresh machine; a
# compiled program is the same whether it was compiled here or read back.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # xdist's workers inherit it
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"resnet_jax_tests_xla_{os.getpid()}"))
# every compile is kept, the small ones too: the main job started a second time took 6.1 s
# with them and 7.0 s with only those over 0.2 s
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The tests check what the programs compute, not how fast they run (the benchmarks do): XLA's
# CPU backend builds the suite's thousands of programs with LLVM's optimization level 0. The
# programs' HLO (fusions, layouts, custom calls) is the same; only the machine code is less
# optimised. On a 2-core family-25 EPYC, tests/test_models.py took 122.5 s with it against
# 162.3 s without, tests/ops/test_cpu_conv.py 57.5 s against 84.4 s; the training-heavy
# tests/test_population.py with test_training.py 196.5 s against 211.2 s. Every process the
# tests start inherits it; a test that sets XLA_FLAGS itself extends these (`xla_flags`).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # xdist's workers inherit it
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), TEST_XLA_FLAGS]))


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a process of the tests with `devices` CPU devices."""
    return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"


# Under xdist, each worker's OpenMP threads (oneDNN's convolutions, PyTorch) get their share of
# the cores and no more: with `-n 2` on 2 cores, two processes of 2 spinning threads each were
# a third slower on the training tests than one thread each. Set before anything loads OpenMP;
# the processes the tests start inherit it.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(
        1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Nothing may fork a process that has imported JAX (its threads do not survive a fork; JAX
# warns "os.fork() was called ... will likely lead to a deadlock", a warning raised inside
# the fork hook, which no warnings filter can make an error): every fork of a test process is
# recorded, and the test during which it happened fails, with where it forked.
_FORKS: list[str] = []
os.register_at_fork(before=lambda: _FORKS.append("".join(traceback.format_stack(limit=12))))


@pytest.fixture(autouse=True)
def _no_fork_of_a_process_with_jax():
    yield
    if _FORKS:
        where = _FORKS[0]
        _FORKS.clear()
        pytest.fail("os.fork() in a test process that has imported JAX (start processes with "
                    f"subprocess and no preexec_fn, or multiprocessing's spawn), from:\n{where}")


# A test that is not marked slow fails if its setup or its body takes longer than this, so
# the suite cannot creep back past CI's budget (pytest.ini prints the slowest tests).
NON_SLOW_LIMIT_S = 60.0


def pytest_collection_modifyitems(config, items):
    """The slow tests first, the others in file order: xdist hands tests out in this order,
    and a long one started last would leave the other worker idle at the end. (Ordering every
    test by its recorded duration was tried: 19 min 45 s against 18 min 28 s, likely because
    it scatters each module's tests, so the module fixtures they share are built on both.)"""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (report.passed and call.when in ("setup", "call") and call.duration > NON_SLOW_LIMIT_S
            and item.get_closest_marker("slow") is None):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid}: its {call.when} took {call.duration:.1f} s, over the "
                           f"{NON_SLOW_LIMIT_S:.0f} s a test not marked slow may take; make it "
                           "smaller or share its work (or mark it slow if a long run is its subject)")


def pytest_sessionfinish(session, exitstatus):
    """The session's compilation cache goes with it."""
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
    # at XLA's default optimization level, where the layouts' agreement bound (1e-5 of each
    # array's largest value) was set: at level 0 the first BatchNorm's means (about 1e-4)
    # differed between 1 and 4 devices by 1.4e-5 of their largest value (sums in another
    # order), and with the means bounded by their layer's deviation instead, one mean of
    # another layer still differed by 1.1e-5 of it
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
