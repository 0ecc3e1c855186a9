"""A train step written outside the library with `ops.cpu.layers()` and
`ops.cpu.jit_options()` compiles to the oneDNN calls (the benchmark that compares it with the
engine's step: tests/test_readme.py::test_against_user)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

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
