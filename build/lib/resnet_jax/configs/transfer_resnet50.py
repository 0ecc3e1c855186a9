"""Transfer learning as in the seed articles: an ImageNet-pretrained ResNet-50, global
average pooling, dense 1024 + ReLU, dense 10, the backbone frozen, on Fashion-MNIST with the
grayscale channel repeated to RGB.

    python -m experiments.convert_weights --source torchvision --model resnet50 \
        --input resnet50-0676ba61.pth --output weights/resnet50_v1
    python -m experiments.train --config experiments/configs/transfer_resnet50.py \
        --workdir runs/transfer_resnet50 --config.init_from=weights/resnet50_v1

Expected: not measured yet (it needs the published ImageNet weight file, which is not part
of this repository); `notebooks/02_transfer_learning.ipynb` runs the same recipe on a
ResNet-18 and a Fashion-MNIST subset. The head is trained with Adam at 1e-3; only
`fc_hidden` and `fc` change.
"""

from resnet_jax.training.config import base_config


def get_config():
    c = base_config()
    c.model = "resnet50"
    c.model_overrides.head_hidden = 1024
    c.num_classes = 10
    c.dataset = "fashion_mnist"
    c.channels = 3
    c.init_from = ""  # set on the command line: the converted weights' directory
    c.freeze = "backbone"
    c.test_every_period = True  # reported only: the last step is the model
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.weight_decay = 0.0
    c.schedule = "cosine"
    c.num_epochs = 5
    c.batch_size = 64
    c.augment = "flip"
    return c
