"""CIFAR-10 ResNet-110 of He et al. 2015 (option A shortcuts), the paper's recipe.

    python -m experiments.train --config experiments/configs/cifar10_resnet110.py --workdir runs/cifar10_resnet110

Expected: the paper reports 6.43% test error (Table 6). Not yet measured here; it needs
tfds' cifar10 (`tfds build cifar10` where the network is reachable, then
--config.data_dir=DIR) and days on a 2-core CPU: run it on an accelerator.
"""

from resnet_jax.configs.common import cifar_paper


def get_config():
    c = cifar_paper("cifar_resnet110")
    # The paper warms ResNet-110 up at 0.01 until training error is below 80% (about 400
    # iterations); a one-epoch linear warm-up plays that role here.
    c.warmup_epochs = 1.0
    return c
