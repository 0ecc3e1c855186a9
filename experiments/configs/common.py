"""Recipes shared by several experiment configs."""

from resnet_jax.training.config import base_config


def cifar_paper(model: str):
    """He et al. 2015, section 4.2: SGD 0.1, momentum 0.9, weight decay 1e-4 (L2), batch 128,
    learning rate /10 at 32k and 48k iterations, 64k iterations in all, pad-4 crop + flip.
    The paper chose these on a 45k/5k train/validation split: validation_split=0.1 holds out
    the 5k here too, and the best checkpoint is chosen on them."""
    c = base_config()
    c.model = model
    c.dataset = "cifar10"
    c.batch_size = 128
    c.num_steps = 64_000
    c.num_epochs = 164  # 64k steps at 390 steps per epoch, for display only
    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.weight_decay = 1e-4
    c.weight_decay_mode = "l2"
    c.schedule = "piecewise"
    c.lr_boundaries = (32_000, 48_000)
    c.lr_boundaries_unit = "steps"
    c.augment = "crop_flip"
    c.eval_every_epochs = 5
    c.validation_split = 0.1
    return c


def cifar_imagenet_layout(model: str):
    """An ImageNet-layout ResNet trained on CIFAR-10 from scratch at 32x32: SGD with Nesterov
    momentum 0.9, learning rate 0.1 with a 2-epoch warm-up and cosine decay, weight decay
    5e-4, pad-4 crop + flip, batch 128, 100 epochs."""
    c = base_config()
    c.model = model
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
    c.validation_split = 0.1  # 5k of the 50k, the best checkpoint chosen on them
    return c
