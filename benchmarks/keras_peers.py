"""Keras 3 versions of the benchmark suite's architectures, for side-by-side speed runs on
Keras's JAX backend (`experiments.benchmark --against torch` runs them as its second peer).

The ImageNet-style ResNets are keras-hub's own `ResNetBackbone` (basic blocks for ResNet-18,
bottleneck blocks with the stride on the 3x3 convolution for ResNet-50: the same nets as
torchvision's and the zoo's) under a global average pool and a dense head, as a keras-hub user
builds them. keras-hub has no CIFAR ResNet (6n+2 layers, 16-64 channels, zero-padded identity
shortcuts), no AlexNet and no pre-activation MNIST net, so those are written here as Keras
functional models, layer for layer as in benchmarks/torch_peers.py. Parameter counts (trainable
weights) equal the zoo's; the suite checks them. BatchNorm uses PyTorch's epsilon (1e-5) and
momentum (0.9), as keras-hub's ResNets do.

Import this module only in a process whose KERAS_BACKEND is "jax" (the suite's worker sets it).
"""

from __future__ import annotations


def _layers():
    import keras

    return keras.layers


def _bn(x):
    return _layers().BatchNormalization(epsilon=1e-5, momentum=0.9)(x)


def _conv(x, filters, kernel, stride=1, pad=None, bias=False):
    """A convolution with PyTorch's symmetric padding (`pad`, default kernel // 2)."""
    L = _layers()
    pad = kernel // 2 if pad is None else pad
    if pad:
        x = L.ZeroPadding2D(pad)(x)
    return L.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=bias)(x)


def _zero_pad_shortcut(x, width, stride):
    """He et al.'s option A: subsample, then zero channels on both sides."""
    import keras

    if stride == 1 and x.shape[-1] == width:
        return x
    extra = width - x.shape[-1]

    def shortcut(t):
        t = t[:, ::stride, ::stride, :]
        return keras.ops.pad(t, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])

    return _layers().Lambda(shortcut)(x)


def _cifar_block(x, width, stride):
    L = _layers()
    y = L.ReLU()(_bn(_conv(x, width, 3, stride)))
    y = _bn(_conv(y, width, 3))
    return L.ReLU()(L.Add()([y, _zero_pad_shortcut(x, width, stride)]))


def cifar(depth: int, num_classes: int = 10, shape=(32, 32, 3)):
    import keras

    L = _layers()
    n = (depth - 2) // 6
    inputs = keras.Input(shape)
    x = L.ReLU()(_bn(_conv(inputs, 16, 3)))
    for i, width in enumerate((16, 32, 64)):
        for j in range(n):
            x = _cifar_block(x, width, 2 if i > 0 and j == 0 else 1)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(num_classes)(x))


def keras_hub_resnet(blocks, block_type, num_classes: int, shape):
    """keras-hub's ResNet backbone (v1, torchvision's layout) with an average-pooled dense head."""
    import keras
    import keras_hub

    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512], stackwise_num_blocks=list(blocks),
        stackwise_num_strides=[1, 2, 2, 2], block_type=block_type, use_pre_activation=False,
        image_shape=shape)
    inputs = keras.Input(shape)
    x = _layers().GlobalAveragePooling2D()(backbone(inputs))
    return keras.Model(inputs, _layers().Dense(num_classes)(x))


def _preact_block(x, width):
    L = _layers()
    out = L.ReLU()(_bn(x))
    residual = _conv(out, width, 1) if x.shape[-1] != width else x
    y = _conv(L.ReLU()(_bn(_conv(out, width, 3))), width, 3)
    return L.Add()([y, residual])


def mnist_preact(num_classes: int = 10, shape=(28, 28, 1)):
    import keras

    L = _layers()
    inputs = keras.Input(shape)
    x = _conv(inputs, 8, 3)
    for i, width in enumerate((16, 32, 64)):
        if i:
            x = L.MaxPooling2D(2)(x)
        x = _preact_block(_preact_block(x, width), width)
    x = L.GlobalAveragePooling2D()(L.ReLU()(_bn(x)))
    x = L.Dense(128, activation="relu")(x)
    return keras.Model(inputs, L.Dense(num_classes)(x))


def alexnet_owt(num_classes: int = 1000, shape=(224, 224, 3)):
    import keras

    L = _layers()
    inputs = keras.Input(shape)
    x = L.ReLU()(_conv(inputs, 64, 11, 4, pad=2, bias=True))
    x = L.MaxPooling2D(3, 2)(x)
    x = L.MaxPooling2D(3, 2)(L.ReLU()(_conv(x, 192, 5, bias=True)))
    for width in (384, 256, 256):
        x = L.ReLU()(_conv(x, width, 3, bias=True))
    x = L.Flatten()(L.MaxPooling2D(3, 2)(x))  # 6x6x256 at 224x224: PyTorch's adaptive pool is
    for _ in range(2):                          # the identity there
        x = L.Dropout(0.5)(L.Dense(4096, activation="relu")(x))
    return keras.Model(inputs, L.Dense(num_classes)(x))


# name -> builder(num_classes, shape); keras-hub has no CIFAR ResNet, AlexNet or MNIST
# pre-activation net, so those are the ones written here
PEERS = {
    "cifar_resnet20": lambda nc, s: cifar(20, nc, s),
    "cifar_resnet56": lambda nc, s: cifar(56, nc, s),
    "resnet18": lambda nc, s: keras_hub_resnet((2, 2, 2, 2), "basic_block", nc, s),
    "fashion_mnist_resnet50": lambda nc, s: keras_hub_resnet((3, 4, 6, 3), "bottleneck_block",
                                                             nc, s),
    "mnist_preact_resnet": mnist_preact,
    "alexnet_owt": alexnet_owt,
}
