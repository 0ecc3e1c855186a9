"""Residual networks: ResNet v1/v1.5 (He et al. 2015), the CIFAR 6n+2 nets of the same
paper, the pre-activation ResNet v2 (He et al. 2016, "Identity Mappings"), the B/C/D
variants of "Bag of Tricks" (He et al. 2019: stride on the 3x3, a deep 3x3 stem, an
average-pooled projection shortcut), wide ResNets (Zagoruyko & Komodakis 2016) and ResNeXt
(Xie et al. 2017: grouped 3x3 convolutions), with stochastic depth (Huang et al. 2016).

Layer names follow torchvision (`conv1`, `bn1`, `layer1_0/conv1`, `layer1_0/downsample_conv`,
`fc`) so that weights map one to one. Every variant is a field setting of `ResNet` or
`PreActResNet`; see `resnet_jax.models.get_model` for the registered names.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax.models.common import (
    ModuleDef,
    check_choice,
    make_conv,
    make_dense,
    make_norm,
    pad,
)
from resnet_jax.models.layers import global_avg_pool, zero_pad_shortcut

SHORTCUTS = ("projection", "zero_pad", "avg_pool")
STEMS = ("plain", "deep")
STRIDE_ON = ("3x3", "1x1")
BLOCKS = ("basic", "bottleneck")
DOWNSAMPLE = ("stride", "pool")
EXPANSION = {"basic": 1, "bottleneck": 4}


def ceil_avg_pool(x: jax.Array, strides: int) -> jax.Array:
    """2x2 average pool at `strides`, the last window cut at an odd edge and averaged over
    the pixels it holds (PyTorch's ceil_mode=True, count_include_pad=False)."""
    if strides == 1:
        return x
    extra = [(-size) % strides for size in x.shape[1:3]]
    return nn.avg_pool(x, (2, 2), strides=(strides, strides),
                       padding=((0, extra[0]), (0, extra[1])), count_include_pad=False)


def drop_path_rates(blocks: int, rate: float) -> list[float]:
    """Stochastic depth of each of `blocks` residual blocks: rising linearly from 0 for the
    first to `rate` for the last (timm's rule)."""
    return [rate * i / max(blocks - 1, 1) for i in range(blocks)]


def drop_path(y: jax.Array, rate: float, train: bool, name: str = "drop_path") -> jax.Array:
    """Stochastic depth: in training, each example's residual branch is dropped with
    probability `rate` and kept ones scaled by 1 / (1 - rate); the identity at evaluation."""
    if rate == 0.0:
        return y
    return nn.Dropout(rate, broadcast_dims=tuple(range(1, y.ndim)), deterministic=not train,
                      name=name)(y)


def _shortcut(
    x: jax.Array,
    out_channels: int,
    strides: int,
    kind: str,
    conv: ModuleDef,
    norm: ModuleDef | None,
) -> jax.Array:
    """Identity when shapes agree, otherwise a projection (option B), zero-pad (option A) or
    a 2x2 average pool then the projection at stride 1 (ResNet-D)."""
    if x.shape[-1] == out_channels and strides == 1:
        return x
    if kind == "zero_pad":
        return zero_pad_shortcut(x, out_channels, strides)
    if kind == "avg_pool":
        x = ceil_avg_pool(x, strides)
        strides = 1
    x = conv(out_channels, (1, 1), strides=strides, padding="VALID", name="downsample_conv")(x)
    return norm(name="downsample_bn")(x) if norm is not None else x


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34, CIFAR nets)."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    shortcut: str = "projection"
    zero_init_residual: bool = False
    drop_path_rate: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.features, (3, 3), strides=self.strides, padding=pad(3), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), padding=pad(3), name="conv2")(y)
        last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = drop_path(self.norm(scale_init=last_init, name="bn2")(y), self.drop_path_rate,
                      self.train)
        residual = _shortcut(x, self.features, self.strides, self.shortcut, self.conv, self.norm)
        return nn.relu(y + residual)


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50/101/152).

    `stride_on="3x3"` puts the stride on the 3x3 convolution (torchvision, "v1.5");
    `"1x1"` on the first 1x1 as in the paper and Keras' ResNet50. The inner width is
    `features * width_per_group / 64 * groups`, the 3x3 in `groups` groups (ResNeXt; wide
    ResNets double `width_per_group`).
    """

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    shortcut: str = "projection"
    stride_on: str = "3x3"
    zero_init_residual: bool = False
    groups: int = 1
    width_per_group: int = 64
    drop_path_rate: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s1, s3 = (1, self.strides) if self.stride_on == "3x3" else (self.strides, 1)
        width = int(self.features * self.width_per_group / 64) * self.groups
        y = self.conv(width, (1, 1), strides=s1, padding="VALID", name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(width, (3, 3), strides=s3, padding=pad(3), feature_group_count=self.groups,
                      name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        out = self.features * EXPANSION["bottleneck"]
        y = self.conv(out, (1, 1), padding="VALID", name="conv3")(y)
        last_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        y = drop_path(self.norm(scale_init=last_init, name="bn3")(y), self.drop_path_rate,
                      self.train)
        residual = _shortcut(x, out, self.strides, self.shortcut, self.conv, self.norm)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """ResNet v1 (post-activation). ImageNet layout by default; the CIFAR 6n+2 nets set
    `stage_widths=(16, 32, 64)`, a 3x3 stem without pooling and `shortcut="zero_pad"`.

    Attributes:
      stage_sizes: residual blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block: "basic" (two 3x3) or "bottleneck" (1x1-3x3-1x1, expansion 4).
      num_classes: size of the final dense layer.
      stage_widths: channels of each stage (before bottleneck expansion).
      stem_width, stem_kernel, stem_strides, stem_pool: the first convolution and whether a
        3x3/2 max-pool follows it. Any input size works: nothing depends on 224.
      stem: "plain" (one stem_kernel convolution) or "deep" (ResNet-C: three 3x3
        convolutions of stem_width/2, stem_width/2 and stem_width channels, the first at
        stem_strides; timm's `stem_type='deep'`).
      shortcut: "projection" (option B, 1x1 conv + BN), "zero_pad" (option A, parameter-free)
        or "avg_pool" (ResNet-D: 2x2 average pool, then the 1x1 conv + BN at stride 1).
      groups, width_per_group: bottleneck blocks' 3x3 groups and width per group (ResNeXt
        32x4d: 32, 4; wide_resnet50_2: 1, 128; plain: 1, 64).
      drop_path_rate: stochastic depth of the last block; block i of n drops its residual
        branch with rate * i / (n - 1) in training (timm's rule), none at evaluation.
      stride_on: "3x3" (torchvision v1.5) or "1x1" (paper, Keras) in bottleneck blocks.
      zero_init_residual: start the last BN gamma of every residual branch at zero (Goyal et al.
        2017); off by default, as in the paper.
      dtype: compute dtype (float32 or bfloat16); parameters are always float32.
      bn_momentum: Flax convention, the weight of the old running average: 0.9 here is the
        same as PyTorch's BatchNorm momentum=0.1.
      bn_epsilon: 1e-5 as torchvision; Keras' ResNet50 uses 1.001e-5.
      axis_name: mapped axis over which BatchNorm statistics are synchronised, or None.
      conv_bias: convolutions with biases (Keras' ResNet50 has them; torchvision's do not).
      conv, norm, pool: the layer constructors (`nn.Conv`, `nn.BatchNorm`, `nn.max_pool` or
        drop-ins with their arguments, such as `resnet_jax.ops.cpu.layers()`).
      head_hidden: >0 puts a dense layer of that width + ReLU (`fc_hidden`) between the
        global pooling and `fc`, as in the transfer-learning seed (dense 1024, dense 10).
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    num_classes: int = 1000
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    stem_kernel: int = 7
    stem_strides: int = 2
    stem_pool: bool = True
    shortcut: str = "projection"
    stride_on: str = "3x3"
    zero_init_residual: bool = False
    dtype: jnp.dtype = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None
    conv_bias: bool = False
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm
    pool: Callable = nn.max_pool
    head_hidden: int = 0
    stem: str = "plain"
    groups: int = 1
    width_per_group: int = 64
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_choice("block", self.block, BLOCKS)
        check_choice("shortcut", self.shortcut, SHORTCUTS)
        check_choice("stride_on", self.stride_on, STRIDE_ON)
        check_choice("stem", self.stem, STEMS)
        if self.block == "basic" and (self.groups, self.width_per_group) != (1, 64):
            raise ValueError(f"groups={self.groups}, width_per_group={self.width_per_group}: "
                             "basic blocks take only groups=1, width_per_group=64")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={self.drop_path_rate}; expected [0, 1)")
        if len(self.stage_sizes) != len(self.stage_widths):
            raise ValueError(
                f"stage_sizes {tuple(self.stage_sizes)} and stage_widths "
                f"{tuple(self.stage_widths)} must have the same length"
            )
        conv = make_conv(self.conv, self.dtype, self.conv_bias)
        norm = make_norm(self.norm, train, self.dtype, self.bn_momentum, self.bn_epsilon,
                         self.axis_name)
        block_cls = BasicBlock if self.block == "basic" else BottleneckBlock
        # only bottleneck blocks have a choice of where the stride goes, groups and widths
        extra = {} if self.block == "basic" else {
            "stride_on": self.stride_on, "groups": self.groups,
            "width_per_group": self.width_per_group}

        x = jnp.asarray(x, self.dtype)
        if self.stem == "deep":
            half = self.stem_width // 2
            x = conv(half, (3, 3), strides=self.stem_strides, padding=pad(3), name="stem_conv1")(x)
            x = nn.relu(norm(name="stem_bn1")(x))
            x = conv(half, (3, 3), padding=pad(3), name="stem_conv2")(x)
            x = nn.relu(norm(name="stem_bn2")(x))
            x = conv(self.stem_width, (3, 3), padding=pad(3), name="stem_conv3")(x)
        else:
            k = self.stem_kernel
            x = conv(self.stem_width, (k, k), strides=self.stem_strides, padding=pad(k),
                     name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x))
        if self.stem_pool:
            x = self.pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        rates, index = drop_path_rates(sum(self.stage_sizes), self.drop_path_rate), 0
        for i, (size, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            for j in range(size):
                x = block_cls(
                    features=width,
                    strides=2 if i > 0 and j == 0 else 1,
                    conv=conv,
                    norm=norm,
                    shortcut=self.shortcut,
                    zero_init_residual=self.zero_init_residual,
                    drop_path_rate=rates[index],
                    train=train,
                    **extra,
                    name=f"layer{i + 1}_{j}",
                )(x)
                index += 1
        x = global_avg_pool(x)
        if self.head_hidden:
            x = nn.relu(make_dense(self.dtype)(self.head_hidden, name="fc_hidden")(x))
        x = make_dense(self.dtype)(self.num_classes, name="fc")(x)
        return jnp.asarray(x, jnp.float32)


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, identity added after."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    shortcut: str = "projection"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = nn.relu(self.norm(name="bn1")(x))
        # A projection sees the pre-activated input, as in the paper's reference code.
        identity = x.shape[-1] == self.features and self.strides == 1
        residual = _shortcut(
            x if identity else out, self.features, self.strides, self.shortcut, self.conv, None
        )
        y = self.conv(self.features, (3, 3), strides=self.strides, padding=pad(3), name="conv1")(out)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.features, (3, 3), padding=pad(3), name="conv2")(y)
        return y + residual


