"""The transfer-learning seed's ResNet-34 (ImageNet layout) trained on CIFAR-10 from scratch
at 32x32: SGD with Nesterov momentum, cosine schedule with warm-up, 100 epochs.

    python -m experiments.train --config experiments/configs/cifar10_resnet34.py --workdir runs/cifar10_resnet34

Needs tfds' cifar10 (--config.data_dir). Expected: no reference figure for this exact
recipe; not yet measured here (hours per epoch on a 2-core CPU, see RESULTS.md): run it on
an accelerator.
"""

from resnet_jax.configs.common import cifar_imagenet_layout


def get_config():
    return cifar_imagenet_layout("resnet34")
