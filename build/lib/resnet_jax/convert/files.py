"""Reading weight files, and the registry of published ones.

`read_state_dict(path)`: `.pth`/`.pt` (through torch), `.npz`, `.safetensors` -> {name: array}.
`read_keras_h5(path)`: the legacy Keras HDF5 weight file (`keras.applications`' download,
also the `model_weights` group of a whole-model `.h5`) or a Keras 3 `.weights.h5`
-> {layer: [arrays in Keras' order]}.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np


# How the weights' training input was made: resize the shorter side, centre crop, then
# (x / 255 - mean) / std per channel, in `channel_order`. Keras' 'caffe' mode (BGR, minus
# the ImageNet means on the 0-255 scale, no scaling) is that with std = 1/255.
TORCHVISION_PREPROCESS = {"resize": 256, "crop": 224, "mean": (0.485, 0.456, 0.406),
                          "std": (0.229, 0.224, 0.225), "channel_order": "RGB"}
KERAS_CAFFE_PREPROCESS = {"resize": 256, "crop": 224,
                          "mean": (103.939 / 255, 116.779 / 255, 123.68 / 255),
                          "std": (1 / 255, 1 / 255, 1 / 255), "channel_order": "BGR"}
SOURCE_PREPROCESS = {"torchvision": TORCHVISION_PREPROCESS, "keras": KERAS_CAFFE_PREPROCESS}

# Published weight files: SHA-256 of the file, the zoo model, preprocessing, parameter count
# and the published ImageNet top-1 (single 224 crop). Sources: torchvision's model docs
# (weights enums, "acc@1") and keras.applications (file hash in resnet.py; top-1 from the
# Keras applications table).
KNOWN_FILES: dict[str, dict[str, Any]] = {
    "resnet18-f37072fd.pth": {
        "source": "torchvision", "model": "resnet18", "weights": "ResNet18_Weights.IMAGENET1K_V1",
        "sha256_prefix": "f37072fd", "params": 11_689_512, "top1": 69.758,
        "preprocess": TORCHVISION_PREPROCESS,
    },
    "resnet34-b627a593.pth": {
        "source": "torchvision", "model": "resnet34", "weights": "ResNet34_Weights.IMAGENET1K_V1",
        "sha256_prefix": "b627a593", "params": 21_797_672, "top1": 73.314,
        "preprocess": TORCHVISION_PREPROCESS,
    },
    "resnet50-0676ba61.pth": {
        "source": "torchvision", "model": "resnet50", "weights": "ResNet50_Weights.IMAGENET1K_V1",
        "sha256_prefix": "0676ba61", "params": 25_557_032, "top1": 76.130,
        "preprocess": TORCHVISION_PREPROCESS,
    },
    "resnet50-11ad3fa6.pth": {
        "source": "torchvision", "model": "resnet50", "weights": "ResNet50_Weights.IMAGENET1K_V2",
        "sha256_prefix": "11ad3fa6", "params": 25_557_032, "top1": 80.858,
        "preprocess": dict(TORCHVISION_PREPROCESS, resize=232),
    },
    "alexnet-owt-7be5be79.pth": {
        "source": "torchvision", "model": "alexnet_owt", "weights": "AlexNet_Weights.IMAGENET1K_V1",
        "sha256_prefix": "7be5be79", "params": 61_100_840, "top1": 56.522,
        "preprocess": TORCHVISION_PREPROCESS,
    },
    "resnet50_weights_tf_dim_ordering_tf_kernels.h5": {
        "source": "keras", "model": "keras_resnet50", "weights": "keras.applications.ResNet50",
        "md5": "2cb95161c43110f7111970584f804107", "params": 25_636_712, "top1": 74.9,
        "preprocess": KERAS_CAFFE_PREPROCESS,
    },
}


def file_digest(path: str, algorithm: str) -> str:
    """Hex digest of a file (`algorithm` as hashlib names it)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def sha256(path: str) -> str:
    return file_digest(path, "sha256")


def md5(path: str) -> str:
    return file_digest(path, "md5")


def identify(path: str) -> tuple[str, dict[str, Any]] | None:
    """(registry key, entry) when the file's name is a published file's; raises a ValueError
    if its hash differs from the published one. None for files not in the registry."""
    entry = KNOWN_FILES.get(os.path.basename(path))
    if entry is None:
        return None
    if "sha256_prefix" in entry:
        digest = sha256(path)
        if not digest.startswith(entry["sha256_prefix"]):
            raise ValueError(f"{path}: SHA-256 {digest[:16]}... is not the published "
                             f"{entry['sha256_prefix']}...; the download is damaged or another file")
    else:
        digest = md5(path)
        if digest != entry["md5"]:
            raise ValueError(f"{path}: MD5 {digest} is not the published {entry['md5']}")
    return os.path.basename(path), entry


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    if path.endswith((".pth", ".pt")):
        try:
            import torch
        except ImportError as err:
            raise ImportError(f"reading {path} needs torch (pip install -r "
                              "requirements-bench.txt), or save it as .npz/.safetensors") from err
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        return {k: v.detach().cpu().numpy() for k, v in state.items()}
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return dict(load_file(path))
    raise ValueError(f"{path}: expected .pth, .pt, .npz or .safetensors")


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_keras_h5(path: str) -> dict[str, list[np.ndarray]]:
    import h5py

    with h5py.File(path, "r") as f:
        if "layers" in f and "layer_names" not in f.attrs:  # Keras 3 .weights.h5
            out = {}
            for name, group in f["layers"].items():
                if "vars" in group and len(group["vars"]):
                    out[name] = [np.asarray(group["vars"][str(i)])
                                 for i in range(len(group["vars"]))]
            return out
        root = f["model_weights"] if "model_weights" in f else f
        out = {}
        for name in _names(root.attrs["layer_names"]):
            group = root[name]
            weight_names = _names(group.attrs.get("weight_names", []))
            if weight_names:
                out[name] = [np.asarray(group[w]) for w in weight_names]
        return out
