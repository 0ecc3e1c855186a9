"""The MNIST seed: the small pre-activation residual net, Adam, batch 32, 10 epochs.

    python -m experiments.train --config experiments/configs/mnist_preact.py --workdir runs/mnist_preact

Needs tfds' mnist (`tfds build mnist` where the network is reachable, then
--config.data_dir=DIR, or --config.data_source=idx with MNIST IDX files in data_dir).
Expected: above 99% test accuracy (the seed article's range for this net); not yet
measured here.
"""

from resnet_jax.training.config import base_config


def get_config():
    c = base_config()
    c.model = "mnist_preact_resnet"
    c.dataset = "mnist"
    c.batch_size = 32
    c.num_epochs = 10
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.weight_decay = 0.0
    c.schedule = "constant"
    c.augment = "none"
    c.test_every_period = True  # reported only: the last step is the model
    return c
