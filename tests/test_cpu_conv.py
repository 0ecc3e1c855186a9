"""The CPU convolution path gives the numbers of lax.conv_general_dilated: outputs and both
gradients, over strides, kernel sizes, paddings, groups and dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_jax.ops import cpu_conv

DN = ("NHWC", "HWIO", "NHWC")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12))


def both(kernel, stride, padding, groups, dtype, cin=8, cout=8, size=15, batch=3):
    kx, kw, kc = jax.random.split(jax.random.key(kernel * 100 + stride * 10 + groups), 3)
    x = jax.random.normal(kx, (batch, size, size, cin), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (kernel, kernel, cin // groups, cout), jnp.float32).astype(dtype)
    probe = None

    def loss(conv):
        def f(x, w):
            y = conv(x, w, (stride, stride), padding, dimension_numbers=DN,
                     feature_group_count=groups)
            nonlocal probe
            if probe is None:
                probe = jax.random.normal(kc, y.shape, jnp.float32).astype(dtype)
            return jnp.sum((y * probe).astype(jnp.float32)), y
        return f

    ref = jax.value_and_grad(loss(lax.conv_general_dilated), argnums=(0, 1), has_aux=True)(x, w)
    new = jax.value_and_grad(loss(cpu_conv.conv_general_dilated), argnums=(0, 1), has_aux=True)(x, w)
    return ref, new


CASES = [(k, s, p) for k in (1, 3, 7, 11) for s in (1, 2) for p in ("SAME", "VALID", "explicit")]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2.0 ** -7)])
@pytest.mark.parametrize("kernel,stride,padding", CASES)
@pytest.mark.parametrize("groups", [1, 2])
def test_outputs_and_gradients_match_lax(kernel, stride, padding, groups, dtype, tol,
                                         monkeypatch):
    monkeypatch.setattr(cpu_conv, "MIN_CHANNEL_PRODUCT", 0)  # always take the im2col path
    pads = ((kernel // 2, kernel - 1 - kernel // 2), (1, 2)) if padding == "explicit" else padding
    ((_, y_ref), (dx_ref, dw_ref)), ((_, y_new), (dx_new, dw_new)) = both(
        kernel, stride, pads, groups, dtype)
    assert y_new.dtype == dtype and dw_new.dtype == dtype
    # bfloat16 keeps 8 significant bits: the two weight gradients, accumulated in different
    # orders, may differ by one unit in the last place; float32 agrees to 1e-5.
    assert rel_err(y_ref, y_new) <= tol
    assert rel_err(dx_ref, dx_new) <= tol
    assert rel_err(dw_ref, dw_new) <= tol


def test_unsupported_layouts_fall_back_to_lax():
    x = jnp.ones((2, 3, 9, 9))  # NCHW
    w = jnp.ones((4, 3, 3, 3))  # OIHW
    a = cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    b = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    np.testing.assert_array_equal(a, b)
    d = cpu_conv.conv_general_dilated(jnp.ones((1, 9, 9, 3)), jnp.ones((3, 3, 3, 4)), (1, 1),
                                      "SAME", rhs_dilation=(2, 2), dimension_numbers=DN)
    e = lax.conv_general_dilated(jnp.ones((1, 9, 9, 3)), jnp.ones((3, 3, 3, 4)), (1, 1), "SAME",
                                 rhs_dilation=(2, 2), dimension_numbers=DN)
    np.testing.assert_array_equal(d, e)


def test_a_model_with_the_cpu_conv_has_the_gradients_of_the_plain_model():
    from resnet_jax.models import get_model

    x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    y = jnp.arange(4)
    plain = get_model("fashion_mnist_resnet8")
    fast = get_model("fashion_mnist_resnet8", conv_general_dilated=cpu_conv.conv_general_dilated)
    variables = plain.init(jax.random.key(1), x)

    def grads(model):
        def loss(p):
            logits, _ = model.apply({**variables, "params": p}, x, train=True,
                                    mutable=["batch_stats"])
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y])
        return jax.grad(loss)(variables["params"])

    for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(fast))):
        assert rel_err(a, b) < 1e-5
