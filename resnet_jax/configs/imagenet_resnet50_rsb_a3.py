"""ResNet-50 on ImageNet, procedure A3 of "ResNet strikes back" (Wightman, Touvron and Jegou
2021, Table 1): 100 epochs at 160 pixels, tested at 224, LAMB at 8e-3 with weight decay
0.02, no stochastic depth, no repeated augmentation, RandAugment magnitude 6, mixup 0.1,
CutMix 1.0, BCE with target threshold 0.2 (the shared recipe: resnet_jax/configs/common.py).

    python -m experiments.train --config experiments/configs/imagenet_resnet50_rsb_a3.py \
        --workdir runs/rsb_a3 --config.data_dir=DIR_WITH_TFDS_IMAGENET2012

Expected: 78.1% top-1 on ImageNet-val at 224 (the paper's Table 1; timm's resnet50.a3_in1k).
Not measured here: it needs the ImageNet archives and several accelerators. The paper's
RandAugment draws its magnitude around 6 (std 0.5); this RandAugment uses the fixed magnitude.
"""

from resnet_jax.configs.common import resnet_strikes_back


def get_config():
    return resnet_strikes_back(epochs=100, learning_rate=8e-3, weight_decay=0.02,
                               image_size=160, drop_path_rate=0.0, num_repeats=1,
                               rand_augment_magnitude=6, mixup_alpha=0.1)
