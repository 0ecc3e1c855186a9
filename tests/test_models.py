"""Specification of the model zoo."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import cheap_variables, init_variables, param_count, rngs
from resnet_jax.models import get_model, get_spec, list_models
from resnet_jax.models.layers import adaptive_avg_pool, local_response_norm

PAPER_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "alexnet": 60_965_224,
    "alexnet_owt": 61_100_840,
}
DEEP = {"resnet101", "resnet152", "preact_resnet101", "preact_resnet152", "cifar_resnet110",
        "preact_resnet110", "preact_resnet164"}
# The deeper members of timm's families: the same code as their 26/50-layer members (only
# stage sizes differ), traced at their natural size by the parameter-count test
# (tests/test_timm.py, jax.eval_shape of init); 47 s of forward passes at 224 left out here.
SAME_CODE_AS_SHALLOWER = {"resnet101d", "resnet152d", "wide_resnet101_2", "resnext101_32x8d",
                          "resnext101_64x4d"}
OTHER_SHAPE = {(224, 224, 3): (97, 113, 1), (32, 32, 3): (28, 28, 1), (28, 28, 1): (40, 36, 3)}


def count_params(name: str, num_classes: int | None = None, **fields) -> int:
    spec = get_spec(name)
    model = get_model(name, num_classes=num_classes, **fields)
    x = jax.ShapeDtypeStruct((1, *spec.input_shape), jnp.float32)
    return param_count(jax.eval_shape(model.init, rngs(), x)["params"])


@pytest.mark.parametrize("name,expected", sorted(PAPER_COUNTS.items()))
def test_imagenet_models_have_the_published_parameter_count(name, expected):
    assert count_params(name, num_classes=1000) == expected


def test_cifar_resnet20_option_a_has_269_722_parameters():
    assert count_params("cifar_resnet20", num_classes=10) == 269_722


@pytest.mark.parametrize(
    "name,millions", [("cifar_resnet32", 0.46), ("cifar_resnet44", 0.66),
                      ("cifar_resnet56", 0.85), ("cifar_resnet110", 1.7),
                      ("preact_resnet110", 1.7), ("preact_resnet164", 1.7)]
)
def test_cifar_nets_match_the_papers_rounded_sizes(name, millions):
    n = count_params(name, num_classes=10)
    digits = len(str(millions).split(".")[1])
    assert round(n / 1e6, digits) == millions


def test_option_a_shortcut_adds_no_parameters():
    model = get_model("cifar_resnet20")
    shapes = jax.eval_shape(model.init, rngs(), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    assert not any("downsample" in jax.tree_util.keystr(p) for p, _ in flat)
    convs = sum(int(np.prod(l.shape)) for p, l in flat if "kernel" in jax.tree_util.keystr(p))
    option_b = count_params("cifar_resnet20", shortcut="projection")
    # Option B adds two 1x1 projections (16->32, 32->64) and their BatchNorm scale/bias.
    assert option_b - count_params("cifar_resnet20") == 16 * 32 + 32 * 64 + 2 * (32 + 64)
    assert convs + (64 * 10 + 10) < count_params("cifar_resnet20")  # BN params make the rest


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet18.*resnet34"):
        get_model("resnet19")


def test_unknown_field_override_is_named():
    with pytest.raises(ValueError, match="no field.*'widht'"):
        get_model("resnet18", widht=3)


def test_bad_field_value_is_named():
    model = get_model("cifar_resnet20", shortcut="option_c")
    with pytest.raises(ValueError, match="shortcut='option_c'.*projection"):
        model.init(rngs(), jnp.zeros((1, 32, 32, 3)))


def test_list_models_has_every_family():
    names = set(list_models())
    for expected in ["resnet18", "resnet152", "preact_resnet18", "preact_resnet164",
                     "cifar_resnet20", "cifar_resnet110", "mnist_preact_resnet",
                     "fashion_mnist_resnet50", "alexnet", "alexnet_owt"]:
        assert expected in names


def _forward_shapes(name):
    spec = get_spec(name)
    model = get_model(name)
    apply = jax.jit(model.apply)
    for shape in (spec.input_shape, OTHER_SHAPE[spec.input_shape]):
        variables = cheap_variables(model, shape)
        x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, *shape)), jnp.float32)
        logits = apply(variables, x)
        chex.assert_shape(logits, (2, spec.num_classes))
        chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("name", [n for n in list_models()
                                  if n not in DEEP | SAME_CODE_AS_SHALLOWER])
def test_model_gives_logits_on_natural_and_other_input_size(name):
    _forward_shapes(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DEEP))
def test_deep_model_gives_logits_on_natural_and_other_input_size(name):
    _forward_shapes(name)


@pytest.mark.parametrize("name,shape", [("cifar_resnet20", (32, 32, 3)),
                                        ("resnet18", (64, 64, 3)),
                                        ("preact_resnet18", (64, 64, 3))])
def test_train_mode_updates_batch_stats_and_eval_mode_is_deterministic(name, shape):
    model = get_model(name)
    variables = init_variables(model, shape)
    x = jax.random.normal(jax.random.key(1), (4, *shape))
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert all(not np.allclose(a, b) for a, b in zip(before, after))
    out1 = model.apply(variables, x, train=False)
    out2 = model.apply(variables, x, train=False)
    np.testing.assert_array_equal(out1, out2)
    # eval mode has no mutable collections to update: applying it must not need one
    with pytest.raises(Exception):
        model.apply(variables, x, train=True)


def test_dropout_is_active_only_in_train_mode_and_depends_only_on_the_rng():
    model = get_model("alexnet_owt", num_classes=10)
    variables = init_variables(model, (64, 64, 3))
    x = jax.random.uniform(jax.random.key(2), (2, 64, 64, 3))
    apply = jax.jit(model.apply, static_argnames="train")
    eval1 = apply(variables, x, train=False)
    eval2 = apply(variables, x, train=False, rngs={"dropout": jax.random.key(9)})
    np.testing.assert_array_equal(eval1, eval2)
    t1 = apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
    t2 = apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
    t3 = apply(variables, x, train=True, rngs={"dropout": jax.random.key(4)})
    np.testing.assert_array_equal(t1, t2)
    assert not np.allclose(t1, t3)
    assert not np.allclose(t1, eval1)


@pytest.mark.parametrize("name,shape", [
    ("resnet18", (32, 32, 3)), ("resnet50", (32, 32, 3)), ("preact_resnet18", (32, 32, 3)),
    ("preact_resnet50", (32, 32, 3)), ("cifar_resnet20", (32, 32, 3)),
    ("mnist_preact_resnet", (28, 28, 1)), ("alexnet", (67, 67, 3)), ("alexnet_owt", (67, 67, 3)),
])
def test_every_parameter_receives_a_nonzero_gradient(name, shape):
    overrides = {"num_classes": 10}
    if name.startswith("alexnet"):
        overrides["dropout_rate"] = 0.0  # a dropped unit has an exactly zero gradient
    if name == "alexnet":
        overrides["paper_init"] = False  # N(0, 0.01) weights give vanishing ReLU activity
    model = get_model(name, **overrides)
    variables = init_variables(model, shape)
    x = jax.random.normal(jax.random.key(3), (4, *shape))
    y = jnp.arange(4) % 10

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    grads = jax.jit(jax.grad(loss))(variables["params"])
    dead = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_flatten_with_path(grads)[0]
            if not np.any(np.asarray(g) != 0)]
    assert not dead, f"parameters with an all-zero gradient: {dead}"


@pytest.mark.parametrize("name,shape", [("cifar_resnet20", (32, 32, 3)),
                                        ("resnet18", (64, 64, 3)),
                                        ("alexnet", (67, 67, 3))])
def test_bfloat16_compute_is_close_to_float32_and_keeps_float32_params(name, shape):
    f32 = get_model(name, num_classes=10)
    bf16 = get_model(name, num_classes=10, dtype=jnp.bfloat16)
    variables = init_variables(bf16, shape)
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(variables))
    x = jax.random.uniform(jax.random.key(4), (4, *shape))
    a = f32.apply(variables, x)
    b = bf16.apply(variables, x)
    assert b.dtype == jnp.float32  # logits come back in float32
    # bfloat16 keeps 8 bits of mantissa: allow 5% of the logits' scale.
    scale = float(jnp.max(jnp.abs(a)))
    np.testing.assert_allclose(b, a, atol=0.05 * scale, rtol=0)


def lrn_numpy(a, n=5, k=2.0, alpha=1e-4, beta=0.75):
    """The paper's formula, written as a loop over channels."""
    channels = a.shape[-1]
    out = np.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        s = np.sum(a[..., lo:hi + 1] ** 2, axis=-1)
        out[..., i] = a[..., i] / (k + alpha * s) ** beta
    return out


