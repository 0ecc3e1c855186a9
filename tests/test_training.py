"""Specification of the training engine, its configs and the main job."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import types

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import resnet_jax
from conftest import ROOT
from resnet_jax.data import pipeline
from resnet_jax.data.sources import DATASETS, DEBIAN_FASHION_MNIST, ArraySource, load_source, read_idx
from resnet_jax.training import experiment, loop
from resnet_jax.training.evaluation import evaluate
from resnet_jax.training.losses import get_loss, softmax_cross_entropy
from resnet_jax.training.checkpoint import Checkpointer
from resnet_jax.training.config import base_config, validate_config
from resnet_jax.training.durations import durations
from resnet_jax.training.optim import kernel_mask, make_optimizer
from resnet_jax.training.state import create_train_state
from resnet_jax.training.steps import make_eval_step, make_train_step, topk_correct

CONFIG_DIR = os.path.join(ROOT, "experiments", "configs")


@pytest.fixture
def real_fashion_mnist():
    """The Debian package's files; experiments/setup.sh installs them, so absence is a failure."""
    if not os.path.exists(os.path.join(DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz")):
        pytest.fail("real Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")


def load_config(name: str) -> ml_collections.ConfigDict:
    return resnet_jax.load_config(name)


def quick_fashion_config(**overrides) -> ml_collections.ConfigDict:
    c = load_config("fashion_mnist")
    c.train_subset, c.eval_subset = 1024, 1000
    c.batch_size, c.eval_batch_size = 64, 300
    c.num_epochs = 2
    c.progress_bar = False
    c.update(overrides)
    return c


# --- configs ---------------------------------------------------------------------------

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
                 if not os.path.basename(p).startswith(("_", "common")))


def test_the_experiment_configs_exist():
    expected = {"fashion_mnist", "fashion_mnist_resnet50", "mnist_preact", "cifar10_resnet20",
                "cifar10_resnet32", "cifar10_resnet44", "cifar10_resnet56", "cifar10_resnet110",
                "cifar10_resnet34", "cifar10_resnet50", "imagenet_resnet50", "imagenet_alexnet"}
    assert expected <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_its_model_optimizer_and_schedule(name):
    config = load_config(name)
    module_doc = open(os.path.join(CONFIG_DIR, f"{name}.py")).read()
    assert "python -m experiments.train --config" in module_doc and "Expected" in module_doc
    validate_config(config)
    info = DATASETS[config.dataset]
    model = experiment.build_model(config, config.num_classes or info.num_classes)
    shape = info.image_shape or (config.image_size, config.image_size, 3)
    experiment.check_input_shape(model, config.model, shape)
    tx, schedule = make_optimizer(config, durations(config, 100))
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}, "bn": {"scale": jnp.ones(2)}}
    state = tx.init(params)
    updates, _ = tx.update(params, state, params, value=jnp.float32(1.0))
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
    assert float(schedule(0)) >= 0 and np.isfinite(float(schedule(10_000)))


@pytest.mark.parametrize("field,value,message", [
    ("model", "resnet19", "unknown model 'resnet19'"),
    ("dataset", "imagenet21k", "dataset='imagenet21k'; expected one of"),
    ("learning_rate", -0.1, "learning_rate=-0.1 must be a positive number"),
    ("batch_size", 0, "batch_size=0 must be a positive number"),
    ("optimizer", "rmsprop", "optimizer='rmsprop'"),
    ("momentum", 1.5, "momentum=1.5 must be in"),
    ("model", "alexnet", r"model 'alexnet' cannot take images of shape \(28, 28, 1\)"),
])
def test_a_bad_config_value_fails_before_training_naming_it(field, value, message, tmp_path):
    config = quick_fashion_config(**{field: value})
    with pytest.raises(ValueError, match=message):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


# --- data ------------------------------------------------------------------------------

def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_are_read_and_truncation_is_named(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8) % 10
    _write_idx(tmp_path / "train-images-idx3-ubyte", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    source = load_source("mnist", "train", str(tmp_path), "idx")
    np.testing.assert_array_equal(source.images[..., 0], images)
    np.testing.assert_array_equal(source.labels, labels)
    data = open(tmp_path / "train-images-idx3-ubyte", "rb").read()
    open(tmp_path / "train-images-idx3-ubyte", "wb").write(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(tmp_path / "train-images-idx3-ubyte"))


def test_tfds_not_prepared_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not prepared.*tfds build cifar10 "
                       r"--data_dir=DIR --file_format=array_record.*--config.data_dir"):
        load_source("cifar10", "train", str(tmp_path), "tfds")


def test_tfds_prepared_as_tfrecord_says_to_rebuild_as_array_record(tmp_path):
    version = tmp_path / "cifar10" / "3.0.2"
    version.mkdir(parents=True)
    # what `tfds build` writes without --file_format: TFRecord shards, no fileFormat key
    (version / "dataset_info.json").write_text('{"name": "cifar10", "version": "3.0.2"}')
    (version / "cifar10-train.tfrecord-00000-of-00001").write_bytes(b"")
    with pytest.raises(ValueError, match=r"prepared in .*3.0.2 \(tfrecord\).*ArrayRecord.*"
                       r"--file_format=array_record"):
        load_source("cifar10", "train", str(tmp_path), "tfds")


