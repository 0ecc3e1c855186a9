"""The CPU convolution paths (oneDNN's, and XLA's with the materialized weight gradient)
give the numbers of lax.conv_general_dilated: outputs and both gradients, over strides,
kernel sizes, paddings, groups and dtypes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_jax.ops import cpu, cpu_conv

DN = ("NHWC", "HWIO", "NHWC")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12))


HOOKS = {"onednn": cpu_conv.conv_general_dilated, "xla": cpu_conv.xla_conv_general_dilated}


def both(kernel, stride, padding, groups, dtype, cin=8, cout=8, size=15, batch=3,
         hook=cpu_conv.conv_general_dilated):
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
    new = jax.jit(jax.value_and_grad(loss(hook), argnums=(0, 1),
                                     has_aux=True),
                  compiler_options=cpu.jit_options("train"))(x, w)
    return ref, new


CASES = [(k, s, p) for k in (1, 3, 7, 11) for s in (1, 2) for p in ("SAME", "VALID", "explicit")]


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2.0 ** -7)])
@pytest.mark.parametrize("kernel,stride,padding", CASES)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_outputs_and_gradients_match_lax(kernel, stride, padding, groups, dtype, tol, hook):
    pads = ((kernel // 2, kernel - 1 - kernel // 2), (1, 2)) if padding == "explicit" else padding
    ((_, y_ref), (dx_ref, dw_ref)), ((_, y_new), (dx_new, dw_new)) = both(
        kernel, stride, pads, groups, dtype, hook=HOOKS[hook])
    assert y_new.dtype == dtype and dw_new.dtype == dtype
    # The two sides accumulate in different orders: one bfloat16 ulp, 1e-5 in float32.
    assert rel_err(y_ref, y_new) <= tol
    assert rel_err(dx_ref, dx_new) <= tol
    assert rel_err(dw_ref, dw_new) <= tol


@pytest.mark.parametrize("size,kernel,stride,padding", [
    (2, 3, 1, "SAME"), (1, 3, 1, "SAME"), (2, 3, 2, "SAME"), (4, 3, 2, "SAME"),
    (3, 7, 2, "SAME"), (2, 3, 1, "explicit"), (5, 5, 1, "VALID"),
])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2.0 ** -7)])
def test_maps_smaller_than_the_kernel_take_the_matmul_and_match_lax(size, kernel, stride, padding,
                                                                    dtype, tol):
    pads = ((1, 1), (0, 2)) if padding == "explicit" else padding
    assert cpu_conv._smaller_than_kernel(
        (3, size, size, 8), (kernel, kernel, 8, 8), (stride, stride),
        lax.padtype_to_pads((size, size), (kernel, kernel), (stride, stride), pads)
        if isinstance(pads, str) else pads)
    ((_, y_ref), (dx_ref, dw_ref)), ((_, y_new), (dx_new, dw_new)) = both(
        kernel, stride, pads, 1, dtype, size=size)
    assert y_new.shape == y_ref.shape and y_new.dtype == dtype
    assert rel_err(y_ref, y_new) <= tol
    assert rel_err(dx_ref, dx_new) <= tol
    assert rel_err(dw_ref, dw_new) <= tol


def test_large_maps_keep_the_lax_convolution():
    assert not cpu_conv._smaller_than_kernel((8, 7, 7, 64), (3, 3, 64, 64), (1, 1),
                                             ((1, 1), (1, 1)))
    assert not cpu_conv._smaller_than_kernel((8, 28, 28, 1), (3, 3, 1, 32), (2, 2),
                                             ((1, 1), (1, 1)))
    assert cpu_conv._smaller_than_kernel((8, 4, 4, 64), (3, 3, 64, 64), (2, 2), ((1, 1), (1, 1)))


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
    fast = get_model("fashion_mnist_resnet8", **cpu.layers())
    variables = plain.init(jax.random.key(1), x)

    def grads(model):
        def loss(p):
            logits, _ = model.apply({**variables, "params": p}, x, train=True,
                                    mutable=["batch_stats"])
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y])
        return jax.grad(loss)(variables["params"])

    for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(fast))):
        assert rel_err(a, b) < 1e-5


def test_materialize_passes_values_and_turns_a_nan_step_into_nans():
    x = jnp.arange(6.0).reshape(2, 3)
    dy = jnp.ones((2, 2))
    a, b = jax.jit(cpu_conv.materialize)(x, dy)
    np.testing.assert_array_equal(a, x)
    np.testing.assert_array_equal(b, dy)
    a, b = jax.jit(cpu_conv.materialize)(x, dy.at[0, 0].set(jnp.nan))
    assert np.isnan(np.asarray(a)).all() and np.isnan(np.asarray(b)).all()


def _conv_lines(compiled_text: str) -> list[str]:
    return [l for l in compiled_text.splitlines() if "convolution(" in l or "__ynn_fusion" in l]


def test_compiler_options_keep_convolutions_out_of_ynnpack():
    """The weight gradient of a 64-channel conv goes to YNNPACK by default on XLA:CPU (17x
    slower there, cpu_speed_log.md); with the train options every convolution is Eigen's
    (where the oneDNN convolutions are not available)."""
    x = jnp.ones((8, 16, 16, 64))
    w = jnp.ones((3, 3, 64, 64))

    def f(x, w):
        return jax.grad(lambda w: jnp.sum(
            cpu_conv.xla_conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)
            ** 2))(w)

    default = jax.jit(f).lower(x, w).compile().as_text()
    tuned = jax.jit(f, compiler_options=cpu.jit_options("train")).lower(x, w).compile()
    tuned = tuned.as_text()
    assert any("__ynn_fusion" in l for l in _conv_lines(default))
    assert not any("__ynn_fusion" in l for l in _conv_lines(tuned))
    assert any("convolution(" in l for l in _conv_lines(tuned))


def test_the_layers_and_options_are_a_drop_in_set_on_the_cpu_only(monkeypatch):
    from flax import linen as nn

    from resnet_jax.ops.batch_norm import BatchNorm
    from resnet_jax.ops.max_pool import max_pool

    layers = cpu.layers()
    assert set(layers) == {"conv", "norm", "pool"}
    assert layers["conv"].func is nn.Conv
    conv = layers["conv"].keywords["conv_general_dilated"]
    assert conv.func is cpu_conv.conv_general_dilated and conv.keywords == {"operands": "float32"}
    with pytest.raises(ValueError, match="conv_dtype='float16'; allowed"):
        cpu.layers("float16")
    assert layers["norm"] is BatchNorm and layers["pool"] is max_pool
    train, evaluate = cpu.jit_options("train"), cpu.jit_options("eval")
    assert "REDUCE" in train["xla_cpu_experimental_ynn_fusion_type"]
    assert "REDUCE" not in evaluate["xla_cpu_experimental_ynn_fusion_type"]
    with pytest.raises(ValueError, match="step='predict'; expected one of"):
        cpu.jit_options("predict")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert cpu.layers() == {} and cpu.jit_options("train") is None


def test_the_engine_takes_them_under_its_switch(monkeypatch):
    from resnet_jax.training import experiment
    from resnet_jax.training.config import base_config, validate_config

    c = base_config()
    c.model = "fashion_mnist_resnet8"

    def conv_operands(c):
        conv = experiment.build_model(c, 10).conv.keywords["conv_general_dilated"]
        assert conv.func is cpu_conv.conv_general_dilated
        return conv.keywords["operands"]

    assert conv_operands(c) == "float32"
    assert experiment.jit_options(c) is cpu.jit_options
    from resnet_jax.ops import dnnl_conv

    monkeypatch.setattr(dnnl_conv, "bf16_native", lambda: True)
    c.cpu_conv_dtype = "bfloat16"
    assert conv_operands(c) == "bfloat16"
    validate_config(c)
    c.cpu_kernels = False  # the setting of the CPU kernels goes with them
    assert experiment.build_model(c, 10).conv is nn_conv() and experiment.jit_options(c) is None
    c.cpu_kernels = True
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert experiment.build_model(c, 10).conv is nn_conv() and experiment.jit_options(c) is None


def test_a_run_written_before_the_switch_was_renamed_still_loads(tmp_path):
    import json

    from resnet_jax.training.config import base_config
    from resnet_jax.training.config_json import run_config

    values = base_config().to_dict()
    del values["cpu_kernels"]
    values["fast_cpu_conv"] = False  # the switch's name before the restructuring
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert run_config(str(tmp_path)).cpu_kernels is False


def nn_conv():
    from flax import linen as nn

    return nn.Conv


def _convs_inside_ynn_fusions(hlo: str) -> int:
    """Convolutions in the bodies of the computations that YNNPACK fusions call."""
    import re

    called = set(re.findall(r"calls=(%[\w.-]+), .*__ynn_fusion", hlo))
    bodies = re.split(r"\n(?=%)", hlo)
    return sum(body.count(" convolution(") for body in bodies
               if body.split(" ", 1)[0] in called)


def test_eval_steps_keep_convolutions_out_of_ynnpack_fusions():
    """With reductions in YNNPACK, the eval step's final pooling pulls the convolutions of
    the last blocks into one YNNPACK fusion (2x slower eval); the eval options prevent it."""
    from resnet_jax.models import get_model
    from resnet_jax.training.state import create_train_state
    from resnet_jax.training.steps import make_eval_step
    import optax

    from flax import linen as nn

    from resnet_jax.training.losses import softmax_cross_entropy

    conv = functools.partial(nn.Conv, conv_general_dilated=cpu_conv.xla_conv_general_dilated)
    model = get_model("mnist_preact_resnet", conv=conv)
    state = create_train_state(model, optax.sgd(0.1), jax.random.key(0), (28, 28, 1))
    batch = {"image": jnp.zeros((32, 28, 28, 1)), "label": jnp.zeros(32, jnp.int32)}
    step = make_eval_step(model, 10, softmax_cross_entropy)

    def hlo(options):
        return jax.jit(step, compiler_options=options).lower(state, batch).compile().as_text()

    assert _convs_inside_ynn_fusions(hlo(cpu.jit_options("train"))) > 0
    assert _convs_inside_ynn_fusions(hlo(cpu.jit_options("eval"))) == 0


def test_bfloat16_convolutions_fall_back_to_float32_without_the_instructions(monkeypatch):
    from resnet_jax.ops import dnnl_conv

    def operands(layers):
        return layers["conv"].keywords["conv_general_dilated"].keywords["operands"]

    monkeypatch.setattr(dnnl_conv, "bf16_native", lambda: False)
    with pytest.warns(UserWarning, match="keeping float32 convolutions"):
        assert operands(cpu.layers("bfloat16")) == "float32"
    monkeypatch.setattr(dnnl_conv, "bf16_native", lambda: True)
    assert operands(cpu.layers("bfloat16")) == "bfloat16"


def test_the_conv_probe_finds_every_convolution_of_a_model():
    from benchmarks.probes.model_conv_probe import conv_shapes

    shapes = dict(conv_shapes("cifar_resnet20"))
    # the 3x3 stem and 9 basic blocks of two 3x3 convolutions; zero-padded shortcuts
    assert sum(shapes.values()) == 19
    assert shapes[((128, 32, 32, 16), (3, 3, 16, 16), (1, 1), ((1, 1), (1, 1)), 1)] == 6
    assert shapes[((128, 32, 32, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1)), 1)] == 1