@pytest.mark.parametrize("n", [5, 3, 1])
def test_lrn_matches_the_papers_formula(n):
    a = np.random.default_rng(0).normal(0, 30, (2, 5, 6, 11)).astype(np.float32)
    np.testing.assert_allclose(local_response_norm(jnp.asarray(a), size=n), lrn_numpy(a, n),
                               rtol=1e-5)


def test_alexnet_towers_are_independent_at_conv2():
    model = get_model("alexnet", num_classes=10)
    variables = init_variables(model, (67, 67, 3))
    x = jax.random.uniform(jax.random.key(5), (2, 67, 67, 3))
    seen = {}

    def perturb_first_tower(perturb):
        def interceptor(next_fun, args, kwargs, context):
            if context.module.name == "conv2" and context.method_name == "__call__":
                (h,) = args
                if perturb:
                    h = h.at[..., :48].add(jax.random.normal(jax.random.key(6), h[..., :48].shape))
                out = next_fun(h, **kwargs)
                seen[perturb] = out
                return out
            return next_fun(*args, **kwargs)
        return interceptor

    for perturb in (False, True):
        with nn.intercept_methods(perturb_first_tower(perturb)):
            model.apply(variables, x)
    base, changed = seen[False], seen[True]
    assert base.shape[-1] == 256
    np.testing.assert_array_equal(base[..., 128:], changed[..., 128:])  # other tower: untouched
    assert not np.allclose(base[..., :128], changed[..., :128])  # own tower: changed
    assert variables["params"]["conv2"]["kernel"].shape == (5, 5, 48, 256)
    assert variables["params"]["conv3"]["kernel"].shape == (3, 3, 256, 384)  # sees both towers


