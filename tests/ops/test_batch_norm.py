"""ops.batch_norm: the hand-written backward pass against autodiff of nn.BatchNorm."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from resnet_jax.models import get_model
from resnet_jax.ops.batch_norm import BatchNorm, batch_norm_train
from conftest import init_variables


def _inputs(shape, dtype=jnp.float32, offset=0.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=shape[-1]) + offset
    return jnp.asarray(x, dtype)


def _loss_fn(module_cls, x, g, **kwargs):
    """Scalar of the layer's output against a fixed cotangent, and its gradients."""
    module = module_cls(use_running_average=False, momentum=0.9, **kwargs)
    variables = module.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(1), p.shape) * 0.3,
                          variables["params"])

    def loss(params, x):
        y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, mutable=["batch_stats"])
        return jnp.sum(y.astype(jnp.float32) * g), (y, updates)

    (_, (y, updates)), grads = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, updates, grads


def _rel_close(a, b, rtol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-30)
    assert np.abs(a - b).max() / scale <= rtol, (np.abs(a - b).max() / scale, rtol)


@pytest.mark.parametrize("shape", [(8, 6, 6, 5), (32, 16), (4, 3, 3, 3, 7)])
@pytest.mark.parametrize("offset", [0.0, 4.0])
def test_matches_flax_float32(shape, offset):
    x = _inputs(shape, offset=offset)
    g = _inputs(shape, seed=1)
    y_ref, stats_ref, (dp_ref, dx_ref) = _loss_fn(nn.BatchNorm, x, g)
    y, stats, (dp, dx) = _loss_fn(BatchNorm, x, g)
    chex.assert_trees_all_close(y, y_ref, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(stats, stats_ref, rtol=1e-6, atol=1e-7)
    _rel_close(dx, dx_ref, 1e-5)
    for name in ("scale", "bias"):
        _rel_close(dp[name], dp_ref[name], 1e-5)


def test_matches_flax_bfloat16_input():
    x = _inputs((16, 4, 4, 8), jnp.bfloat16, offset=1.0)
    g = _inputs((16, 4, 4, 8), seed=2)
    y_ref, _, (dp_ref, dx_ref) = _loss_fn(nn.BatchNorm, x, g, dtype=jnp.bfloat16)
    y, _, (dp, dx) = _loss_fn(BatchNorm, x, g, dtype=jnp.bfloat16)
    assert y.dtype == y_ref.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    chex.assert_trees_all_close(y.astype(jnp.float32), y_ref.astype(jnp.float32), atol=2e-2)
    # dx is rounded to bfloat16 at the end in both; the parameter gradients stay float32
    _rel_close(dx.astype(jnp.float32), dx_ref.astype(jnp.float32), 1e-2)
    _rel_close(dp["scale"], dp_ref["scale"], 1e-4)
    _rel_close(dp["bias"], dp_ref["bias"], 1e-5)


def test_inference_mode_and_variables_are_flax_s():
    x = _inputs((8, 5, 5, 6), offset=2.0)
    ref, ours = nn.BatchNorm(use_running_average=True), BatchNorm(use_running_average=True)
    v_ref, v = ref.init(jax.random.key(0), x), ours.init(jax.random.key(0), x)
    chex.assert_trees_all_equal_structs(v, v_ref)
    stats = {"mean": jnp.arange(6.0), "var": jnp.linspace(0.5, 2.0, 6)}
    variables = {"params": v["params"], "batch_stats": stats}
    chex.assert_trees_all_equal(ours.apply(variables, x), ref.apply(variables, x))


def test_statistics_gradients_and_synchronised_axis():
    """Cotangents on the returned mean/variance, and `axis_name` under a mapped axis (vmap
    with collectives stands in for pmap): the same gradients as autodiff of the reference
    formula on the whole batch at once."""
    x = _inputs((3, 16, 4, 5), offset=1.5)  # 3 "devices" of 16 rows each
    scale, bias = jnp.linspace(0.5, 1.5, 5), jnp.linspace(-1.0, 1.0, 5)
    gy, gm, gv = _inputs((3, 16, 4, 5), seed=3), _inputs((5,), seed=4), _inputs((5,), seed=5)

    def whole_batch(x, scale, bias):
        flat = x.reshape(48, 4, 5)
        mean = flat.mean((0, 1))
        var = jnp.maximum(0.0, (flat * flat).mean((0, 1)) - mean * mean)
        y = (flat - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias
        # every device's loss sees the same (global) statistics
        return jnp.sum(y * gy.reshape(48, 4, 5)) + 3 * (jnp.sum(mean * gm) + jnp.sum(var * gv))

    def per_device(x, gy, scale, bias):
        y, mean, var = batch_norm_train(x, scale, bias, 1e-5, "d", jnp.float32)
        return jnp.sum(y * gy) + jnp.sum(mean * gm) + jnp.sum(var * gv)

    # as in a pmapped train step: each device differentiates its own loss; the parameter
    # gradients are then summed over devices
    ref = jax.jit(jax.grad(whole_batch, argnums=(0, 1, 2)))(x, scale, bias)
    dx, dscale, dbias = jax.jit(jax.vmap(jax.grad(per_device, argnums=(0, 2, 3)),
                                         in_axes=(0, 0, None, None), axis_name="d"))(
        x, gy, scale, bias)
    ours = (dx, dscale.sum(0), dbias.sum(0))
    for a, b in zip(ours, ref):
        _rel_close(a, b, 1e-5)


def test_resnet_train_step_gradients_match():
    """A whole CIFAR ResNet-20 loss: the drop-in gives autodiff's gradients and statistics."""
    x = _inputs((8, 32, 32, 3), seed=6)
    labels = jnp.arange(8) % 10
    models = {name: get_model("cifar_resnet20", num_classes=10, norm=cls)
              for name, cls in (("flax", nn.BatchNorm), ("ours", BatchNorm))}
    variables = init_variables(models["flax"], (32, 32, 3))
    out = {}
    for name, model in models.items():
        def loss(params, model=model):
            logits, updates = model.apply({"params": params,
                                           "batch_stats": variables["batch_stats"]},
                                          x, train=True, mutable=["batch_stats"])
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels]), updates
        out[name] = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    grads, stats = out["ours"]
    grads_ref, stats_ref = out["flax"]
    chex.assert_trees_all_close(stats, stats_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        _rel_close(a, b, 1e-4)


def test_sync_bn_with_the_cpu_batch_norm_matches_one_device_flax_bn(tmp_path):
    """ops.batch_norm's backward pass with statistics synchronised over 4 devices (pmap and
    jit-sharded) trains the same 3 steps as nn.BatchNorm on one device."""
    from conftest import assert_close, by_strategy, run_worker

    ours = run_worker(tmp_path, 4, ["pmap", "sharded"], True, ops_bn=True)
    single = by_strategy(run_worker(tmp_path, 4, ["single"], True), "single")
    for strategy in ("pmap", "sharded"):
        assert_close(by_strategy(ours, strategy), single, rtol=2e-5)
