"""The Fashion-MNIST seed: ResNet-50 (ImageNet layout) on 28x28x1, Adam, batch 128,
learning rate reduced on plateau, 400 epochs.

    python -m experiments.train --config experiments/configs/fashion_mnist_resnet50.py --workdir runs/fmnist_resnet50

Expected: the seed article reports 91.3-91.4% test accuracy after 400 epochs. Not measured
here: a ResNet-50 step is far too slow for 400 epochs on a 2-core CPU (see RESULTS.md for
the main job, which beats it in minutes); run it on an accelerator.
"""

from resnet_jax.training.config import base_config


def get_config():
    c = base_config()
    c.model = "fashion_mnist_resnet50"
    c.dataset = "fashion_mnist"
    c.batch_size = 128
    c.num_epochs = 400
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.weight_decay = 0.0
    c.schedule = "plateau"  # Keras' ReduceLROnPlateau on the validation loss
    c.validation_split = 0.1  # 6,000 of the 60,000 training images
    c.plateau_monitor = "val_loss"
    c.plateau_factor = 0.1
    c.plateau_patience = 10
    c.augment = "none"
    return c