def test_tfds_with_a_package_missing_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(ImportError, match=r"needs a package that is missing.*"
                       r"tensorflow_datasets.*requirements.txt"):
        load_source("cifar10", "train", str(tmp_path), "tfds")


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*cifar10"):
        load_source("svhn", "train")


def _toy_source(n=100, shape=(8, 8, 1)):
    rng = np.random.default_rng(0)
    return ArraySource(rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                       (np.arange(n) % 10).astype(np.int32))


def test_train_batches_resume_mid_run_with_the_same_order():
    source, info = _toy_source(shape=(8, 8, 3)), DATASETS["cifar10"]
    fresh = pipeline.train_batches(source, info, pipeline.TrainInput(16, 3, augment="crop_flip"))
    first = [next(fresh) for _ in range(9)]  # crosses the epoch boundary (6 steps/epoch)
    resumed = pipeline.train_batches(source, info,
                                     pipeline.TrainInput(16, 3, augment="crop_flip"), start_step=5)
    for expected in first[5:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])
    assert not np.array_equal(first[0]["label"], first[6]["label"])  # new permutation per epoch


def test_process_shards_concatenate_to_the_global_batch():
    source, info = _toy_source(shape=(8, 8, 3)), DATASETS["cifar10"]
    whole = next(pipeline.train_batches(source, info,
                                        pipeline.TrainInput(16, 1, augment="crop_flip")))
    parts = [next(pipeline.train_batches(source, info,
                                         pipeline.TrainInput(16, 1, augment="crop_flip",
                                                             process_index=i,
                                                             process_count=2))) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
    with pytest.raises(ValueError, match="batch size 16 does not divide across 3 processes"):
        next(pipeline.train_batches(source, info, pipeline.TrainInput(16, 1, process_count=3)))


def test_eval_batches_cover_every_example_once_with_a_mask():
    source, info = _toy_source(n=103), DATASETS["mnist"]
    batches = list(pipeline.eval_batches(source, info, pipeline.EvalInput(25)))
    assert len(batches) == 5 and all(len(b["label"]) == 25 for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 103 and mask[:103].all() and not mask[103:].any()
    labels = np.concatenate([b["label"] for b in batches])[:103]
    np.testing.assert_array_equal(labels, source.labels)


# --- steps and optimizers ---------------------------------------------------------------

def test_cross_entropy_label_smoothing_and_topk():
    logits = jnp.array([[4.0, 1.0, 0.0, -1.0, -2.0, -3.0]])
    labels = jnp.array([0])
    plain = softmax_cross_entropy(logits, labels)
    smooth = softmax_cross_entropy(logits, labels, 0.1)
    np.testing.assert_allclose(plain, -jax.nn.log_softmax(logits)[:, 0], rtol=1e-6)
    assert float(smooth[0]) > float(plain[0])
    assert float(topk_correct(logits, jnp.array([4]), 5)[0]) == 1.0
    assert float(topk_correct(logits, jnp.array([5]), 5)[0]) == 0.0
    assert float(topk_correct(logits, jnp.array([1]), 1)[0]) == 0.0


def _opt_config(**kw):
    c = base_config()
    c.update(kw)
    return c


def test_checkpoints_every_n_epochs_follow_the_epoch_length_and_exclude_steps():
    from resnet_jax.configs import load_config
    from resnet_jax.data.order import steps_per_epoch

    c = load_config("fashion_mnist_best")  # 54,000 training images kept of 60,000
    kept = 60_000 - round(60_000 * c.validation_split)
    assert durations(c, steps_per_epoch(kept, 128)).checkpoint_every_steps == 4 * 421
    c = load_config("fashion_mnist_best", batch_size=64)
    assert durations(c, steps_per_epoch(kept, 64)).checkpoint_every_steps == 4 * 843
    assert durations(load_config("fashion_mnist"), 468).checkpoint_every_steps == 0
    with pytest.raises(ValueError, match="checkpoint_every_steps=100 and checkpoint_every_"
                                         "epochs=4: set one of them and the other to 0"):
        load_config("fashion_mnist_best", checkpoint_every_steps=100)
    c = load_config("fashion_mnist_best", checkpoint_every_steps=100, checkpoint_every_epochs=0)
    assert durations(c, steps_per_epoch(kept, 128)).checkpoint_every_steps == 100


def test_warmup_start_cosine_end_and_lars_trust_are_config_fields():
    c = _opt_config(schedule="cosine", learning_rate=0.4, warmup_epochs=1, num_epochs=3,
                    warmup_init_fraction=0.25, cosine_end_fraction=0.1)
    _, schedule = make_optimizer(c, durations(c, 10))
    np.testing.assert_allclose([schedule(0), schedule(10), schedule(30)], [0.1, 0.4, 0.04],
                               rtol=1e-6)
    c = _opt_config(schedule="piecewise", learning_rate=0.4, warmup_epochs=1, lr_boundaries=(50,),
                    warmup_init_fraction=0.5)
    _, schedule = make_optimizer(c, durations(c, 10))
    assert float(schedule(0)) == pytest.approx(0.2)
    updates = {}
    for trust, eps in ((0.001, 0.0), (0.01, 0.0), (0.001, 1.0)):
        c = _opt_config(optimizer="lars", learning_rate=1.0, momentum=0.0, weight_decay=0.0,
                        schedule="constant", lars_trust_coefficient=trust, lars_eps=eps)
        tx, _ = make_optimizer(c, durations(c, 10))
        p = {"w": {"kernel": jnp.array([[3.0, 4.0]])}}  # |p| = 5
        g = {"w": {"kernel": jnp.array([[0.6, 0.8]])}}  # |g| = 1
        u, _ = tx.update(g, tx.init(p), p)
        updates[(trust, eps)] = np.asarray(u["w"]["kernel"])
    # optax's trust ratio: coefficient * |p| / (|g| + eps)
    np.testing.assert_allclose(updates[(0.001, 0.0)], -0.001 * 5 * np.array([[0.6, 0.8]]),
                               rtol=1e-5)
    np.testing.assert_allclose(updates[(0.01, 0.0)], 10 * updates[(0.001, 0.0)], rtol=1e-5)
    assert np.abs(updates[(0.001, 1.0)]).sum() < np.abs(updates[(0.001, 0.0)]).sum()


def test_piecewise_schedule_divides_by_ten_at_the_given_epochs():
    c = _opt_config(schedule="piecewise", learning_rate=0.1, lr_boundaries=(2, 4),
                    lr_boundaries_unit="epochs")
    _, schedule = make_optimizer(c, durations(c, 10))
    np.testing.assert_allclose([schedule(s) for s in (0, 19, 20, 39, 40)],
                               [0.1, 0.1, 0.01, 0.01, 0.001], rtol=1e-6)


def test_cosine_schedule_warms_up_linearly_then_decays():
    c = _opt_config(schedule="cosine", learning_rate=0.4, warmup_epochs=1, num_epochs=3)
    _, schedule = make_optimizer(c, durations(c, 10))
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.2, 0.4], rtol=1e-6)
    assert float(schedule(29)) < 0.01


