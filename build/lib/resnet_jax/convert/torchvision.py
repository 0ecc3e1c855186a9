"""torchvision weights (a `state_dict` as NumPy arrays) for resnet18/34/50/101/152, the wide
ResNets, ResNeXt and `alexnet_owt` (torchvision's `alexnet`), both ways: `convert` reads
them, `export` writes a state_dict that torchvision's model loads with `strict=True`.

Conventions handled: convolution weights OIHW -> HWIO; dense weights (out, in) -> (in, out);
AlexNet's fc6 input flattened in (C, H, W) order by torchvision and in (H, W, C) here;
BatchNorm `running_mean` / `running_var` go to `batch_stats` (mean / var), `weight` / `bias`
to scale / bias, `num_batches_tracked` is dropped. torchvision's BatchNorm epsilon is 1e-5
(the zoo's default) and its momentum 0.1 weighs the new batch, which is flax's momentum 0.9
(also the default); neither needs a change.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any, Mapping

import numpy as np

from flax.traverse_util import flatten_dict

from resnet_jax.convert.common import (
    ConversionError,
    Rule,
    assemble,
    disassemble,
    expected_variables,
    identity,
    input_channels,
)

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
           "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")
MODELS = RESNETS + ("alexnet_owt",)
ALEXNET_CONVS = {"conv1": 0, "conv2": 3, "conv3": 6, "conv4": 8, "conv5": 10}
ALEXNET_DENSE = {"fc6": 1, "fc7": 4, "fc8": 6}


def conv_kernel(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))


def conv_kernel_back(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (3, 2, 0, 1))


def dense_kernel(w: np.ndarray) -> np.ndarray:
    return np.transpose(w)


conv_kernel.inverse = conv_kernel_back
dense_kernel.inverse = dense_kernel  # a transpose is its own inverse


def _fc6_kernel(channels: int, size: int):
    def convert(w: np.ndarray) -> np.ndarray:
        out = w.shape[0]
        return (w.reshape(out, channels, size, size).transpose(2, 3, 1, 0)
                .reshape(size * size * channels, out))

    def back(w: np.ndarray) -> np.ndarray:
        out = w.shape[1]
        return (w.reshape(size, size, channels, out).transpose(3, 2, 0, 1)
                .reshape(out, channels * size * size))
    convert.inverse = back
    return convert


def _bn_rules(ours: tuple[str, ...], theirs: str) -> dict[tuple[str, ...], Rule]:
    return {("params", *ours, "scale"): (f"{theirs}.weight", identity),
            ("params", *ours, "bias"): (f"{theirs}.bias", identity),
            ("batch_stats", *ours, "mean"): (f"{theirs}.running_mean", identity),
            ("batch_stats", *ours, "var"): (f"{theirs}.running_var", identity)}


def torchvision_name(path: tuple[str, ...]) -> str:
    """torchvision's prefix for a ResNet module path of this zoo (conv/bn names)."""
    head, *rest = path
    if head.startswith("layer"):
        stage, block = head[len("layer"):].split("_")
        name = f"layer{stage}.{block}"
        module = rest[0]
        if module == "downsample_conv":
            return f"{name}.downsample.0"
        if module == "downsample_bn":
            return f"{name}.downsample.1"
        return f"{name}.{module}"
    return head


def resnet_rules(expected: Mapping, name_of=torchvision_name) -> dict[tuple[str, ...], Rule]:
    """(source name, transform) of every leaf of a ResNet's variables; `name_of` gives the
    source's module name for a module path of this zoo."""
    rules: dict[tuple[str, ...], Rule] = {}
    for path in flatten_dict(expected):
        collection, *module, leaf = path
        if module == ["fc"]:
            rules[path] = ("fc.weight", dense_kernel) if leaf == "kernel" else ("fc.bias", identity)
            continue
        name = name_of(tuple(module))
        if leaf == "kernel":
            rules[path] = (f"{name}.weight", conv_kernel)
        else:
            rules.update(_bn_rules(tuple(module), name))
    return rules


