"""The transfer-learning seed's ResNet-34 (ImageNet layout) trained on CIFAR-10 from scratch
at 32x32: SGD with Nesterov momentum, cosine schedule with warm-up, 100 epochs.
(Fine-tuning from ImageNet weights is the pretrained-weights issue's config.)

    python -m experiments.train --config experiments/configs/cifar10_resnet34.py --workdir runs/cifar10_resnet34

Needs tfds' cifar10 (--config.data_dir). Expected: about 93-95% test accuracy for this
recipe on CIFAR-10 (typical of ImageNet-layout ResNets at 32x32); not measured here, it
needs an accelerator.
"""

from resnet_jax.training.config import base_config


def get_config():
    c = base_config()
    c.model = "resnet34"
    c.dataset = "cifar10"
    c.batch_size = 128
    c.num_epochs = 100
    c.optimizer = "sgd"
    c.nesterov = True
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.schedule = "cosine"
    c.warmup_epochs = 2.0
    c.augment = "crop_flip"
    return c
