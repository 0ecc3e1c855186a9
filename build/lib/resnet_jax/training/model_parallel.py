"""AlexNet's original model parallelism: the two towers on two devices.

Krizhevsky et al. (2012, section 3.2) put half of every layer's kernels on each of two GPUs;
conv2, conv4 and conv5 read only their own GPU's maps, conv3 and the dense layers read
both. On a 2-D mesh (`data`, `model`) that is: every conv and hidden dense layer has its
output channels split over `model`, the grouped convolutions' groups falling one per
device, and the batch split over `data`. XLA's partitioner inserts the exchanges at conv3
and the dense layers.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

TOWER_SPLIT = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")


def make_mesh(data: int, model: int, devices=None) -> Mesh:
    """A (data, model) mesh over the first data*model devices."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < data * model:
        raise ValueError(f"a ({data}, {model}) mesh needs {data * model} devices, "
                         f"found {len(devices)}")
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), ("data", "model"))


def alexnet_param_specs(params: Any) -> Any:
    """PartitionSpecs that put each tower's half of every split layer on one `model` device."""

    def spec(path, leaf):
        layer, kind = path[0].key, path[-1].key
        if layer not in TOWER_SPLIT:
            return P()
        if kind == "bias":
            return P("model")
        return P(*([None] * (leaf.ndim - 1)), "model")

    return jax.tree_util.tree_map_with_path(spec, params)


def tower_specs(tree: Any) -> Any:
    """PartitionSpecs for any part of an AlexNet training state (params, their optimizer
    state, their EMA): a leaf under a split layer's name ending in kernel or bias has its
    last axis on `model`; every other leaf is replicated."""

    def spec(path, leaf):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if np.ndim(leaf) and keys and keys[-1] in ("kernel", "bias") and \
                any(k in TOWER_SPLIT for k in keys):
            return P(*([None] * (np.ndim(leaf) - 1)), "model")
        return P()

    return jax.tree_util.tree_map_with_path(spec, tree)


def shard_alexnet(variables: Any, mesh: Mesh) -> Any:
    """Place AlexNet's variables on `mesh` with the towers split over `model`."""
    specs = {"params": alexnet_param_specs(variables["params"])}
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    return jax.device_put({"params": variables["params"]}, shardings)


def apply_sharded(model, variables: Any, images: jax.Array, mesh: Mesh) -> jax.Array:
    """Logits of `model` with towers on `model` devices and the batch over `data`."""
    x = jax.device_put(images, NamedSharding(mesh, P("data")))
    return jax.jit(lambda v, x: model.apply(v, x),
                   out_shardings=NamedSharding(mesh, P("data")))(variables, x)
