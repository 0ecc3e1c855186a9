"""Model registry: `get_model(name, num_classes=..., **overrides)` -> unbound flax module.

A registered name is a field setting of one of three classes (`ResNet`, `PreActResNet`,
`AlexNet`), plus the input shape and class count the model is meant for.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import linen as nn

from resnet_jax.models.alexnet import AlexNet
from resnet_jax.models.common import LAYER_FIELDS
from resnet_jax.models.layers import LocalResponseNorm, local_response_norm
from resnet_jax.models.resnet import PreActResNet, ResNet

IMAGENET = (224, 224, 3)
CIFAR = (32, 32, 3)
MNIST = (28, 28, 1)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model: its class, its field values, and the data it is meant for."""

    cls: type[nn.Module]
    fields: dict[str, Any]
    input_shape: tuple[int, int, int]
    num_classes: int
    description: str


def _cifar(n: int, **fields: Any) -> dict[str, Any]:
    return dict(
        stage_sizes=(n, n, n),
        stage_widths=(16, 32, 64),
        stem_width=16,
        stem_kernel=3,
        stem_strides=1,
        stem_pool=False,
        **fields,
    )


_V1_STAGES = {
    18: ((2, 2, 2, 2), "basic"),
    34: ((3, 4, 6, 3), "basic"),
    50: ((3, 4, 6, 3), "bottleneck"),
    101: ((3, 4, 23, 3), "bottleneck"),
    152: ((3, 8, 36, 3), "bottleneck"),
}

_REGISTRY: dict[str, ModelSpec] = {}
for _depth, (_stages, _block) in _V1_STAGES.items():
    _REGISTRY[f"resnet{_depth}"] = ModelSpec(
        ResNet, dict(stage_sizes=_stages, block=_block), IMAGENET, 1000,
        f"ResNet-{_depth} v1.5 (He et al. 2015; stride on the 3x3 conv as torchvision)",
    )
    _REGISTRY[f"preact_resnet{_depth}"] = ModelSpec(
        PreActResNet, dict(stage_sizes=_stages, block=_block), IMAGENET, 1000,
        f"Pre-activation ResNet-{_depth} v2 (He et al. 2016)",
    )
# "Bag of Tricks" (He et al. 2019): resnet50 above is ResNet-B (stride on the 3x3);
# C adds the deep 3x3 stem, D also the average-pooled shortcut; timm's names and stages.
_D_STAGES = {**_V1_STAGES, 26: ((2, 2, 2, 2), "bottleneck")}
for _depth, (_stages, _block) in _D_STAGES.items():
    _REGISTRY[f"resnet{_depth}d"] = ModelSpec(
        ResNet, dict(stage_sizes=_stages, block=_block, stem="deep", shortcut="avg_pool"),
        IMAGENET, 1000,
        f"ResNet-{_depth}-D (He et al. 2019, 'Bag of Tricks'): deep 3x3 stem, average-pooled "
        "projection shortcuts; timm's resnet{_depth}d".replace("{_depth}", str(_depth)),
    )
_REGISTRY["resnet50c"] = ModelSpec(
    ResNet, dict(stage_sizes=(3, 4, 6, 3), block="bottleneck", stem="deep"), IMAGENET, 1000,
    "ResNet-50-C (He et al. 2019): deep 3x3 stem, projection shortcuts; timm's resnet50c",
)
# Wide ResNets (Zagoruyko & Komodakis 2016) and ResNeXt (Xie et al. 2017) as torchvision
# and timm build them: the bottleneck's inner width and the 3x3's groups.
for _name, _depth, _groups, _width in (("wide_resnet50_2", 50, 1, 128),
                                       ("wide_resnet101_2", 101, 1, 128),
                                       ("resnext50_32x4d", 50, 32, 4),
                                       ("resnext101_32x8d", 101, 32, 8),
                                       ("resnext101_64x4d", 101, 64, 4)):
    _REGISTRY[_name] = ModelSpec(
        ResNet, dict(stage_sizes=_V1_STAGES[_depth][0], block="bottleneck", groups=_groups,
                     width_per_group=_width), IMAGENET, 1000,
        (f"Wide ResNet-{_depth}-2: bottleneck 3x3 twice as wide" if _groups == 1 else
         f"ResNeXt-{_depth} {_groups}x{_width}d: {_groups} groups of {_width} channels "
         "in the first stage's 3x3") + " (torchvision's and timm's name)",
    )
