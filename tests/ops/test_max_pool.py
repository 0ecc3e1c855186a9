"""ops.max_pool: the hand-written backward pass against autodiff of nn.max_pool."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from resnet_jax.models import get_model
from resnet_jax.ops import max_pool as max_pool_lib
from resnet_jax.ops.max_pool import max_pool

# (input shape, window, strides, padding): the zoo's pools (AlexNet 3x3/2, the ResNet stem's
# 3x3/2 padded, the MNIST net's 2x2/2), odd sizes, SAME padding, non-square windows.
CASES = [
    ((2, 13, 13, 5), (3, 3), (2, 2), "VALID"),
    ((2, 12, 12, 4), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((3, 8, 8, 6), (2, 2), (2, 2), "VALID"),
    ((2, 7, 9, 3), (2, 2), (2, 2), "VALID"),
    ((2, 9, 7, 3), (3, 3), (2, 2), "SAME"),
    ((2, 10, 11, 3), (2, 3), (1, 2), ((0, 1), (2, 0))),
    ((2, 9, 9, 3), (3, 3), (1, 1), "SAME"),
    ((1, 10, 10, 2), (2, 2), (3, 3), "VALID"),
]


def _tied_inputs(shape, dtype=jnp.float32, seed=0):
    """Values on a coarse grid, so that most windows hold tied maxima."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.round(rng.normal(size=shape) * 2) / 2, dtype)


def _value_and_grad(pool, x, window, strides, padding):
    y = pool(x, window, strides, padding)
    dy = jax.random.normal(jax.random.key(1), y.shape, jnp.float32).astype(x.dtype)
    fn = jax.jit(lambda x: jax.vjp(lambda x_: pool(x_, window, strides, padding), x)[1](dy)[0])
    return y, fn(x)


@pytest.mark.parametrize("shape,window,strides,padding", CASES)
def test_matches_flax_with_ties(shape, window, strides, padding):
    x = _tied_inputs(shape)
    assert len(np.unique(np.asarray(x))) < x.size // 4  # ties are there to be broken
    y_ref, dx_ref = _value_and_grad(nn.max_pool, x, window, strides, padding)
    y, dx = _value_and_grad(max_pool, x, window, strides, padding)
    chex.assert_trees_all_equal(y, y_ref)
    chex.assert_shape(dx, x.shape)
    # Same element gets the same gradient; sums of overlapping windows may round differently.
    chex.assert_trees_all_close(dx, dx_ref, rtol=1e-6, atol=1e-6)
    # Where windows do not overlap every input gets exactly the reference gradient.
    if all(w <= s for w, s in zip(window, strides)):
        chex.assert_trees_all_equal(dx, dx_ref)


def test_first_maximum_in_window_takes_the_gradient():
    # One 2x2 window of equal values: only the top-left element gets the gradient.
    x = jnp.ones((1, 2, 2, 1))
    dx = jax.grad(lambda x: max_pool(x, (2, 2), (2, 2)).sum())(x)
    np.testing.assert_array_equal(np.asarray(dx)[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_bfloat16():
    x = _tied_inputs((2, 11, 11, 4), jnp.bfloat16)
    y_ref, dx_ref = _value_and_grad(nn.max_pool, x, (3, 3), (2, 2), "VALID")
    y, dx = _value_and_grad(max_pool, x, (3, 3), (2, 2), "VALID")
    assert y.dtype == dx.dtype == jnp.bfloat16
    chex.assert_trees_all_equal(y, y_ref)
    chex.assert_trees_all_close(dx.astype(jnp.float32), dx_ref.astype(jnp.float32),
                                rtol=1e-2, atol=1e-2)


def test_uncovered_inputs_go_to_flax(monkeypatch):
    calls = []
    monkeypatch.setattr(max_pool_lib.nn, "max_pool",
                        lambda *a, **k: calls.append(a[0].shape) or nn.pooling.max_pool(*a, **k))
    max_pool(jnp.ones((4, 6, 6, 3), jnp.int32), (2, 2), (2, 2))  # integers
    max_pool(jnp.ones((6, 6, 3)), (2, 2), (2, 2))  # no batch axis
    max_pool(jnp.ones((2, 8, 3)), (2,), (2,))  # 1-D pooling
    assert calls == [(4, 6, 6, 3), (6, 6, 3), (2, 8, 3)]
    calls.clear()
    max_pool(jnp.ones((2, 6, 6, 3)), (2, 2), (2, 2))
    assert calls == []


def test_backward_has_no_select_and_scatter():
    x = jnp.ones((2, 13, 13, 4))
    grad = jax.jit(jax.grad(lambda x: max_pool(x, (3, 3), (2, 2)).sum()))
    hlo = grad.lower(x).as_text()
    assert "select_and_scatter" not in hlo and "reduce_window" not in hlo
    ref = jax.jit(jax.grad(lambda x: nn.max_pool(x, (3, 3), (2, 2)).sum())).lower(x).as_text()
    assert "select_and_scatter" in ref or "reduce_window" in ref


@pytest.mark.parametrize("name", ["alexnet_owt", "mnist_preact_resnet"])
def test_model_gradients_match_with_flax_pool(name):
    shape = (1, 64, 64, 3) if name == "alexnet_owt" else (2, 28, 28, 1)
    kwargs = {"hidden": 64} if name == "alexnet_owt" else {}
    x = _tied_inputs(shape, seed=3)
    ref = get_model(name, num_classes=10, **kwargs)
    ours = ref.clone(pool=max_pool)
    variables = ref.init(jax.random.key(0), x)

    def loss(model, params):
        rest = {k: v for k, v in variables.items() if k != "params"}
        return model.apply({"params": params, **rest}, x).sum()

    g_ref = jax.jit(jax.grad(lambda p: loss(ref, p)))(variables["params"])
    g = jax.jit(jax.grad(lambda p: loss(ours, p)))(variables["params"])
    chex.assert_trees_all_close(g, g_ref, rtol=1e-5, atol=1e-6)
