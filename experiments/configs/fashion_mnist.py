"""The main job: a small residual net on real Fashion-MNIST.

    python -m experiments.train --config experiments/configs/fashion_mnist.py --workdir runs/fashion_mnist

Expected: see RESULTS.md (time and test accuracy on a 2-core CPU).
"""

from resnet_jax.training.config import base_config


def get_config():
    c = base_config()
    c.model = "fashion_mnist_resnet8"
    c.dataset = "fashion_mnist"
    c.batch_size = 128
    c.num_epochs = 10
    c.optimizer = "sgd"
    c.nesterov = True
    c.learning_rate = 0.2
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.schedule = "onecycle"
    c.augment = "crop_flip"
    return c