for _depth in (20, 32, 44, 56, 110):
    _REGISTRY[f"cifar_resnet{_depth}"] = ModelSpec(
        ResNet, _cifar((_depth - 2) // 6, shortcut="zero_pad"), CIFAR, 10,
        f"CIFAR ResNet-{_depth} (6n+2, He et al. 2015 section 4.2; option A shortcuts)",
    )
_REGISTRY["preact_resnet110"] = ModelSpec(
    PreActResNet, _cifar(18), CIFAR, 10, "Pre-activation CIFAR ResNet-110 (He et al. 2016)"
)
_REGISTRY["preact_resnet164"] = ModelSpec(
    PreActResNet, _cifar(18, block="bottleneck"), CIFAR, 10,
    "Pre-activation CIFAR ResNet-164, bottleneck blocks (He et al. 2016)",
)
_REGISTRY["mnist_preact_resnet"] = ModelSpec(
    PreActResNet,
    dict(
        stage_sizes=(2, 2, 2),
        stage_widths=(16, 32, 64),
        stem_width=8,
        stem_kernel=3,
        stem_strides=1,
        stem_pool=False,
        downsample="pool",
        head_hidden=128,
    ),
    MNIST, 10,
    "Small pre-activation net of the MNIST seed: conv 8, res 16,16, pool, 32,32, pool, "
    "64,64, dense 128",
)
_REGISTRY["keras_resnet50"] = ModelSpec(
    ResNet,
    dict(stage_sizes=(3, 4, 6, 3), block="bottleneck", stride_on="1x1", conv_bias=True,
         bn_epsilon=1.001e-5),
    IMAGENET, 1000,
    "ResNet-50 v1 as keras.applications.ResNet50: stride on the first 1x1 conv, conv "
    "biases, BatchNorm epsilon 1.001e-5",
)
_REGISTRY["fashion_mnist_resnet50"] = ModelSpec(
    ResNet, dict(stage_sizes=(3, 4, 6, 3), block="bottleneck"), MNIST, 10,
    "ResNet-50, ImageNet layout, on 28x28x1 Fashion-MNIST (the Fashion-MNIST seed)",
)
_REGISTRY["fashion_mnist_resnet8"] = ModelSpec(
    ResNet,
    dict(stage_sizes=(1, 1, 1), stage_widths=(32, 64, 128), stem_width=32, stem_kernel=3,
         stem_strides=2, stem_pool=False),
    MNIST, 10,
    "ResNet-8 for 28x28 inputs: 3x3/2 stem, one basic block per stage (32, 64, 128), "
    "projection shortcuts; the main job's net, sized for a 2-core CPU",
)
_REGISTRY["fashion_mnist_wide_resnet8"] = ModelSpec(
    ResNet,
    dict(stage_sizes=(1, 1, 1), stage_widths=(64, 128, 256), stem_width=64, stem_kernel=3,
         stem_strides=2, stem_pool=False),
    MNIST, 10,
    "fashion_mnist_resnet8 at twice the width (64, 128, 256): fashion_mnist_best's net",
)
_REGISTRY["alexnet"] = ModelSpec(
    AlexNet, {}, IMAGENET, 1000,
    "AlexNet as in Krizhevsky et al. 2012: LRN, two towers (grouped conv2/4/5)",
)
_REGISTRY["alexnet_owt"] = ModelSpec(
    AlexNet,
    dict(widths=(64, 192, 384, 256, 256), groups=(1, 1, 1, 1, 1), lrn=False, paper_init=False),
    IMAGENET, 1000,
    "Single-tower AlexNet of 'One weird trick' (Krizhevsky 2014), torchvision's alexnet",
)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; a ValueError listing the known names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def get_model(name: str, num_classes: int | None = None, **overrides: Any) -> nn.Module:
    """An unbound flax module for registered model `name`, with fields overridden.

    Layer constructors (`conv`, `norm`, `pool`) that the model's class does not take are
    left out, so that one drop-in set (e.g. `resnet_jax.ops.cpu.layers()`) fits every model.
    """
    spec = get_spec(name)
    known = {f.name for f in dataclasses.fields(spec.cls)} - {"parent", "name"}
    overrides = {k: v for k, v in overrides.items() if k in known or k not in LAYER_FIELDS}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"{name} ({spec.cls.__name__}) has no field(s) {unknown}; fields: {sorted(known)}"
        )
    fields = {**spec.fields, "num_classes": num_classes or spec.num_classes, **overrides}
    if fields["num_classes"] < 1:
        raise ValueError(f"num_classes must be >= 1, got {fields['num_classes']}")
    return spec.cls(**fields)


def get_nnx_model(name: str, rngs: Any = None, num_classes: int | None = None,
                  input_shape: tuple[int, int, int] | None = None, **overrides: Any) -> Any:
    """Registered model `name` as a `flax.nnx` module (`flax.nnx.bridge`), initialised for
    `input_shape` (default: the model's) from `rngs` (an `nnx.Rngs`; give it a `dropout`
    stream for stochastic depth or dropout in training; default `nnx.Rngs(0)`). Its outputs
    are the linen model's with the same variables; `model(x, train=True)` updates its batch
    statistics."""
    from flax import nnx

    from resnet_jax.models.nnx_bridge import nnx_model

    linen = get_model(name, num_classes=num_classes, **overrides)
    return nnx_model(linen, input_shape or get_spec(name).input_shape,
                     rngs if rngs is not None else nnx.Rngs(0))


__all__ = [
    "LAYER_FIELDS",
    "AlexNet",
    "LocalResponseNorm",
    "ModelSpec",
    "PreActResNet",
    "ResNet",
    "get_model",
    "get_nnx_model",
    "get_spec",
    "list_models",
    "local_response_norm",
]
