"""The main job: a small residual net (ResNet-8) on real Fashion-MNIST, SGD with Nesterov
momentum and a one-cycle schedule to 0.2, weight decay 5e-4, label smoothing 0.1, flips,
9 epochs, predictions averaged over each image and its mirror and, at half the weight, over
the four views moved one pixel, the test split evaluated once at the end; convolutions with
bfloat16 operands on CPUs that multiply them in hardware.

    python -m experiments.train --config experiments/configs/fashion_mnist.py --workdir runs/fashion_mnist

Expected: 93.4-93.6% test accuracy (93.504 ± 0.089% over seeds 0-4, measured on 2026-12-07
with experiments.sweep on a 2-core AMD EPYC of family 26, training loops of 93-103 s; the
same accuracies on one of family 25, loops of 158-172 s) in
1.5-5 minutes of training on a 2-core CPU, depending on the CPU and the VM's speed that day
(RESULTS.md), against the 91.3-91.4% of the seed article's ResNet-50 after 400 epochs.
"""

from resnet_jax.training.config import base_config


def get_config():
    c = base_config()
    c.model = "fashion_mnist_resnet8"
    c.dataset = "fashion_mnist"
    c.batch_size = 128
    # 9 epochs: on 6,000 held-out training images, 94.038% against 8 epochs' 93.927% over
    # seeds 4-9 (RESULTS.md); the time of the ninth comes from evaluating the test split once
    # instead of after every epoch (loops 94.17/95.47 s against 92.84/93.28 s, run in turn)
    c.num_epochs = 9
    c.optimizer = "sgd"
    c.nesterov = True
    # Peak rate 0.2: on 6,000 held-out training images (flip-averaged predictions) 0.4 led by
    # 0.10 points over seeds 0-3 and trailed by 0.07 over seeds 4-9: level over 10 seeds
    # (93.833% against 93.832%), so the rate stays where it was measured first. Label
    # smoothing 0.2, weight decay 1e-3 and 2.5e-4 and zero-initialised residual branches were
    # worse on the same images (RESULTS.md).
    c.learning_rate = 0.2
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.schedule = "onecycle"
    # Flips only: with 8-9 epochs this small net underfits, and pad-and-crop cost accuracy
    # (92.4% after 10 epochs with crops against 93.1% after 8 without, see RESULTS.md).
    c.augment = "flip"
    # Label smoothing 0.1 (Szegedy et al. 2016): 93.22% against 92.92% without it, same
    # seed and time (RESULTS.md).
    c.label_smoothing = 0.1
    # oneDNN's convolutions multiply bfloat16 operands, accumulating in float32 (float32
    # with a warning on CPUs without AVX512-BF16 or AMX): 256.6 s and 93.29% against 322.5 s
    # and 93.22% with float32 on a family-25 EPYC (RESULTS.md).
    c.cpu_conv_dtype = "bfloat16"
    # Predictions average each image's and its mirror image's class probabilities: on 6,000
    # held-out training images (validation_split=0.1), +0.21 points over 14 runs (every run
    # gained, 0.02-0.40), for one more forward pass per evaluation (RESULTS.md).
    c.eval_flip = True
    # ... and, at half the weight, the four views moved one pixel up, down, left and right
    # (each with its mirror): on 6,000 held-out training images, +0.069 points over 12 runs
    # of seeds 4-15 (9 up, 3 down; +0.061 on seeds 10-15, measured after the choice), for
    # four more flip-averaged passes over the test split, once (RESULTS.md)
    c.eval_shift = 1
    # No decision is taken on held-out data (one-cycle, the last step is the model); the
    # test split is evaluated once, after the last step (each evaluation of it took about
    # 0.9 s, a tenth of an epoch's training); --config.test_every_period=True draws its curve.
    c.test_every_period = False
    return c
