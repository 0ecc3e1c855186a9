"""ResNet-50 on ImageNet, procedure A1 of "ResNet strikes back" (Wightman, Touvron and Jegou
2021, Table 1): 600 epochs at 224, LAMB at 5e-3 with weight decay 0.01, stochastic depth
0.05, repeated augmentation (3 copies), RandAugment magnitude 7, mixup 0.2, CutMix 1.0, BCE
with target threshold 0.2 (the shared recipe: resnet_jax/configs/common.py).

    python -m experiments.train --config experiments/configs/imagenet_resnet50_rsb_a1.py \
        --workdir runs/rsb_a1 --config.data_dir=DIR_WITH_TFDS_IMAGENET2012

Expected: 80.4% top-1 on ImageNet-val at 224 (the paper's Table 1; timm's resnet50.a1_in1k).
Not measured here: 600 epochs need the ImageNet archives and many accelerators. The paper's
RandAugment draws its magnitude around 7 (std 0.5, timm's rand-m7-mstd0.5-inc1); this
RandAugment uses the fixed magnitude.
"""

from resnet_jax.configs.common import resnet_strikes_back


def get_config():
    return resnet_strikes_back(epochs=600, learning_rate=5e-3, weight_decay=0.01,
                               image_size=224, drop_path_rate=0.05, num_repeats=3,
                               rand_augment_magnitude=7, mixup_alpha=0.2)
