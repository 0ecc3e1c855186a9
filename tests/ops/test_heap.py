"""ops.heap: XLA:CPU's per-step buffers are reused instead of page-faulted in every step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT

STEP_FAULTS = """
import resource
from resnet_jax.ops import heap
heap.retain_freed_memory()  # as the entry points do, before JAX starts
import jax, jax.numpy as jnp
from resnet_jax.models import get_model
model = get_model("cifar_resnet20", num_classes=10, stage_sizes=(1, 1, 1))
x = jnp.ones((64, 32, 32, 3))
v = jax.jit(model.init)(jax.random.key(0), x)
def loss(p):
    y, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                       mutable=["batch_stats"])
    return y.sum()
step = jax.jit(jax.grad(loss)).lower(v["params"]).compile()
temp_pages = step.memory_analysis().temp_size_in_bytes / resource.getpagesize()
for _ in range(3):
    jax.block_until_ready(step(v["params"]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    jax.block_until_ready(step(v["params"]))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8
print(heap.retain_freed_memory(), temp_pages, faults)
"""


def _faults(setting: str | None) -> tuple[bool, float, float]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    env.pop("RESNET_JAX_HEAP", None)
    if setting is not None:
        env["RESNET_JAX_HEAP"] = setting
    result = subprocess.run([sys.executable, "-c", STEP_FAULTS], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    applied, pages, faults = result.stdout.split()
    return applied == "True", float(pages), float(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_train_step_buffers_are_not_faulted_in_every_step():
    applied, pages, default_faults = _faults("default")
    assert not applied
    # glibc maps a buffer this large afresh on every call: about one fault per page
    assert pages > 8192 and default_faults > 0.5 * pages
    applied, _, retained_faults = _faults(None)  # the default on a CPU host
    assert applied
    assert retained_faults < 0.5 * default_faults, (retained_faults, default_faults)


def test_a_bad_setting_is_named(monkeypatch):
    from resnet_jax.ops import heap

    monkeypatch.setenv(heap.ENV, "sometimes")
    monkeypatch.setitem(heap._state, "applied", None)
    with pytest.raises(ValueError, match="RESNET_JAX_HEAP='sometimes'.*'retain' or 'default'"):
        heap.retain_freed_memory()


@pytest.mark.parametrize("platforms, expected", [("cpu", True), ("cuda", False),
                                                 ("tpu,cpu", False), ("", True)])
def test_applied_only_where_jax_computes_on_the_cpu(monkeypatch, platforms, expected):
    from resnet_jax.ops import heap

    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    # this environment has no accelerator plugin, so an unset JAX_PLATFORMS means the CPU
    assert heap._jax_computes_on_cpu() is expected
