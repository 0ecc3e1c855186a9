"""Transfer learning: start from converted or trained weights, optionally train only the head.

`load_pretrained(directory)` reads `{"params", "batch_stats"}` from the output of
`experiments.convert_weights`, from a training run's workdir (its best checkpoint, else its
latest), or from timm's published form (a directory of model.safetensors + config.json, or
`hf-hub:timm/NAME` in the local Hugging Face cache, converted as it is read). `merge_pretrained` puts them into a freshly initialised model: the head (`fc`,
`fc_hidden`, AlexNet's `fc8`) keeps its fresh initialisation when the pretrained one is
absent or has another shape (another class count); any other difference is an error naming
the tensor. `freeze_backbone(tx)` makes the optimizer update the head only.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import numpy as np
import optax
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict
from resnet_jax.training import rundir

log = logging.getLogger("resnet_jax")

HEAD_MODULES = ("fc", "fc_hidden", "fc8")
FREEZE_CHOICES = ("", "backbone")
VARIABLES_DIR = "variables"  # orbax checkpoint of {"params", "batch_stats"} in a converted dir


def is_head(path: tuple[str, ...]) -> bool:
    return bool(path) and path[0] in HEAD_MODULES


def head_labels(params: Mapping) -> Any:
    """"head" / "backbone" for every leaf of `params` (same structure)."""
    def label(tree, prefix=()):
        return {k: (label(v, prefix + (k,)) if isinstance(v, Mapping)
                    else ("head" if is_head(prefix + (k,)) else "backbone"))
                for k, v in tree.items()}
    return label(unfreeze(params))


def freeze_backbone(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` for the head's parameters, zero updates (and no optimizer state) elsewhere."""
    return optax.multi_transform({"head": tx, "backbone": optax.set_to_zero()}, head_labels)


def save_variables(variables: Mapping, directory: str, info: dict | None = None) -> str:
    """Write converted variables as an orbax checkpoint (plus `conversion.json`)."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.join(directory, VARIABLES_DIR),
                  {k: _as_numpy(v) for k, v in variables.items()}, force=True)
    if info is not None:
        with open(os.path.join(directory, "conversion.json"), "w") as f:
            json.dump(info, f, indent=2, default=str)
    return directory


def _as_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, unfreeze(tree))


def load_pretrained(directory: str) -> dict[str, Any]:
    """{"params", "batch_stats"} from a converted-weights dir or a training workdir (the
    model the run selected: selected.json's step and weights; before it finished, its best
    checkpoint, else its latest)."""
    import orbax.checkpoint as ocp

    from resnet_jax.convert import timm as timm_convert

    if timm_convert.is_timm_checkpoint(directory):
        variables, _ = timm_convert.load(directory)
        return variables
    directory = os.path.abspath(directory)
    converted = os.path.join(directory, VARIABLES_DIR)
    if os.path.isdir(converted):
        with ocp.StandardCheckpointer() as ckpt:
            out = ckpt.restore(converted)
        return {"params": out["params"], "batch_stats": out.get("batch_stats", {})}
    if os.path.isdir(rundir.path(directory, rundir.CHECKPOINTS)):
        from resnet_jax.training.checkpoint import Checkpointer, selected_checkpoint

        which, step = selected_checkpoint(directory)
        ckpt = Checkpointer(rundir.path(directory, rundir.CHECKPOINTS))
        try:
            state = ckpt.restore(None, which, step)
        finally:
            ckpt.close()
        if state is not None:
            if rundir.read_selected(directory).get("weights") == "ema":
                state = state["ema"]
            return {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
    raise FileNotFoundError(
        f"init_from={directory!r} holds neither converted weights ({VARIABLES_DIR}/, written by "
        "python -m experiments.convert_weights) nor a run's checkpoints/")


def recorded_preprocessing(directory: str) -> dict[str, Any] | None:
    """How the input of the weights in `directory` was made ({"mean", "std",
    "channel_order", ...}): conversion.json's "preprocess" for converted weights, the
    resolved input_* fields of a run's config.json, the `pretrained_cfg` of timm's
    config.json; None when none says."""
    from resnet_jax.convert import timm as timm_convert

    if timm_convert.is_timm_checkpoint(directory):
        return timm_convert.preprocess_of(
            timm_convert.read_config(directory).get("pretrained_cfg", {}))
    path = os.path.join(directory, "conversion.json")
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f).get("preprocess")
        if isinstance(recorded, dict) and "mean" in recorded and "std" in recorded:
            return recorded
        return None
    path = rundir.path(directory, rundir.CONFIG)
    if os.path.exists(path):
        with open(path) as f:
            c = json.load(f)
        if c.get("input_mean"):
            recorded = {"mean": c["input_mean"], "std": c["input_std"],
                        "channel_order": c.get("input_channel_order") or "RGB"}
            if c.get("eval_crop_pct"):
                recorded["crop_pct"] = c["eval_crop_pct"]
            if c.get("interpolation"):
                recorded["interpolation"] = c["interpolation"]
            return recorded
    return None


def init_from_pretrained(state: Any, tx: optax.GradientTransformation, directory: str) -> Any:
    """The train state with the pretrained variables of `directory` put in (the rules of
    `merge_pretrained`) and a fresh optimizer state for them."""
    import jax
    import jax.numpy as jnp

    merged, fresh_head = merge_pretrained(
        {"params": state.params, "batch_stats": state.batch_stats}, load_pretrained(directory),
        f"init_from={directory!r}")
    log.info("initialised from %s%s", directory,
             f"; head re-initialised: {', '.join(fresh_head)}" if fresh_head else "")
    params = jax.tree.map(jnp.asarray, merged["params"])
    return state.replace(params=params, batch_stats=jax.tree.map(jnp.asarray, merged["batch_stats"]),
                         opt_state=tx.init(params))


def merge_pretrained(fresh: Mapping[str, Any], pretrained: Mapping[str, Any],
                     source: str = "init_from") -> tuple[dict[str, Any], list[str]]:
    """The fresh variables with every pretrained tensor put in, and the head tensors that kept
    their fresh initialisation. ValueError naming any other missing, extra or misshapen one."""
    out, reinitialised = {}, []
    for collection in ("params", "batch_stats"):
        mine = flatten_dict(unfreeze(fresh.get(collection, {})))
        theirs = flatten_dict(unfreeze(pretrained.get(collection, {})))
        extra = sorted(p for p in theirs if p not in mine and not is_head(p))
        if extra:
            raise ValueError(f"{source} has {collection}/{'/'.join(extra[0])}, which the model "
                             "does not")
        merged = {}
        for path, value in mine.items():
            name = f"{collection}/{'/'.join(path)}"
            if path not in theirs:
                if is_head(path):
                    reinitialised.append(name)
                    merged[path] = value
                    continue
                raise ValueError(f"{source} lacks {name}, which the model has")
            new = np.asarray(theirs[path])
            if new.shape != tuple(np.shape(value)):
                if is_head(path):
                    reinitialised.append(name)
                    merged[path] = value
                    continue
                raise ValueError(f"{source}: {name} has shape {new.shape}, the model's is "
                                 f"{tuple(np.shape(value))}")
            merged[path] = new.astype(np.asarray(value).dtype)
        out[collection] = unflatten_dict(merged)
    return out, reinitialised