def test_alexnet_rejects_too_small_inputs_with_the_minimum():
    model = get_model("alexnet_owt")
    with pytest.raises(ValueError, match="at least 63x63.*32x32"):
        model.init(rngs(), jnp.zeros((1, 32, 32, 3)))


def test_zero_init_residual_zeroes_the_last_bn_gamma_of_each_branch():
    model = get_model("resnet50", zero_init_residual=True)
    shapes = cheap_variables(model, (32, 32, 3))  # shapes only
    real = init_variables(model, (32, 32, 3))
    assert set(real["params"]) == set(shapes["params"])
    for name, block in real["params"].items():
        if name.startswith("layer"):
            assert not np.any(block["bn3"]["scale"]), name
            assert np.all(block["bn2"]["scale"] == 1), name
    default = init_variables(get_model("resnet18"), (32, 32, 3))
    assert np.all(default["params"]["layer1_0"]["bn2"]["scale"] == 1)


@pytest.mark.parametrize("stride_on,conv1_hw", [("3x3", 8), ("1x1", 4)])
def test_stride_on_places_the_stride_of_bottleneck_blocks(stride_on, conv1_hw):
    model = get_model("resnet50", stride_on=stride_on)
    variables = cheap_variables(model, (32, 32, 3))
    _, inter = model.apply(variables, jnp.zeros((1, 32, 32, 3)), capture_intermediates=True)
    block = inter["intermediates"]["layer2_0"]
    assert block["conv1"]["__call__"][0].shape[1] == conv1_hw  # 8x8 map entering stage 2
    assert block["conv2"]["__call__"][0].shape[1] == 4


@pytest.mark.torch
def test_layer_names_follow_torchvision():
    params = cheap_variables(get_model("resnet50"), (32, 32, 3))["params"]
    assert {"conv1", "bn1", "fc", "layer1_0", "layer4_2"} <= set(params)
    assert {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv",
            "downsample_bn"} == set(params["layer1_0"])
    assert "downsample_conv" not in params["layer1_1"]


def test_adaptive_avg_pool_matches_pytorch_bins():
    x = np.arange(2 * 13 * 9 * 3, dtype=np.float32).reshape(2, 13, 9, 3)
    out = np.asarray(adaptive_avg_pool(jnp.asarray(x), (6, 6)))
    for i in range(6):
        for j in range(6):
            h0, h1 = (i * 13) // 6, -(-(i + 1) * 13 // 6)
            w0, w1 = (j * 9) // 6, -(-(j + 1) * 9 // 6)
            np.testing.assert_allclose(out[:, i, j], x[:, h0:h1, w0:w1].mean((1, 2)), rtol=1e-6)


def test_mnist_preact_net_has_the_seeds_layout():
    params = cheap_variables(get_model("mnist_preact_resnet"), (28, 28, 1))["params"]
    assert params["conv1"]["kernel"].shape == (3, 3, 1, 8)
    widths = [params[f"layer{s}_{b}"]["conv2"]["kernel"].shape[-1]
              for s in (1, 2, 3) for b in (0, 1)]
    assert widths == [16, 16, 32, 32, 64, 64]
    assert params["fc_hidden"]["kernel"].shape == (64, 128)
    assert params["fc"]["kernel"].shape == (128, 10)
