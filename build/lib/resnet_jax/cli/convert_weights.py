"""Convert published (or your own) torchvision / Keras / timm weights into a resnet_jax
checkpoint.

    python -m experiments.convert_weights --from torchvision --model resnet50 \
        --input resnet50-0676ba61.pth --output weights/resnet50_v1
    python -m experiments.convert_weights --from timm --input hf-hub:timm/resnet50.a1_in1k \
        --output weights/resnet50_a1
    python -m experiments.convert_weights --source keras --model keras_resnet50 \
        --input resnet50_weights_tf_dim_ordering_tf_kernels.h5 --output weights/keras_resnet50

Inputs: `.pth`/`.pt` (needs torch), `.npz`, `.safetensors` (torchvision names), `.h5` (Keras:
the legacy file keras.applications downloads, or a Keras 3 `.weights.h5`); timm: a directory
with model.safetensors + config.json, or `hf-hub:ORG/NAME` from the local Hugging Face cache
(never downloaded; `--model` is read from config.json). A file named as a
published one must have its published hash (torchvision: SHA-256 prefix; Keras: MD5);
`conversion.json` records the file's SHA-256, the registry entry (preprocessing, parameter
count, published top-1) and the parameter count of the result. Train from it with
`--config.init_from=OUTPUT`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np


def convert_file(source: str, model: str, path: str) -> tuple[dict, dict]:
    from resnet_jax.convert import files
    from resnet_jax.convert import keras as keras_convert
    from resnet_jax.convert import torchvision as tv_convert

    if source == "timm":
        from resnet_jax.convert import timm as timm_convert

        variables, info = timm_convert.load(path)
        if model and model != info["model"]:
            raise ValueError(f"{path} holds {info['model']} weights, not {model}")
        params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(variables["params"]))
        weights = os.path.join(info["directory"], timm_convert.WEIGHTS_FILE)
        return variables, {**info, "params": params, "published": None,
                           "sha256": files.sha256(weights)}
    known = files.identify(path) if os.path.isfile(path) else None
    if known is not None and known[1]["source"] != source:
        raise ValueError(f"{path} is a published {known[1]['source']} file, not {source}")
    if known is not None and known[1]["model"] != model:
        raise ValueError(f"{path} holds {known[1]['model']} weights, not {model}")
    if source == "torchvision":
        variables = tv_convert.convert(files.read_state_dict(path), model)
    elif source == "keras":
        if not path.endswith(".h5"):
            raise ValueError(f"{path}: Keras weights are read from .h5 files")
        variables = keras_convert.convert(files.read_keras_h5(path), model)
    else:
        raise ValueError(f"source={source!r}; expected 'torchvision', 'keras' or 'timm'")
    params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(variables["params"]))
    info = {"source": source, "model": model, "input": path, "sha256": files.sha256(path),
            "params": params, "published": known[1] if known else None,
            # what the pipeline applies when a run starts from these weights
            "preprocess": (known[1] if known else {}).get("preprocess",
                                                          files.SOURCE_PREPROCESS[source]),
            "num_classes": int(np.shape(variables["params"][
                "fc8" if model == "alexnet_owt" else "fc"]["bias"])[0])}
    if known and known[1].get("params") and known[1]["source"] == "torchvision" \
            and known[1]["params"] != params:
        raise ValueError(f"{path}: converted {params:,} parameters, published {known[1]['params']:,}")
    return variables, info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", "--source", dest="source", required=True,
                        choices=("torchvision", "keras", "timm"))
    parser.add_argument("--model", default="", help="registry model, e.g. resnet50, "
                        "alexnet_owt, keras_resnet50 (timm: read from config.json)")
    parser.add_argument("--input", required=True, help=".pth, .pt, .npz, .safetensors or .h5; "
                        "timm: a directory or hf-hub:ORG/NAME")
    parser.add_argument("--output", required=True, help="directory for the orbax checkpoint")
    args = parser.parse_args(argv)
    from resnet_jax.convert import ConversionError
    from resnet_jax.training.transfer import save_variables

    if args.source != "timm" and not args.model:
        parser.error(f"--model is required with --from {args.source}")
    try:
        variables, info = convert_file(args.source, args.model, args.input)
    except (ValueError, ConversionError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_variables(variables, args.output, info)
    print(json.dumps({k: info[k] for k in ("model", "params", "num_classes", "sha256")}))
    if info["published"]:
        p = info["published"]
        print(f"published file {p['weights']}: top-1 {p['top1']}%, preprocessing {p['preprocess']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
