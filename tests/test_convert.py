"""Weights converted from torchvision and Keras give the source framework's numbers: logits
and every block's output agree within 1e-4 relative with the real model code, in eval mode,
with random weights and randomised BatchNorm statistics."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.convert import ConversionError
from resnet_jax.convert import torchvision as tv_convert
from resnet_jax.models import get_model
from resnet_jax.convert.torchvision import torchvision_models

TOL = 1e-4


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def randomized_batch_norm(model):
    """`model` in eval mode with every BatchNorm's statistics and affine parameters drawn far
    from (0, 1), so that a mix-up of mean and variance or of scale and bias shows."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    return model.eval()


def randomized_torch_model(name: str, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    models = torchvision_models()
    return randomized_batch_norm(getattr(models, "alexnet" if name == "alexnet_owt" else name)())


def torch_outputs(model, x_nhwc: np.ndarray, names: list[str]) -> tuple[np.ndarray, dict]:
    """Logits and the outputs of the named submodules (NHWC), through forward hooks."""
    import torch

    captured = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(
        lambda m, i, o, n=n: captured.__setitem__(n, o.detach().clone().numpy()))
        for n in names]  # clone: torchvision applies ReLU in place after the hook
    with torch.no_grad():
        logits = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()
    for h in hooks:
        h.remove()
    return logits, {n: (v.transpose(0, 2, 3, 1) if v.ndim == 4 else v) for n, v in captured.items()}


def flax_outputs(model_name: str, variables, x: np.ndarray, names: list[str]):
    model = get_model(model_name, num_classes=1000)
    logits, state = model.apply(variables, jnp.asarray(x), train=False,
                                capture_intermediates=lambda mdl, _: mdl.name in names,
                                mutable=["intermediates"])
    inter = state["intermediates"]
    return np.asarray(logits), {n: np.asarray(inter[n]["__call__"][0]) for n in names}


def resnet_pairs(model_name: str) -> list[tuple[str, str]]:
    """(our module, torchvision module) for the stem BN and every residual block."""
    model = get_model(model_name)
    pairs = [("bn1", "bn1")]
    for i, blocks in enumerate(model.stage_sizes):
        pairs += [(f"layer{i + 1}_{j}", f"layer{i + 1}.{j}") for j in range(blocks)]
    return pairs


CASES = [("resnet18", 224), ("alexnet_owt", 224),
         pytest.param("resnet50", 160, marks=pytest.mark.slow),
         pytest.param("resnet152", 128, marks=pytest.mark.slow)]


@pytest.mark.torch
@pytest.mark.parametrize("model_name,size", CASES)
def test_torchvision_weights_give_torchvisions_logits_and_block_outputs(model_name, size):
    torch_model = randomized_torch_model(model_name)
    state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    variables = tv_convert.convert(state_dict, model_name)
    x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    if model_name == "alexnet_owt":
        pairs = [(f"conv{i + 1}", f"features.{k}") for i, k in enumerate((0, 3, 6, 8, 10))]
    else:
        pairs = resnet_pairs(model_name)
    ours_logits, ours = flax_outputs(model_name, variables, x, [p[0] for p in pairs])
    theirs_logits, theirs = torch_outputs(torch_model, x, [p[1] for p in pairs])
    # stage by stage first, so that a mismatch names the block where it starts
    for mine, its in pairs:
        assert rel_err(ours[mine], theirs[its]) < TOL, f"{mine} vs torchvision {its}"
    assert rel_err(ours_logits, theirs_logits) < TOL
    print(f"{model_name}: logits {rel_err(ours_logits, theirs_logits):.2e}, worst block "
          f"{max(rel_err(ours[a], theirs[b]) for a, b in pairs):.2e}")


@pytest.mark.torch
def test_conversion_errors_name_the_tensor():
    torch_model = randomized_torch_model("resnet18")
    state_dict = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    missing = dict(state_dict)
    del missing["layer3.1.bn2.running_var"]
    with pytest.raises(ConversionError, match=r"state_dict lacks 'layer3.1.bn2.running_var'"):
        tv_convert.convert(missing, "resnet18")
    extra = dict(state_dict, **{"layer5.0.conv1.weight": np.zeros((3, 3, 1, 1), np.float32)})
    with pytest.raises(ConversionError, match=r"has 'layer5.0.conv1.weight', which the model "
                       r"has no place for"):
        tv_convert.convert(extra, "resnet18")
    wrong = dict(state_dict, **{"layer2.0.conv1.weight": np.zeros((128, 64, 5, 5), np.float32)})
    with pytest.raises(ConversionError, match=r"\['layer2.0.conv1.weight'\] has shape "
                       r"\(128, 64, 5, 5\).*needs \(3, 3, 64, 128\)"):
        tv_convert.convert(wrong, "resnet18")
    with pytest.raises(ConversionError, match=r"lacks 'layer1.2.bn1.bias' \(and 79 more\)"):
        tv_convert.convert(state_dict, "resnet34")  # a resnet18 state_dict for a resnet34
    with pytest.raises(ValueError, match=r"model_name='resnet19'"):
        tv_convert.convert(state_dict, "resnet19")


