"""CIFAR-10 ResNet-20 of He et al. 2015 (option A shortcuts), the paper's recipe.

    python -m experiments.train --config experiments/configs/cifar10_resnet20.py --workdir runs/cifar10_resnet20

Expected: the paper reports 8.75% test error (Table 6). Not yet measured here; it needs
tfds' cifar10 (`tfds build cifar10` where the network is reachable, then
--config.data_dir=DIR) and days on a 2-core CPU: run it on an accelerator.
"""

from resnet_jax.configs.common import cifar_paper


def get_config():
    c = cifar_paper("cifar_resnet20")
    return c