def test_onecycle_rises_and_falls_on_cosines_as_optax_or_on_straight_lines():
    c = _opt_config(schedule="onecycle", learning_rate=0.2, num_epochs=8)
    _, cosine = make_optimizer(c, durations(c, 10))  # 80 steps, the peak at step 20
    steps = np.arange(85)
    np.testing.assert_array_equal(jax.vmap(cosine)(steps),
                                  jax.vmap(optax.cosine_onecycle_schedule(80, 0.2, 0.25))(steps))
    c.onecycle_anneal = "linear"
    _, linear = make_optimizer(c, durations(c, 10))
    # 0.2 / 25 at the start, the peak after a quarter, half-way down after five eighths,
    # 0.2 / 25 / 1e4 at the end
    np.testing.assert_allclose([linear(s) for s in (0, 10, 20, 50, 80)],
                               [0.008, 0.104, 0.2, 0.1, 8e-7], rtol=1e-5)
    assert float(linear(65)) > float(cosine(65))  # the straight line lies above the cosine


def test_weight_decay_is_masked_to_kernels_and_l2_differs_from_decoupled():
    params = {"conv": {"kernel": jnp.ones((2, 2))}, "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    assert kernel_mask(params) == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    out = {}
    for mode in ("l2", "decoupled"):
        c = _opt_config(optimizer="adam", learning_rate=0.1, weight_decay=0.5,
                        weight_decay_mode=mode, schedule="constant")
        tx, _ = make_optimizer(c, durations(c, 10))
        updates, _ = tx.update(zeros, tx.init(params), params)
        assert not np.any(updates["bn"]["scale"]) and not np.any(updates["bn"]["bias"])
        out[mode] = updates["conv"]["kernel"]
    np.testing.assert_allclose(out["decoupled"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    assert not np.allclose(out["l2"], out["decoupled"])  # L2 goes through Adam's scaling


def _decay_closed_form(optimizer: str, mode: str, nesterov: bool, steps: int, lr: float,
                       wd: float, p0: float, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8):
    """A kernel entry with zero loss gradient after `steps` steps, from the update rules
    written out in float64 (weight decay the only force on it)."""
    p, m, v = p0, 0.0, 0.0
    for t in range(1, steps + 1):
        if mode == "decoupled":
            # the gradient's path sees zero: no momentum, Adam or LARS term moves p
            p = p - lr * wd * p
            continue
        g = wd * p  # L2: the decay is the gradient
        if optimizer == "sgd":
            m = momentum * m + g
            p = p - lr * ((g + momentum * m) if nesterov else m)
        elif optimizer == "adam":
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        else:  # lars: trust ratio 0.001 |p| / |g| on a one-entry kernel, then lr, momentum
            u = -lr * g * (0.001 * abs(p) / abs(g))
            m = momentum * m + u
            p = p + ((u + momentum * m) if nesterov else m)
    return p


@pytest.mark.parametrize("optimizer,nesterov,mode", [
    (o, n, m) for o, n in (("sgd", False), ("sgd", True), ("adam", False), ("adamw", False),
                           ("lars", False), ("lars", True))
    for m in ("l2", "decoupled") if not (o == "adamw" and m == "l2")])
def test_weight_decay_is_applied_exactly_once(optimizer, nesterov, mode):
    """A kernel with zero gradient decays as the closed form of its mode says, over five
    steps; a bias (masked) does not move."""
    lr, wd, p0 = 0.1, 0.05, 1.5
    c = _opt_config(optimizer=optimizer, nesterov=nesterov, weight_decay_mode=mode,
                    learning_rate=lr, weight_decay=wd, schedule="constant", momentum=0.9)
    tx, _ = make_optimizer(c, durations(c, 10))
    params = {"dense": {"kernel": jnp.full((1, 1), p0), "bias": jnp.full((1,), p0)}}
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(5):
        updates, state = tx.update(zeros, state, params)
        params = optax.apply_updates(params, updates)
    expected = _decay_closed_form("adam" if optimizer == "adamw" else optimizer, mode,
                                  nesterov, 5, lr, wd, p0)
    np.testing.assert_allclose(float(params["dense"]["kernel"][0, 0]), expected, rtol=1e-5)
    assert float(params["dense"]["bias"][0]) == p0
    if mode == "decoupled" or optimizer == "sgd":
        # twice the decay would be visibly off here (Adam's and LARS' L2 steps do not scale
        # with the decay: they normalise the gradient, which is the decay alone)
        twice = _decay_closed_form("adam" if optimizer == "adamw" else optimizer, mode,
                                   nesterov, 5, lr, 2 * wd, p0)
        assert abs(expected - twice) > 1e-3


def test_the_eval_batch_is_rounded_up_to_a_multiple_of_the_devices():
    c = resnet_jax.load_config("imagenet_resnet50", parallel="pmap")  # eval_batch_size=250
    assert experiment.eval_batch_size(c, 8) == 256 and experiment.eval_batch_size(c, 16) == 256
    assert experiment.eval_batch_size(c, 5) == 250
    c.parallel = "single"
    assert experiment.eval_batch_size(c, 8) == 250


def test_adamw_takes_only_decoupled_decay():
    c = _opt_config(optimizer="adamw", weight_decay=0.01, weight_decay_mode="l2")
    with pytest.raises(ValueError, match=r"optimizer='adamw' is Adam with decoupled weight "
                       r"decay, but weight_decay_mode='l2'"):
        make_optimizer(c, durations(c, 10))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "lars"])
def test_each_optimizer_descends_a_quadratic(optimizer):
    # LARS scales each layer's step by 0.001 * |w| / |g| (its trust ratio): a larger rate
    lr = 20.0 if optimizer == "lars" else 0.05
    c = _opt_config(optimizer=optimizer, learning_rate=lr, schedule="constant", weight_decay=0.0,
                    nesterov=True, grad_clip=10.0, weight_decay_mode="decoupled")
    tx, _ = make_optimizer(c, durations(c, 10))
    params = {"w": {"kernel": jnp.array([[3.0, -2.0]])}}
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"]["kernel"] ** 2)
    start = loss(params)
    for _ in range(20):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 0.5 * float(start)


def test_train_step_is_traced_once_and_eval_is_exact(real_fashion_mnist):
    c = quick_fashion_config(model="cifar_resnet20", schedule="constant", learning_rate=0.05)
    c.model_overrides = ml_collections.ConfigDict({"stage_sizes": (1, 1, 1)})
    exp = experiment.setup(c, load_train=False)
    state = create_train_state(exp.model, exp.tx, jax.random.key(0), exp.image_shape)
    step = jax.jit(chex.assert_max_traces(
        make_train_step(exp.model, exp.tx, exp.schedule, get_loss(c.loss)), n=1))
    images = np.random.default_rng(0).normal(size=(8, 28, 28, 1)).astype(np.float32)
    batch = {"image": images, "label": np.arange(8, dtype=np.int32)}
    for _ in range(3):
        state, m = step(state, batch, jax.random.key(1))
    assert int(state.step) == 3 and float(m["learning_rate"]) == pytest.approx(0.05)
    # evaluation over 1000 examples in batches of 300: every example counted once, and the
    # accuracy equals the one computed on the whole split at once
    eval_step = jax.jit(make_eval_step(exp.model, exp.num_classes, get_loss(c.loss),
                                       preprocess=experiment.device_input(exp.config, False)))
    result = evaluate(eval_step, state, exp.eval_source, exp.info,
                      experiment.eval_input(c, c.eval_batch_size))
    assert result["count"] == 1000 and int(result["confusion"].sum()) == 1000
    x = (exp.eval_source.images.astype(np.float32) / 255 - 0.2860) / 0.3530
    logits = exp.model.apply({"params": state.params, "batch_stats": state.batch_stats}, x)
    correct = int(np.sum(np.argmax(logits, -1) == exp.eval_source.labels))
    assert result["accuracy"] * 1000 == pytest.approx(correct, abs=1e-6)


def test_eval_flip_averages_the_probabilities_of_each_image_and_its_mirror():
    """eval_flip: the eval step's predictions are the mean of the class probabilities of the
    image and of its left-right mirror (NHWC: the W axis), not of either alone."""
    from resnet_jax.models import get_model
    from resnet_jax.training.steps import eval_logits

    model = get_model("cifar_resnet20", num_classes=10, stage_sizes=(1, 1, 1))
    rng = np.random.default_rng(3)
    images = rng.normal(size=(6, 16, 16, 3)).astype(np.float32)
    variables = model.init(jax.random.key(0), images, train=False)
    plain = jax.nn.softmax(model.apply(variables, images, train=False))
    mirror = jax.nn.softmax(model.apply(variables, images[:, :, ::-1], train=False))
    assert not np.allclose(plain, mirror, atol=1e-3)  # the mirror is a different input
    averaged = np.exp(eval_logits(model, variables, images, flip=True))
    np.testing.assert_allclose(averaged, (plain + mirror) / 2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eval_logits(model, variables, images), model.apply(
        variables, images, train=False), rtol=1e-6)
    # the eval step reports the flip-averaged loss
    state = types.SimpleNamespace(params=variables["params"],
                                  batch_stats=variables["batch_stats"])
    labels = rng.integers(0, 10, 6).astype(np.int32)
    batch = {"image": images, "label": labels}
    flipped = make_eval_step(model, 10, get_loss("softmax_cross_entropy"), flip=True)(state, batch)
    expected = -np.sum(np.log((plain + mirror)[np.arange(6), labels] / 2))
    assert float(flipped["loss"]) == pytest.approx(expected, rel=1e-5)


def test_eval_shift_weighs_the_image_half_and_four_moved_views_an_eighth_each():
    """eval_shift: besides the image (and its mirror under eval_flip), the views moved by
    `shift` pixels up, down, left and right, edge rows repeated, each weighing 1/8; the same
    views as NumPy's edge padding, and an error for a shift as large as the image."""
    from resnet_jax.models import get_model
    from resnet_jax.training.steps import eval_logits, shifted

    rng = np.random.default_rng(4)
    images = rng.normal(size=(5, 9, 11, 3)).astype(np.float32)

    def moved(x, pixels, axis):  # NumPy: pad the edge, then cut the window
        widths = [(0, 0)] * 4
        widths[axis] = (max(pixels, 0), max(-pixels, 0))
        padded = np.pad(x, widths, mode="edge")
        start = max(-pixels, 0)
        return np.take(padded, np.arange(start, start + x.shape[axis]), axis=axis)

    for axis in (1, 2):
        for pixels in (1, -1, 2, -3, 0):
            np.testing.assert_array_equal(shifted(jnp.asarray(images), pixels, axis),
                                          moved(images, pixels, axis))
    assert not np.array_equal(moved(images, 1, 1), images)
    with pytest.raises(ValueError, match="a shift of -9 pixels needs images larger than 9"):
        shifted(jnp.asarray(images), -9, 1)

    model = get_model("cifar_resnet20", num_classes=10, stage_sizes=(1, 1, 1))
    variables = model.init(jax.random.key(0), images, train=False)
    p = lambda x: np.asarray(jax.nn.softmax(model.apply(variables, x, train=False)))  # noqa
    views = [moved(images, s, a) for a in (1, 2) for s in (1, -1)]
    pair = lambda x: (p(x) + p(x[:, :, ::-1])) / 2  # noqa: E731
    np.testing.assert_allclose(np.exp(eval_logits(model, variables, images, True, 1)),
                               pair(images) / 2 + sum(pair(v) for v in views) / 8,
                               rtol=1e-5, atol=1e-6)
    alone = np.exp(eval_logits(model, variables, images, shift=1))
    np.testing.assert_allclose(alone, p(images) / 2 + sum(p(v) for v in views) / 8,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(alone, p(images), atol=1e-4)  # the moved views change the answer
    # the views run through one traced copy of the net; unrolled (for exporters), one each
    np.testing.assert_allclose(eval_logits(model, variables, images, True, 1, unroll=True),
                               eval_logits(model, variables, images, True, 1), rtol=1e-5,
                               atol=1e-6)
    convs = lambda **kw: str(jax.make_jaxpr(  # noqa: E731
        lambda x: eval_logits(model, variables, x, **kw))(images)).count("conv_general")
    assert convs(flip=True, shift=1) == convs() > 0
    assert convs(flip=True, shift=1, unroll=True) == 10 * convs()
    # the eval step takes the shift: its loss is the averaged probabilities' loss
    state = types.SimpleNamespace(params=variables["params"],
                                  batch_stats=variables["batch_stats"])
    labels = rng.integers(0, 10, 5).astype(np.int32)
    sums = make_eval_step(model, 10, get_loss("softmax_cross_entropy"), shift=1)(
        state, {"image": images, "label": labels})
    assert float(sums["loss"]) == pytest.approx(-np.sum(np.log(alone[np.arange(5), labels])),
                                                rel=1e-5)


# --- whole runs ---------------------------------------------------------------------------

def test_a_few_steps_on_cifar10_prepared_offline_lower_the_loss(tmp_path):
    from resnet_jax.data.tfds_offline import prepare

    rng = np.random.default_rng(0)

    def split(name, n):
        return lambda: ({"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                         "label": k % 10, "id": f"{name}_{k}"} for k in range(n))
    prepare("cifar10", {"train": split("train", 64), "test": split("test", 20)}, str(tmp_path))
    c = load_config("cifar10_resnet20")
    c.update(dict(batch_size=32, learning_rate=0.05, schedule="constant", num_steps=0, num_epochs=1,
                  weight_decay=0.0, augment="none", progress_bar=False, data_source="tfds",
                  data_dir=str(tmp_path), eval_batch_size=20))
    exp = experiment.setup(c)
    # the paper's recipe holds a tenth of train out for validation: 58 + 6 of the 64
    assert len(exp.train_source) == 58 and len(exp.val_source) == 6
    assert exp.image_shape == (32, 32, 3)
    state = create_train_state(exp.model, exp.tx, jax.random.key(0), exp.image_shape)
    step = jax.jit(make_train_step(exp.model, exp.tx, exp.schedule, get_loss(c.loss)))
    batch = next(pipeline.train_batches(exp.train_source, exp.info,
                                        pipeline.TrainInput(32, 0, augment="none")))
    losses = []
    for _ in range(8):
        state, m = step(state, batch, jax.random.key(0))
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses


def test_short_fashion_mnist_run_beats_chance_and_writes_everything(tmp_path, real_fashion_mnist):
    workdir = str(tmp_path / "run")
    record = loop.train_and_evaluate(quick_fashion_config(), workdir)
    assert record["test_accuracy"] > 0.6  # chance is 0.1
    assert record["test_count"] == 1000
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["epoch"] for r in lines] == [1, 2]
    for key in ("step", "epoch", "train_learning_rate", "train_loss", "train_accuracy", "test_loss",
                "test_accuracy", "images_per_second"):
        assert key in lines[-1]
    assert json.load(open(os.path.join(workdir, "config.json")))["model"] == "fashion_mnist_resnet8"
    for path in ("plots/curves.png", "plots/confusion_matrix.png"):
        assert os.path.getsize(os.path.join(workdir, path)) > 10_000
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert os.listdir(os.path.join(workdir, "checkpoints", "latest"))
    # no validation split in the main job: nothing is chosen, so no best checkpoint
    assert not os.listdir(os.path.join(workdir, "checkpoints", "best"))
    selected = json.load(open(os.path.join(workdir, "selected.json")))
    assert selected["by"] == "last step" and selected["test_accuracy"] == record["test_accuracy"]
    # evaluate.py on the run: JSON with top-1/top-5 and per-class accuracy
    out = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--workdir", workdir],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["count"] == 10_000 and 0.6 < result["top1_accuracy"] <= result["top5_accuracy"]
    assert set(result["per_class_accuracy"]) == set(DATASETS["fashion_mnist"].class_names)


def test_interrupted_and_resumed_run_ends_with_the_same_parameters(tmp_path, real_fashion_mnist):
    c = quick_fashion_config(train_subset=512, num_epochs=2, model="cifar_resnet20")
    c.model_overrides = ml_collections.ConfigDict({"stage_sizes": (1, 1, 1)})
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    loop.train_and_evaluate(c, straight)
    halted = ml_collections.ConfigDict(c.to_dict())
    halted.halt_after_steps = 11  # mid-epoch 2 (8 steps per epoch)
    loop.train_and_evaluate(halted, interrupted)
    loop.train_and_evaluate(c, interrupted)
    exp = experiment.setup(c, load_train=False)
    target = create_train_state(exp.model, exp.tx, jax.random.key(0), exp.image_shape)
    states = []
    for workdir in (straight, interrupted):
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
        states.append(ckpt.restore(target))
        ckpt.close()
    assert int(states[0].step) == int(states[1].step) == 16
    chex.assert_trees_all_close(states[0].params, states[1].params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(states[0].batch_stats, states[1].batch_stats, rtol=1e-6, atol=1e-7)


@pytest.mark.torch
def test_keras_peers_are_the_suites_nets_with_keras_hubs_resnet():
    """The Keras side of the speed suite: every net has the zoo's trainable parameter count,
    and ResNet-18 is keras-hub's own backbone (built by the suite's worker process, which
    sets KERAS_BACKEND=jax; here in a subprocess for the same reason)."""
    from benchmarks.speed_suite import SUITE
    from resnet_jax.models import get_model

    code = ("import json, numpy as np\n"
            "from benchmarks.keras_peers import PEERS\n"
            "from benchmarks.speed_suite import SUITE\n"
            "from resnet_jax.models import get_spec\n"
            "out = {}\n"
            "for name, shape, _ in SUITE:\n"
            "    m = PEERS[name](get_spec(name).num_classes, shape)\n"
            "    out[name] = [sum(int(np.prod(w.shape)) for w in m.trainable_weights),\n"
            "                 sorted({type(l).__module__.split('.')[0] for l in m.layers})]\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, KERAS_BACKEND="jax",
                                             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    keras_side = json.loads(proc.stdout.splitlines()[-1])
    for name, shape, _ in SUITE:
        variables = jax.eval_shape(lambda: get_model(name).init(
            jax.random.key(0), np.zeros((1, *shape), np.float32)))
        zoo = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
        assert keras_side[name][0] == zoo, name
    assert "keras_hub" in keras_side["resnet18"][1]
    assert "keras_hub" not in keras_side["cifar_resnet20"][1]


@pytest.mark.torch
def test_the_speed_suite_refuses_a_model_outside_it(tmp_path):
    """(The suite's run against its peers is tests/test_readme.py::test_against_torch.)"""
    from experiments import benchmark

    with pytest.raises(ValueError, match="not in the suite"):
        benchmark.main(["--against", "torch", "--models", "resnet9000", "--results-dir",
                        str(tmp_path)])


def test_the_accelerator_benchmark_knows_peaks_by_device_kind_and_refuses_unknown_names(
        capsys):
    """MFU's denominator: the dense peak of the device kind jax reports (H100 SXM before PCIe
    is not taken for it), none for a CPU unless given; unknown models and dtypes are errors
    naming them and what there is."""
    from benchmarks.accelerator import peak_flops
    from experiments import benchmark

    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.5e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "float32") == 494.5e12  # TF32
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert peak_flops("NVIDIA H200", "bfloat16") == 989.5e12
    assert peak_flops("TPU v4", "float32") is None
    assert peak_flops("cpu", "bfloat16") is None
    assert peak_flops("cpu", "bfloat16", override_tflops=2.0) == 2e12
    for args, message in ((["--models", "resnet9000"], "resnet9000"),
                          (["--dtypes", "float16"], "float16")):
        with pytest.raises(SystemExit):
            benchmark.main(["--accelerator", "--sizes", "tiny", *args])
        assert message in capsys.readouterr().err

def test_random_erasing_on_the_device_erases_about_its_probability_and_ignores_the_split():
    from resnet_jax.data.on_device import DeviceInput

    # std 1/255 and mean 0: the input is the grey levels themselves, so on constant images an
    # erased rectangle (random values) is what differs from 128
    prepare = DeviceInput((0.0,), (1 / 255,), erase=0.5)
    images = np.full((400, 32, 32, 3), 128, np.uint8)
    key = jax.random.key(7)
    erased = np.asarray(jax.jit(prepare)(images, key))
    np.testing.assert_array_equal(erased, np.asarray(prepare(images, key)))  # reproducible
    assert not np.array_equal(erased, np.asarray(prepare(images, jax.random.key(8))))
    # the draws of example i depend on i in the global batch, not on the device's slice
    np.testing.assert_array_equal(np.asarray(prepare(images[300:], key, 300)), erased[300:])
    np.testing.assert_allclose(np.asarray(prepare(images)), 128.0, atol=1e-3)  # no key: none
    changed = (np.abs(erased - 128.0) > 1e-3).any(axis=-1)  # (N, H, W): erased pixels
    hit = changed.any(axis=(1, 2))
    assert 0.4 < hit.mean() < 0.6, hit.mean()  # p = 0.5 over 400 images
    areas = changed[hit].mean(axis=(1, 2))  # each a rectangle of 2-40% of the image
    assert areas.min() > 0.01 and areas.max() <= 0.41, (areas.min(), areas.max())
    rows, cols = np.nonzero(changed[np.argmax(hit)])
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert box >= len(rows) > 0.9 * box  # one filled rectangle
    with pytest.raises(ValueError, match="random_erasing=1.5"):
        DeviceInput((0.5,), (0.5,), erase=1.5)


def test_the_steps_normalise_uint8_batches_on_the_device_as_the_host_would():
    from resnet_jax.data import transforms
    from resnet_jax.data.on_device import DeviceInput

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for order in ("RGB", "BGR"):
        np.testing.assert_allclose(np.asarray(DeviceInput(mean, std, order)(images)),
                                   transforms.normalize(images, mean, std, order), atol=1e-5)
    gray = images[..., :1]
    rgb = np.asarray(DeviceInput((0.5,), (0.25,), channels=3)(gray))
    assert rgb.shape == (4, 8, 8, 3) and np.array_equal(rgb[..., 0], rgb[..., 2])
    with pytest.raises(ValueError, match="do not fit images with 3 channel"):
        DeviceInput((0.5, 0.5), (0.2, 0.2))(images)


def test_gradient_accumulation_gives_the_whole_batch_update():
    """Four micro-batches of 4, gradients averaged, against one batch of 16: the same
    parameters after three SGD steps with momentum and weight decay (a model without
    BatchNorm, whose statistics would be per micro-batch)."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.relu(nn.Dense(32)(x.reshape(x.shape[0], -1)))
            return nn.Dense(10)(x)

    c = _opt_config(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=1e-3,
                    schedule="constant")
    tx, schedule = make_optimizer(c, durations(c, 10))
    model = Net()
    state = create_train_state(model, tx, jax.random.key(0), (8, 8, 1))
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(16, 8, 8, 1)).astype(np.float32),
                "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(3)]
    results = []
    for k in (1, 4):
        step = jax.jit(make_train_step(model, tx, schedule, get_loss("softmax_cross_entropy"),
                                       accumulate=k))
        s = state
        for batch in batches:
            s, metrics = step(s, batch, jax.random.key(1))
        results.append((s.params, float(metrics["loss"])))
    chex.assert_trees_all_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert abs(results[0][1] - results[1][1]) < 1e-5
    with pytest.raises(ValueError, match="a batch of 16 per device does not split into "
                                         "grad_accumulation_steps=3"):
        jax.jit(make_train_step(model, tx, schedule, get_loss("softmax_cross_entropy"),
                                accumulate=3))(state, batches[0], jax.random.key(1))


def test_mixup_and_cutmix_mix_each_image_with_the_next_and_weigh_the_labels():
    from resnet_jax.training.mixing import mix_batch

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(6, 16, 16, 3)).astype(np.float32))
    labels = jnp.arange(6, dtype=jnp.int32)
    partner = jnp.roll(images, 1, axis=0)
    mixed, a, b, lam = mix_batch(jax.random.key(3), images, labels, 0.4, 0.0)
    np.testing.assert_array_equal(a, labels)
    np.testing.assert_array_equal(b, jnp.roll(labels, 1))
    assert 0.0 < float(lam) < 1.0
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * partner, rtol=1e-6)
    for seed in range(5):
        mixed, _, _, lam = mix_batch(jax.random.key(seed), images, labels, 0.0, 1.0)
        from_partner = np.all(np.asarray(mixed) == np.asarray(partner), axis=-1)
        from_self = np.all(np.asarray(mixed) == np.asarray(images), axis=-1)
        assert np.all(from_partner | from_self)  # every pixel comes whole from one image
        # the same box in every image, and lam the share of pixels kept
        np.testing.assert_array_equal(from_partner, np.broadcast_to(from_partner[0],
                                                                    from_partner.shape))
        np.testing.assert_allclose(1 - from_partner[0].mean(), float(lam), atol=1e-6)
    same, _, _, one = mix_batch(jax.random.key(0), images, labels, 0.0, 0.0)
    assert same is images and float(one) == 1.0


def test_a_mixup_step_weighs_the_two_losses_by_lam():
    """The step's loss with mixup equals lam * L(labels) + (1 - lam) * L(partners) on the
    mixed images, computed outside the step with the same draws."""
    import flax.linen as nn

    from resnet_jax.training.mixing import mix_batch

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    c = _opt_config(optimizer="sgd", learning_rate=0.1, schedule="constant")
    tx, schedule = make_optimizer(c, durations(c, 10))
    model, loss = Net(), get_loss("softmax_cross_entropy")
    state = create_train_state(model, tx, jax.random.key(0), (4, 4, 1))
    rng = np.random.default_rng(1)
    batch = {"image": jnp.asarray(rng.normal(size=(8, 4, 4, 1)).astype(np.float32)),
             "label": jnp.asarray(rng.integers(0, 10, 8).astype(np.int32))}
    step = jax.jit(make_train_step(model, tx, schedule, loss, mix=(0.5, 0.0)))
    _, metrics = step(state, batch, jax.random.key(2))
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(2), 0), 1 << 20)
    images, a, b, lam = mix_batch(key, batch["image"], batch["label"], 0.5, 0.0)
    logits = model.apply({"params": state.params}, images)
    expected = lam * jnp.mean(loss(logits, a)) + (1 - lam) * jnp.mean(loss(logits, b))
    np.testing.assert_allclose(float(metrics["loss"]), float(expected), rtol=1e-5)
    plain = float(jnp.mean(loss(model.apply({"params": state.params}, batch["image"]),
                                batch["label"])))
    assert abs(float(metrics["loss"]) - plain) > 1e-3  # mixing changed what was trained on


def test_a_short_bfloat16_run_trains_close_to_the_float32_run(tmp_path, real_fashion_mnist):
    """dtype=bfloat16 computes in bfloat16 with float32 parameters, end to end through the
    loop; two epochs on 2,048 images end near the float32 run (measured: train loss 0.651
    against 0.640, test accuracy 74.6% against 76.4%)."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        c = quick_fashion_config(dtype=dtype, train_subset=2048)
        record = loop.train_and_evaluate(c, str(tmp_path / dtype))
        results[dtype] = record
        exp = experiment.setup(c, load_train=False)
        state = create_train_state(exp.model, exp.tx, jax.random.key(0), exp.image_shape)
        _, inner = jax.eval_shape(lambda p: exp.model.apply(
            {"params": p, "batch_stats": state.batch_stats},
            jnp.zeros((2, *exp.image_shape), jnp.float32), capture_intermediates=True,
            mutable=["intermediates"]), state.params)
        computed = {x.dtype for x in jax.tree.leaves(inner)}  # every module's output
        assert (jnp.dtype("bfloat16") in computed) == (dtype == "bfloat16"), computed
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    f32, bf16 = results["float32"], results["bfloat16"]
    assert abs(bf16["train_loss"] - f32["train_loss"]) < 0.1 * f32["train_loss"]
    assert abs(bf16["test_accuracy"] - f32["test_accuracy"]) < 0.05
    assert bf16["test_accuracy"] > 0.6
