"""AlexNet (two towers, LRN) on ImageNet with the paper's recipe (Krizhevsky et al. 2012,
section 5): SGD batch 128, momentum 0.9, weight decay 5e-4, learning rate 0.01 divided by 10
when the validation error stops improving (three times in about 90 epochs; here at epochs
30, 60 and 80), dropout 0.5, random crops and flips.

    python -m experiments.train --config experiments/configs/imagenet_alexnet.py --workdir runs/imagenet_alexnet \
        --config.data_dir=DIR_WITH_TFDS_IMAGENET2012

Expected: the paper reports 40.7% top-1 / 18.2% top-5 error for one net (Table 2). Not
measured here: it needs the ImageNet archives and accelerators.
"""

from resnet_jax.training.config import base_config


def get_config():
    c = base_config()
    c.model = "alexnet"
    c.dataset = "imagenet2012"
    c.eval_split = "validation"  # the test split: ImageNet's test labels are not public
    c.validation_split = 0.01  # 12,812 training images held out for model selection
    c.image_size = 224
    c.batch_size = 128
    c.eval_batch_size = 250
    c.num_epochs = 90
    c.optimizer = "sgd"
    c.learning_rate = 0.01
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.weight_decay_all = False
    c.schedule = "piecewise"
    c.lr_boundaries = (30, 60, 80)
    c.lr_boundaries_unit = "epochs"
    c.augment = "inception"
    c.cpu_kernels = False
    c.log_every_steps = 100
    c.checkpoint_every_steps = 5000
    return c