# --- Keras --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras_resnet50():
    """keras.applications.ResNet50 (JAX backend), random weights, randomised BN statistics."""
    import keras

    assert keras.backend.backend() == "jax"
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, classifier_activation=None)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = (np.asarray(w) for w in layer.get_weights())
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.2, beta.shape),
                               rng.normal(0, 0.2, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
        elif isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape)])  # not all zeros
    return model


def keras_files(model, directory) -> dict[str, str]:
    """The model's weights in both formats: Keras 3 `.weights.h5` and the legacy HDF5 layout
    of the files keras.applications downloads (written by Keras' own legacy writer)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    keras3 = os.path.join(directory, "resnet50.weights.h5")
    model.save_weights(keras3)
    legacy = os.path.join(directory, "resnet50_legacy.h5")
    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return {"keras3": keras3, "legacy": legacy}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["legacy", "keras3"])
def test_keras_weights_give_keras_logits_and_block_outputs(keras_resnet50, tmp_path, fmt):
    import keras

    from resnet_jax.convert import files
    from resnet_jax.convert import keras as keras_convert

    path = keras_files(keras_resnet50, str(tmp_path))[fmt]
    weights = files.read_keras_h5(path)
    if fmt == "legacy":
        assert "conv2_block1_0_conv" in weights
    else:
        assert "conv2d_52" in weights
    variables = keras_convert.convert(weights, "keras_resnet50")
    blocks = [(f"layer{s + 1}_{b}", f"conv{s + 2}_block{b + 1}_out")
              for s, n in enumerate(keras_convert.STAGES) for b in range(n)]
    pairs = [("bn1", "conv1_bn")] + blocks
    probe = keras.Model(keras_resnet50.input,
                        [keras_resnet50.output] + [keras_resnet50.get_layer(k).output
                                                   for _, k in pairs])
    x = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    theirs = [np.asarray(o) for o in probe(x, training=False)]
    ours_logits, ours = flax_outputs("keras_resnet50", variables, x, [p[0] for p in pairs])
    errors = []
    for (mine, its), their in zip(pairs, theirs[1:]):
        errors.append(rel_err(ours[mine], their))
        assert errors[-1] < TOL, f"{mine} vs Keras {its}"
    assert rel_err(ours_logits, theirs[0]) < TOL
    print(f"{fmt}: logits {rel_err(ours_logits, theirs[0]):.2e}, worst block {max(errors):.2e}")


def test_keras_conversion_errors_name_the_layer(keras_resnet50, tmp_path):
    from resnet_jax.convert import files
    from resnet_jax.convert import keras as keras_convert

    weights = files.read_keras_h5(keras_files(keras_resnet50, str(tmp_path))["legacy"])
    broken = dict(weights)
    del broken["conv4_block3_2_bn"]
    with pytest.raises(ConversionError, match=r"weights lack.*'conv4_block3_2_bn\[0\]'"):
        keras_convert.convert(broken, "keras_resnet50")
    wrong = dict(weights, conv1_conv=[np.zeros((3, 3, 3, 64), np.float32), weights["conv1_conv"][1]])
    with pytest.raises(ConversionError, match=r"weights\['conv1_conv\[0\]'\] has shape \(3, 3, 3, "
                       r"64\).*needs \(7, 7, 3, 64\)"):
        keras_convert.convert(wrong, "keras_resnet50")


def test_the_zoo_expresses_keras_resnet50():
    from resnet_jax.models import get_spec

    import keras

    spec = get_spec("keras_resnet50")
    assert spec.fields["stride_on"] == "1x1" and spec.fields["conv_bias"]
    assert spec.fields["bn_epsilon"] == 1.001e-5
    from resnet_jax.convert.common import expected_variables

    ours = sum(int(np.prod(x.shape)) for x in
               jax.tree.leaves(expected_variables("keras_resnet50", 1000)["params"]))
    theirs = keras.applications.ResNet50(weights=None).count_params()
    bn_stats = 2 * sum(int(np.prod(x.shape)) for x in
                       jax.tree.leaves(expected_variables("keras_resnet50", 1000)["batch_stats"]))
    # Keras counts the BatchNorm moving statistics as parameters
    assert ours + bn_stats // 2 == theirs == 25_636_712


def test_the_cli_converts_a_keras_file(keras_resnet50, tmp_path):
    from experiments import convert_weights
    from resnet_jax.convert import files
    from resnet_jax.convert import keras as keras_convert
    from resnet_jax.training.transfer import load_pretrained

    path = keras_files(keras_resnet50, str(tmp_path))["legacy"]
    out = str(tmp_path / "converted")
    assert convert_weights.main(["--source", "keras", "--model", "keras_resnet50", "--input", path,
                                 "--output", out]) == 0
    expected = keras_convert.convert(files.read_keras_h5(path), "keras_resnet50")
    loaded = load_pretrained(out)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
