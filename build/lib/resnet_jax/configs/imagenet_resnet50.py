"""ResNet-50 on ImageNet, the standard 90-epoch recipe (He et al. 2015; Goyal et al. 2017):
SGD momentum 0.9, learning rate 0.1 x batch/256 with a 5-epoch linear warm-up, /10 at epochs
30, 60 and 80, weight decay 1e-4, random-resized crop 224 + flip, center-crop evaluation.

    python -m experiments.train --config experiments/configs/imagenet_resnet50.py --workdir runs/imagenet_resnet50 \
        --config.data_dir=DIR_WITH_TFDS_IMAGENET2012

Expected: about 76.1% top-1 (torchvision's ResNet-50 V1 weights, trained this way, report
76.13%). Not measured here: it needs the ImageNet archives and 8 or more accelerators
(roughly a day on 8 V100s, Goyal et al. 2017).
"""

from resnet_jax.training.config import base_config


def get_config():
    c = base_config()
    c.model = "resnet50"
    c.dataset = "imagenet2012"
    c.eval_split = "validation"  # the test split: ImageNet's test labels are not public
    c.validation_split = 0.01  # 12,812 training images held out for model selection
    c.image_size = 224
    c.batch_size = 256
    c.eval_batch_size = 250
    c.num_epochs = 90
    c.optimizer = "sgd"
    c.learning_rate = 0.1 * c.batch_size / 256
    c.momentum = 0.9
    c.weight_decay = 1e-4
    c.schedule = "piecewise"
    c.lr_boundaries = (30, 60, 80)
    c.lr_boundaries_unit = "epochs"
    c.warmup_epochs = 5.0
    c.augment = "inception"
    c.dtype = "bfloat16"
    c.cpu_kernels = False
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    return c
