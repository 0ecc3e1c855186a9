"""What the converters share: the variables a registry model expects, and the assembly of a
variable tree from (source name, transform) rules with every tensor accounted for."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from resnet_jax.models import get_model, get_spec


class ConversionError(ValueError):
    """A source tensor is missing, left over, or of the wrong shape."""


def expected_variables(model_name: str, num_classes: int, channels: int = 0,
                       **overrides) -> dict[str, Any]:
    """{"params": ..., "batch_stats": ...} of ShapeDtypeStructs for the registry model (for
    input of `channels` channels; 0: the model's own)."""
    model = get_model(model_name, num_classes=num_classes, **overrides)
    shape = get_spec(model_name).input_shape
    shape = (*shape[:-1], channels or shape[-1])
    variables = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                           jnp.zeros((1, *shape), jnp.float32)))
    return unfreeze(variables)


Rule = tuple[str, Callable[[np.ndarray], np.ndarray]]


def assemble(expected: Mapping, rules: Mapping[tuple[str, ...], Rule],
             source: Mapping[str, np.ndarray], ignore: Callable[[str], bool] = lambda k: False,
             what: str = "state_dict") -> dict[str, Any]:
    """The variable tree shaped like `expected`, each leaf `transform(source[name])` per
    `rules[(collection, *path)]`. Errors name the first missing, extra or misshapen tensor."""
    leaves = flatten_dict(unfreeze(expected))
    unmapped = [p for p in leaves if p not in rules]
    if unmapped:
        raise ConversionError(f"no source tensor is mapped to {'/'.join(unmapped[0])}")
    missing = sorted({rules[p][0] for p in leaves} - set(source))
    if missing:
        raise ConversionError(f"{what} lacks {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    used = {rules[p][0] for p in leaves}
    extra = sorted(k for k in source if k not in used and not ignore(k))
    if extra:
        raise ConversionError(f"{what} has {extra[0]!r}, which the model has no place for"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    out = {}
    for path, leaf in leaves.items():
        name, transform = rules[path]
        array = np.asarray(source[name])
        value = np.asarray(transform(array), dtype=np.float32)
        if value.shape != tuple(leaf.shape):
            raise ConversionError(f"{what}[{name!r}] has shape {array.shape}: converted "
                                  f"{value.shape}, but {'/'.join(path)} needs {tuple(leaf.shape)}")
        out[path] = value
    return unflatten_dict(out)


def input_channels(variables: Mapping[str, Any]) -> int:
    """The input channels of a ResNet's or AlexNet's first convolution in `variables`."""
    params = variables["params"]
    first = next(params[k] for k in ("stem_conv1", "conv1") if k in params)
    return int(np.shape(first["kernel"])[2])


def identity(a: np.ndarray) -> np.ndarray:
    return a


identity.inverse = identity


def disassemble(variables: Mapping, expected: Mapping, rules: Mapping[tuple[str, ...], Rule],
                what: str = "variables") -> dict[str, np.ndarray]:
    """The source-layout state_dict of `variables`: the inverse of `assemble` (each rule's
    transform has an `inverse`), float32, plus `num_batches_tracked` (0, int64) for every
    BatchNorm, which PyTorch's strict loading asks for. Errors name a missing or misshapen
    leaf."""
    have = flatten_dict(unfreeze({k: variables.get(k, {}) for k in ("params", "batch_stats")}))
    out: dict[str, np.ndarray] = {}
    for path, leaf in flatten_dict(unfreeze(expected)).items():
        if path not in have:
            raise ConversionError(f"{what} lack {'/'.join(path)}")
        value = np.asarray(have[path], dtype=np.float32)
        if value.shape != tuple(leaf.shape):
            raise ConversionError(f"{what}: {'/'.join(path)} has shape {value.shape}, the model "
                                  f"needs {tuple(leaf.shape)}")
        name, transform = rules[path]
        out[name] = np.ascontiguousarray(transform.inverse(value))
    extra = sorted("/".join(p) for p in have if p not in flatten_dict(unfreeze(expected)))
    if extra:
        raise ConversionError(f"{what} have {extra[0]}, which the model has no place for")
    for name in [n for n in out if n.endswith(".running_var")]:
        out[name[:-len("running_var")] + "num_batches_tracked"] = np.array(0, np.int64)
    return out
