"""A train step written outside the library with `ops.cpu.layers()` and
`ops.cpu.jit_options()`: it compiles to the oneDNN calls, and the benchmark that compares it
with the engine's step writes both, side by side."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import optax
import pytest

from resnet_jax import get_model
from resnet_jax.ops import cpu, dnnl_conv


def test_a_users_step_with_the_cpu_layers_calls_the_kernels():
    model = get_model("cifar_resnet20", **cpu.layers())
    x, y = jnp.zeros((8, 32, 32, 3)), jnp.zeros(8, jnp.int32)
    variables = model.init(jax.random.key(0), x)

    def loss(params):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    hlo = jax.jit(jax.grad(loss), compiler_options=cpu.jit_options("train")).lower(
        variables["params"]).as_text()
    for target in dnnl_conv.TARGETS.values():
        assert target in hlo


@pytest.mark.slow
def test_the_user_step_benchmark_writes_both_sides_and_their_ratio(tmp_path):
    from experiments import benchmark

    assert benchmark.main(["--against", "user", "--models", "cifar_resnet20", "--repeats", "1",
                           "--rounds", "1", "--results-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "user_vs_engine.json").read_text())
    (row,) = data["rows"]
    assert row["user"]["params"] == row["jax"]["params"] == 269_722
    ratio = row["user"]["train_images_per_s"] / row["jax"]["train_images_per_s"]
    assert row["train_ratio"] == pytest.approx(ratio)
    table = (tmp_path / "user_vs_engine.md").read_text()
    assert "| cifar_resnet20 | 128 | 269,722 |" in table and "ratio = user / engine" in table
