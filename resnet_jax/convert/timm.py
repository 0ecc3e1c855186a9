"""timm's ResNets both ways: `convert(state_dict, name)` reads a state_dict in timm's key
layout (NumPy arrays), `export(variables, name)` writes one that timm's model loads with
`strict=True`; `load(path)` reads timm's published form, `model.safetensors` + `config.json`,
from a directory or the local Hugging Face cache (`hf-hub:timm/resnet50.a1_in1k`), with the
weights' own preprocessing from `pretrained_cfg`. No PyTorch is needed, and nothing is ever
downloaded.

timm's `resnet*`, `wide_resnet*` and `resnext*` use torchvision's key names. The deep stem
of its C/D variants is `conv1.0/1/3/4/6` (conv, BN, -, conv, BN, -, conv), and the D
variants' shortcut is `downsample.1/2` (conv, BN) after the parameter-free pool at `.0`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

from resnet_jax.convert.common import (
    ConversionError,
    assemble,
    disassemble,
    expected_variables,
    input_channels,
    to_numpy,
)
from resnet_jax.convert.torchvision import RESNETS as TORCHVISION_RESNETS
from resnet_jax.convert.torchvision import resnet_rules, torchvision_name
from resnet_jax.models import get_spec

DEEP_STEM = ("resnet18d", "resnet26d", "resnet34d", "resnet50d", "resnet101d", "resnet152d",
             "resnet50c")
MODELS = TORCHVISION_RESNETS + DEEP_STEM
STEM_NAMES = {"stem_conv1": "conv1.0", "stem_bn1": "conv1.1", "stem_conv2": "conv1.3",
              "stem_bn2": "conv1.4", "stem_conv3": "conv1.6"}
HUB_PREFIX = "hf-hub:"
WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def timm_name(path: tuple[str, ...], avg_down: bool) -> str:
    """timm's module name for a module path of this zoo's ResNet."""
    if path[0] in STEM_NAMES:
        return STEM_NAMES[path[0]]
    if avg_down and len(path) > 1 and path[1] in ("downsample_conv", "downsample_bn"):
        stage, block = path[0][len("layer"):].split("_")
        return f"layer{stage}.{block}.downsample.{1 if path[1] == 'downsample_conv' else 2}"
    return torchvision_name(path)


def _check(model_name: str) -> None:
    if model_name not in MODELS:
        raise ValueError(f"model_name={model_name!r}; timm layouts exist for {MODELS}")


def _rules(model_name: str, num_classes: int, channels: int = 0):
    expected = expected_variables(model_name, num_classes, channels)
    avg_down = get_spec(model_name).fields.get("shortcut") == "avg_pool"
    return expected, resnet_rules(expected, lambda path: timm_name(path, avg_down))


def convert(state_dict: Mapping[str, Any], model_name: str) -> dict[str, Any]:
    """{"params", "batch_stats"} of the registry model `model_name` (timm's name) from a
    state_dict in timm's layout; the class count is read from `fc.bias`."""
    _check(model_name)
    source = {k: to_numpy(v) for k, v in state_dict.items()}
    if "fc.bias" not in source:
        raise ConversionError("state_dict lacks 'fc.bias'")
    first = source.get("conv1.0.weight", source.get("conv1.weight"))
    channels = int(np.shape(first)[1]) if first is not None else 0
    expected, rules = _rules(model_name, int(np.shape(source["fc.bias"])[0]), channels)
    variables = assemble(expected, rules, source,
                         ignore=lambda k: k.endswith("num_batches_tracked"))
    variables.setdefault("batch_stats", {})
    return variables


def export(variables: Mapping[str, Any], model_name: str) -> dict[str, np.ndarray]:
    """The state_dict (names -> NumPy arrays) that `timm.create_model(model_name)` loads
    with `strict=True`: the inverse of `convert`."""
    _check(model_name)
    num_classes = int(np.shape(variables["params"]["fc"]["bias"])[0])
    expected, rules = _rules(model_name, num_classes, input_channels(variables))
    return disassemble(variables, expected, rules)


def preprocess_of(pretrained_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """This project's preprocessing record of a timm `pretrained_cfg`: evaluation resizes the
    shorter side to floor(crop / crop_pct) with its interpolation and cuts the central crop
    (timm's `resolve_data_config` + `create_transform` at `input_size`); the test sizes are
    kept for evaluation at another resolution."""
    size = int(pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    crop_pct = float(pretrained_cfg.get("crop_pct", 0.875))
    test_size = int(pretrained_cfg.get("test_input_size", (3, size, size))[-1])
    return {"resize": int(math.floor(size / crop_pct)), "crop": size, "crop_pct": crop_pct,
            "interpolation": str(pretrained_cfg.get("interpolation", "bilinear")),
            "mean": tuple(float(v) for v in pretrained_cfg.get("mean", (0.485, 0.456, 0.406))),
            "std": tuple(float(v) for v in pretrained_cfg.get("std", (0.229, 0.224, 0.225))),
            "channel_order": "RGB", "test_crop": test_size,
            "test_crop_pct": float(pretrained_cfg.get("test_crop_pct", crop_pct))}


def _from_hub_cache(path: str) -> str:
    """The snapshot directory of `hf-hub:ORG/NAME[@REVISION]` in the local Hugging Face cache
    (huggingface_hub's lookup, which never downloads; $HF_HUB_CACHE as this process has it
    now, else huggingface_hub's default)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        raise ImportError(f"{path}: reading the Hugging Face cache needs huggingface_hub "
                          "(pip install huggingface_hub, or resnet_jax[convert])") from None
    repo, _, revision = path[len(HUB_PREFIX):].partition("@")
    cache = os.environ.get("HF_HUB_CACHE") or None
    found = [try_to_load_from_cache(repo, name, cache_dir=cache, revision=revision or None)
             for name in (WEIGHTS_FILE, CONFIG_FILE)]
    if not all(isinstance(f, str) for f in found):
        raise FileNotFoundError(
            f"{path} is not in the local Hugging Face cache"
            f"{f' ({cache})' if cache else ''}: runs never download. Fetch it once with "
            f"`hf download {repo} {WEIGHTS_FILE} {CONFIG_FILE}` (`huggingface-cli download` on "
            "older huggingface_hub), or point HF_HUB_CACHE at a cache that holds it")
    return os.path.dirname(found[0])


def resolve(path: str) -> str:
    """The directory holding model.safetensors + config.json: `path` itself, or for
    `hf-hub:ORG/NAME[@REVISION]` its snapshot in the local cache. A FileNotFoundError naming
    the download command when it is not there: runs never download."""
    if path.startswith(HUB_PREFIX):
        return _from_hub_cache(path)
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"{path}: no {' or '.join(missing)}; a timm checkpoint is a "
                                f"directory with {WEIGHTS_FILE} and {CONFIG_FILE}")
    return path


def is_timm_checkpoint(path: str) -> bool:
    """Whether `path` names timm weights (hf-hub:... or a directory of model.safetensors +
    config.json)."""
    return path.startswith(HUB_PREFIX) or (
        os.path.isfile(os.path.join(path, WEIGHTS_FILE))
        and os.path.isfile(os.path.join(path, CONFIG_FILE)))


def read_config(path: str) -> dict[str, Any]:
    """config.json of the timm checkpoint at `path` (resolved as `resolve`)."""
    with open(os.path.join(resolve(path), CONFIG_FILE)) as f:
        return json.load(f)


def load(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(variables, info) of the timm checkpoint at `path` (a directory or `hf-hub:...`):
    the architecture named by config.json, its weights read with safetensors' NumPy API,
    and info's "preprocess" from its `pretrained_cfg`."""
    from safetensors.numpy import load_file

    directory = resolve(path)
    config = read_config(directory)
    model = config.get("architecture", "")
    if model not in MODELS:
        raise ValueError(f"{path}: architecture {model!r} is not one of timm's ResNets this "
                         f"zoo holds: {MODELS}")
    variables = convert(load_file(os.path.join(directory, WEIGHTS_FILE)), model)
    pretrained_cfg = config.get("pretrained_cfg", {})
    info = {"source": "timm", "model": model, "input": path, "directory": directory,
            "num_classes": int(np.shape(variables["params"]["fc"]["bias"])[0]),
            "preprocess": preprocess_of(pretrained_cfg), "pretrained_cfg": pretrained_cfg}
    return variables, info


def export_config(model_name: str, variables: Mapping[str, Any],
                  preprocess: Mapping[str, Any]) -> dict:
    """config.json as timm writes it beside model.safetensors (architecture, class count,
    pretrained_cfg with the preprocessing the weights were trained with: mean/std on the
    [0, 1] scale, the evaluation crop, its share of the shorter side and the resize
    filter)."""
    if preprocess.get("channel_order", "RGB") != "RGB":
        raise ValueError(f"channel_order={preprocess['channel_order']!r}: timm's "
                         "pretrained_cfg describes RGB input only")
    crop = int(preprocess.get("crop", 224))
    params = variables["params"]
    head = params["fc8" if "fc8" in params else "fc"]["kernel"]
    num_classes = int(np.shape(head)[1])
    channels = input_channels(variables)
    return {
        "architecture": model_name, "num_classes": num_classes, "in_chans": channels,
        "num_features": int(np.shape(head)[0]),
        "global_pool": "avg",
        "pretrained_cfg": {
            "architecture": model_name, "num_classes": num_classes,
            "input_size": [channels, crop, crop], "fixed_input_size": False,
            "interpolation": preprocess.get("interpolation", "bilinear"),
            "crop_pct": float(preprocess.get("crop_pct", crop / preprocess.get("resize", 256))),
            "crop_mode": "center",
            "mean": list(preprocess["mean"]), "std": list(preprocess["std"]),
            "first_conv": "conv1.0" if model_name in DEEP_STEM else "conv1",
            "classifier": "fc"},
    }
