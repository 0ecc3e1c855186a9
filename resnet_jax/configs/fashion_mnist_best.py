"""Fashion-MNIST near its state of the art on a 2-core CPU: ResNet-8 at twice the main job's
width (`fashion_mnist_wide_resnet8`, 1.2M parameters), 52 epochs of SGD with Nesterov
momentum and a one-cycle schedule to 0.2, weight decay 5e-4, label smoothing 0.1, pad-2
crops and flips, an exponential moving average of the weights (decay 0.999); predictions
average each image's and its mirror image's probabilities (`eval_flip`) and, at half the
weight, over the four views moved one pixel (`eval_shift`); convolutions multiply bfloat16
operands and accumulate in float32 (`cpu_conv_dtype`). 6,000 training images are held out:
every 13 epochs the trained and the EMA weights are evaluated on them, and the model handed
over is the better of the two at the best evaluation (`selection_weights="either"`); the
test split is evaluated once, after the last step, and decides nothing.

    python -m experiments.train --config experiments/configs/fashion_mnist_best.py --workdir runs/fashion_mnist_best

Expected: about 94.7% test accuracy for the selected model: 94.70% (the trained weights of
the last step, val 95.30% against the EMA's 95.23%) from a 52 min 7 s training command on a
2-core AMD EPYC of family 25, a clone of 43bf822 with random erasing off as committed since,
2026-12-07, at 914-978 images/s. Earlier versions on the same kind of machine: random
erasing 0.25, 94.59% in 46 min 20 s (a faster hour, 1,055-1,095 images/s); flip-only views
and evaluations every 4 epochs, 94.62% in 56 min 21 s; 44 epochs, 94.45% in 44 min 39 s; 56
float32 epochs, 94.59% in 112 minutes. RESULTS.md has the figures and the plot of test
accuracy against time beside the main job's. Anchors: Zalando's benchmark lists WRN-28-10 at
95.9% (96.3% with random erasing) after hundreds of GPU epochs; the seed article's ResNet-50
91.4% after 400.
"""

from resnet_jax.configs import fashion_mnist


def get_config():
    c = fashion_mnist.get_config()  # the main job's optimizer, schedule and label smoothing
    c.model = "fashion_mnist_wide_resnet8"
    c.num_epochs = 52
    c.learning_rate = 0.2  # the main job's, set here as this recipe was measured with it
    c.augment = "crop_flip"
    # no random erasing: with p 0.25 the same run (seed 0) ended at 95.20% (trained) and
    # 95.13% (EMA) on validation, without it at 95.30% and 95.23% (train accuracy 93.97
    # against 95.37%: at 52 epochs it held the net back); one pair of runs, RESULTS.md
    c.ema_decay = 0.999
    c.validation_split = 0.1
    # the EMA lags the trained weights once the one-cycle rate has annealed (val 94.90 against
    # 94.78, 95.07 against 94.97, 95.03 against 94.98 at the end of the last three runs), so
    # each evaluation offers both, and the better on validation is kept
    c.selection_metric = "val_accuracy"
    c.selection_weights = "either"
    c.eval_flip = True
    # ... and, at half the weight, the four views moved one pixel (the main job's views): on
    # the validation split of d5c3b41's run of this recipe, 95.20% against flip-only 94.95%
    # for the trained weights, 95.13% against 94.87% for the EMA (two pixels: 95.05% and
    # 95.03%; RESULTS.md). They cost five times the passes, so the validation split alone is
    # evaluated, four times (the one-cycle rate anneals to zero, and the last evaluation was
    # the best in every run of this recipe): 4 x 120,000 passes against the 13 x 64,000 of
    # the flip-only evaluations of both splits every 4 epochs before.
    c.eval_shift = 1
    c.eval_every_epochs = 13
    c.test_every_period = False  # the test split is evaluated once, after the last step
    c.checkpoint_every_epochs = 4  # as before, so that a crash loses at most 4 epochs
    # bfloat16 operands for oneDNN's convolutions, float32 accumulation: 1.4-1.5x the
    # float32 step on a family-25 EPYC (docs/cpu_speed_log.md section 16)
    c.cpu_conv_dtype = "bfloat16"
    return c
