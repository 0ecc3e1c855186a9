"""Keras weights for `keras_resnet50` (keras.applications.ResNet50: the original v1 with the
stride on the first 1x1 conv, conv biases and BatchNorm epsilon 1.001e-5).

`weights` maps a Keras layer to its arrays in Keras' order (Conv2D: kernel, bias;
BatchNormalization: gamma, beta, moving_mean, moving_variance; Dense: kernel, bias). The
keys are either the layer names of the legacy HDF5 file that `keras.applications` downloads
(`conv2_block1_1_conv`, ...) or the per-class names of a Keras 3 `.weights.h5` file
(`conv2d_3`, `batch_normalization_3`, `dense`), which follow the order of `model.layers`;
`files.read_keras_h5` reads both. Keras kernels are already (H, W, in, out), as here.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from resnet_jax.convert.common import ConversionError, assemble, expected_variables, identity

MODELS = ("keras_resnet50",)
STAGES = (3, 4, 6, 3)
BN_VARS = ("scale", "bias", "mean", "var")  # Keras' order: gamma, beta, moving mean, variance


def layer_names() -> list[str]:
    """Keras' names of ResNet50's weighted layers, in the order of `model.layers`."""
    names = ["conv1_conv", "conv1_bn"]
    for s, blocks in enumerate(STAGES):
        for b in range(1, blocks + 1):
            p = f"conv{s + 2}_block{b}"
            if b == 1:  # the projection shortcut sits after the branch's second conv
                names += [f"{p}_1_conv", f"{p}_1_bn", f"{p}_2_conv", f"{p}_2_bn",
                          f"{p}_0_conv", f"{p}_3_conv", f"{p}_0_bn", f"{p}_3_bn"]
            else:
                names += [f"{p}_{k}_{t}" for k in (1, 2, 3) for t in ("conv", "bn")]
    return names + ["predictions"]


def _by_class(names: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"conv": [], "bn": [], "dense": []}
    for n in names:
        out["dense" if n == "predictions" else n.rsplit("_", 1)[1]].append(n)
    return out


_KERAS3 = re.compile(r"^(conv2d|batch_normalization|dense)(?:_(\d+))?$")


def keras3_to_layer_names(weights: Mapping[str, Sequence[np.ndarray]]) -> dict[str, Any]:
    """Rename a Keras 3 file's per-class keys (conv2d_7) to ResNet50's layer names."""
    groups: dict[str, list[tuple[int, str]]] = {"conv2d": [], "batch_normalization": [],
                                                "dense": []}
    for key in weights:
        m = _KERAS3.match(key)
        if m is None:
            raise ConversionError(f"weights have {key!r}, not a Keras 3 layer key of ResNet50")
        groups[m.group(1)].append((int(m.group(2) or 0), key))
    ours = _by_class(layer_names())
    out = {}
    for cls, kind in (("conv2d", "conv"), ("batch_normalization", "bn"), ("dense", "dense")):
        keys = [k for _, k in sorted(groups[cls])]
        if len(keys) != len(ours[kind]):
            raise ConversionError(f"weights have {len(keys)} {cls} layers; ResNet50 has "
                                  f"{len(ours[kind])}")
        out.update({name: weights[key] for name, key in zip(ours[kind], keys)})
    return out


def _our_module(name: str) -> tuple[str, ...]:
    if name in ("conv1_conv", "conv1_bn"):
        return ("conv1",) if name.endswith("conv") else ("bn1",)
    if name == "predictions":
        return ("fc",)
    m = re.match(r"conv(\d)_block(\d+)_(\d)_(conv|bn)$", name)
    stage, block, k, kind = int(m.group(1)) - 1, int(m.group(2)) - 1, m.group(3), m.group(4)
    module = f"downsample_{kind}" if k == "0" else f"{kind}{k}"
    return (f"layer{stage}_{block}", module)


def convert(weights: Mapping[str, Sequence[Any]], model_name: str = "keras_resnet50"
            ) -> dict[str, Any]:
    """{"params", "batch_stats"} of `keras_resnet50` from Keras ResNet50 weights."""
    if model_name not in MODELS:
        raise ValueError(f"model_name={model_name!r}; Keras weights convert to {MODELS}")
    if weights and all(_KERAS3.match(k) for k in weights):
        weights = keras3_to_layer_names(weights)
    source, rules = {}, {}
    for name, arrays in weights.items():
        for i, array in enumerate(arrays):
            source[f"{name}[{i}]"] = np.asarray(array)
    num_classes = int(np.shape(weights["predictions"][1])[0]) if "predictions" in weights else 1000
    expected = expected_variables(model_name, num_classes)
    for name in layer_names():
        module = _our_module(name)
        if name.endswith("_bn"):
            for i, leaf in enumerate(BN_VARS):
                collection = "batch_stats" if leaf in ("mean", "var") else "params"
                rules[(collection, *module, leaf)] = (f"{name}[{i}]", identity)
        else:
            rules[("params", *module, "kernel")] = (f"{name}[0]", identity)
            rules[("params", *module, "bias")] = (f"{name}[1]", identity)
    return assemble(expected, rules, source, what="weights")