def alexnet_rules(expected: Mapping) -> dict[tuple[str, ...], Rule]:
    fc6_in = expected["params"]["fc6"]["kernel"].shape[0]
    channels = expected["params"]["conv5"]["kernel"].shape[-1]
    size = int(round((fc6_in / channels) ** 0.5))
    rules: dict[tuple[str, ...], Rule] = {}
    for name, index in ALEXNET_CONVS.items():
        rules[("params", name, "kernel")] = (f"features.{index}.weight", conv_kernel)
        rules[("params", name, "bias")] = (f"features.{index}.bias", identity)
    for name, index in ALEXNET_DENSE.items():
        kernel = _fc6_kernel(channels, size) if name == "fc6" else dense_kernel
        rules[("params", name, "kernel")] = (f"classifier.{index}.weight", kernel)
        rules[("params", name, "bias")] = (f"classifier.{index}.bias", identity)
    return rules


def num_classes_of(state_dict: Mapping[str, np.ndarray], model_name: str) -> int:
    key = "classifier.6.bias" if model_name == "alexnet_owt" else "fc.bias"
    if key not in state_dict:
        raise ConversionError(f"state_dict lacks {key!r}")
    return int(np.shape(state_dict[key])[0])


def convert(state_dict: Mapping[str, Any], model_name: str) -> dict[str, Any]:
    """{"params", "batch_stats"} of the registry model `model_name` from a torchvision
    state_dict (names -> arrays; torch tensors are accepted and copied to NumPy). The class
    count is read from the classifier's bias."""
    if model_name not in MODELS:
        raise ValueError(f"model_name={model_name!r}; torchvision weights convert to {MODELS}")
    source = {k: _numpy(v) for k, v in state_dict.items()}
    num_classes = num_classes_of(source, model_name)
    expected = expected_variables(model_name, num_classes)
    rules = alexnet_rules(expected) if model_name == "alexnet_owt" else resnet_rules(expected)
    variables = assemble(expected, rules, source,
                         ignore=lambda k: k.endswith("num_batches_tracked"))
    variables.setdefault("batch_stats", {})
    return variables


def export(variables: Mapping[str, Any], model_name: str) -> dict[str, np.ndarray]:
    """The state_dict (names -> NumPy arrays) that torchvision's `model_name` loads with
    `strict=True`: the inverse of `convert`, with BatchNorm's `num_batches_tracked` at 0."""
    if model_name not in MODELS:
        raise ValueError(f"model_name={model_name!r}; torchvision layouts exist for {MODELS}")
    head = "fc8" if model_name == "alexnet_owt" else "fc"
    expected = expected_variables(model_name, int(np.shape(variables["params"][head]["bias"])[0]),
                                  input_channels(variables))
    rules = alexnet_rules(expected) if model_name == "alexnet_owt" else resnet_rules(expected)
    return disassemble(variables, expected, rules)


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def torchvision_models():
    """`torchvision.models` (the model code of the installed torchvision).

    The torchvision wheel on PyPI is built against CUDA torch; beside a CPU-only torch its C
    extension (detection ops) cannot load and the package's `__init__` fails registering those
    ops. The classification models are plain Python, so in that case the package is entered
    without its `__init__`."""
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401 - the whole package when its extension loads
        except (RuntimeError, OSError, ImportError):
            for name in [n for n in sys.modules
                         if n == "torchvision" or n.startswith("torchvision.")]:
                del sys.modules[name]
            spec = importlib.util.find_spec("torchvision")
            if spec is None:
                raise
            package = types.ModuleType("torchvision")
            package.__path__ = list(spec.submodule_search_locations)
            package.__spec__ = spec
            package.__file__ = spec.origin
            sys.modules["torchvision"] = package
    import torchvision.models as models

    return models
