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
from torch_models import torchvision_models

TOL = 1e-4


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def randomized_torch_model(name: str, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    models = torchvision_models()
    model = getattr(models, "alexnet" if name == "alexnet_owt" else name)()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
    return model.eval()


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
