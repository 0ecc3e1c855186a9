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


def resnet_strikes_back(epochs: int, learning_rate: float, weight_decay: float,
                        image_size: int, drop_path_rate: float, num_repeats: int,
                        rand_augment_magnitude: int, mixup_alpha: float):
    """ResNet-50 on ImageNet with the procedures of Wightman, Touvron and Jegou 2021 ("ResNet
    strikes back", Table 1), what their A1/A2/A3 share: LAMB with a 5-epoch warm-up and a
    cosine decay, batch 2048, binary cross-entropy with targets thresholded at 0.2 (timm's
    BinaryCrossEntropy target_threshold), no label smoothing, random-resized crop + flip,
    RandAugment with 2 operations, CutMix 1.0 and mixup, one of the two per batch, bicubic
    resizing, a 0.95 centre crop at test time at 224, no EMA, weight decay on kernels only
    (timm's default filter of biases and norms), mixed precision (bfloat16 here)."""
    c = base_config()
    c.model = "resnet50"
    c.dataset = "imagenet2012"
    c.eval_split = "validation"  # ImageNet's test labels are not public
    c.validation_split = 0.01  # held out of train for model selection
    c.image_size = image_size
    c.eval_image_size = 224
    c.eval_crop_pct = 0.95
    c.interpolation = "bicubic"
    c.batch_size = 2048
    c.eval_batch_size = 250
    c.num_epochs = epochs
    c.optimizer = "lamb"
    c.learning_rate = learning_rate
    c.weight_decay = weight_decay
    c.weight_decay_mode = "decoupled"
    c.schedule = "cosine"
    c.warmup_epochs = 5.0
    c.loss = "sigmoid_cross_entropy"
    c.bce_target_threshold = 0.2
    c.augment = "inception"
    c.auto_augment = "rand_augment"
    c.rand_augment_num_ops = 2
    c.rand_augment_magnitude = rand_augment_magnitude
    c.mixup_alpha = mixup_alpha
    c.cutmix_alpha = 1.0
    c.drop_path_rate = drop_path_rate
    c.num_repeats = num_repeats
    c.dtype = "bfloat16"
    c.cpu_kernels = False
    c.log_every_steps = 100
    c.checkpoint_every_steps = 2000
    return c