class PreActBottleneckBlock(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-conv1x1, BN-ReLU-conv3x3 (stride), BN-ReLU-conv1x1."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    shortcut: str = "projection"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_channels = self.features * EXPANSION["bottleneck"]
        out = nn.relu(self.norm(name="bn1")(x))
        identity = x.shape[-1] == out_channels and self.strides == 1
        residual = _shortcut(
            x if identity else out, out_channels, self.strides, self.shortcut, self.conv, None
        )
        y = self.conv(self.features, (1, 1), padding="VALID", name="conv1")(out)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.features, (3, 3), strides=self.strides, padding=pad(3), name="conv2")(y)
        y = nn.relu(self.norm(name="bn3")(y))
        y = self.conv(out_channels, (1, 1), padding="VALID", name="conv3")(y)
        return y + residual


class PreActResNet(nn.Module):
    """Pre-activation ResNet v2 (He et al. 2016). ImageNet layout by default; the CIFAR
    nets (preact_resnet110/164) use a 3x3 stem and widths (16, 32, 64).

    The stem is a bare convolution (plus max-pool in the ImageNet layout): the first block
    pre-activates its input. A final BN-ReLU precedes global pooling.

    Attributes (beyond those shared with `ResNet`):
      downsample: "stride" (first block of a stage has stride 2) or "pool" (2x2 max-pool
        between stages, blocks keep stride 1, as in the small MNIST net).
      head_hidden: width of a dense+ReLU layer before the classifier, or None.
      conv, norm, pool: the layer constructors, as in `ResNet`.
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    num_classes: int = 1000
    stage_widths: Sequence[int] = (64, 128, 256, 512)
    stem_width: int = 64
    stem_kernel: int = 7
    stem_strides: int = 2
    stem_pool: bool = True
    shortcut: str = "projection"
    downsample: str = "stride"
    head_hidden: int | None = None
    dtype: jnp.dtype = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm
    pool: Callable = nn.max_pool

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_choice("block", self.block, BLOCKS)
        check_choice("shortcut", self.shortcut, SHORTCUTS)
        check_choice("downsample", self.downsample, DOWNSAMPLE)
        conv = make_conv(self.conv, self.dtype)
        norm = make_norm(self.norm, train, self.dtype, self.bn_momentum, self.bn_epsilon,
                         self.axis_name)
        block_cls = PreActBlock if self.block == "basic" else PreActBottleneckBlock

        x = jnp.asarray(x, self.dtype)
        k = self.stem_kernel
        x = conv(self.stem_width, (k, k), strides=self.stem_strides, padding=pad(k), name="conv1")(x)
        if self.stem_pool:
            x = self.pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, (size, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            if i > 0 and self.downsample == "pool":
                x = self.pool(x, (2, 2), strides=(2, 2))
            for j in range(size):
                strides = 2 if (i > 0 and j == 0 and self.downsample == "stride") else 1
                x = block_cls(
                    features=width,
                    strides=strides,
                    conv=conv,
                    norm=norm,
                    shortcut=self.shortcut,
                    name=f"layer{i + 1}_{j}",
                )(x)
        x = nn.relu(norm(name="bn_final")(x))
        x = global_avg_pool(x)
        dense = make_dense(self.dtype)
        if self.head_hidden:
            x = nn.relu(dense(self.head_hidden, name="fc_hidden")(x))
        x = dense(self.num_classes, name="fc")(x)
        return jnp.asarray(x, jnp.float32)
