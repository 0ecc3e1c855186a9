"""Models that leave JAX for serving: ONNX (`to_onnx`, a converter of the evaluation jaxpr
built on the `onnx` package) and StableHLO (`to_stablehlo`, through `jax.export`), each with
a dynamic batch dimension and the input's description written beside it
(`preprocessing.json`). `Run.export(path, format=...)` is the way in."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

FORMATS = ("pytorch", "onnx", "stablehlo")
SERVING = ("onnx", "stablehlo")
MODEL_FILES = {"onnx": "model.onnx", "stablehlo": "model.stablehlo"}
PREPROCESSING_FILE = "preprocessing.json"
CLASS_NAMES_FILE = "class_names.txt"


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; expected one of {FORMATS}")


def write_serving(path: str, format: str, fn: Callable, variables: Any,
                  image_shape: tuple[int, int, int], description: dict[str, Any],
                  class_names: tuple[str, ...]) -> str:
    """Write `path`/model.onnx or model.stablehlo for `fn(variables, images)` (float32 NHWC
    images as `description` says they are made, any batch size), `path`/preprocessing.json
    (`description` with the input and output tensors and the class names) and
    `path`/class_names.txt (one per line, in logit order). Returns the model file."""
    if format not in SERVING:
        raise ValueError(f"format={format!r}; expected one of {SERVING}")
    description = {**description,
                   "input": {"name": "images", "layout": "NHWC", "dtype": "float32",
                             "shape": [None, *map(int, image_shape)]},
                   "output": {"name": "logits", "shape": [None, len(class_names)]},
                   "class_names": list(class_names)}
    os.makedirs(path, exist_ok=True)
    model_file = os.path.join(path, MODEL_FILES[format])
    if format == "onnx":
        from resnet_jax.export.to_onnx import to_onnx

        metadata = {"preprocessing": json.dumps(description)}
        model = to_onnx(fn, variables, image_shape, metadata=metadata)
        data = model.SerializeToString()
    else:
        from resnet_jax.export.to_stablehlo import to_stablehlo

        data = to_stablehlo(lambda images: fn(variables, images), image_shape)
    _write_atomic(model_file, data)
    _write_atomic(os.path.join(path, PREPROCESSING_FILE),
                  (json.dumps(description, indent=2) + "\n").encode())
    _write_atomic(os.path.join(path, CLASS_NAMES_FILE),
                  "".join(f"{name}\n" for name in class_names).encode())
    return model_file


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
