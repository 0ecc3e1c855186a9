"""The pieces of the "ResNet strikes back" recipes, each against its definition: LAMB,
stochastic depth, repeated augmentation, binary cross-entropy with a target threshold and an
evaluation crop apart from the training one; the three RSB configs start and step; the NNX
door."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax.data import images
from resnet_jax.data.examples import DecodeCrop
from resnet_jax.data.order import TrainPositions
from resnet_jax.models import get_model
from resnet_jax.models.resnet import drop_path, drop_path_rates
from resnet_jax.training.config import base_config, validate_config
from resnet_jax.configs import load_config
from resnet_jax.training.durations import durations
from resnet_jax.training.losses import get_loss, thresholded_targets
from resnet_jax.training.optim import make_optimizer

from conftest import init_variables


# --- LAMB --------------------------------------------------------------------------------

def lamb_reference(params, grads_per_step, lr, wd, b1=0.9, b2=0.999, eps=1e-8, decayed=()):
    """You et al. 2020, Algorithm 2 in NumPy: Adam's bias-corrected moments, r = m / (sqrt(v)
    + eps), the decay added (tensors in `decayed`), each tensor's update scaled by its trust
    ratio ||w|| / ||r + wd w|| (1 where either norm is 0), then by the learning rate."""
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    for t, grads in enumerate(grads_per_step, start=1):
        for k in w:
            g = np.asarray(grads[k], np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            r = (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
            u = r + (wd * w[k] if k in decayed else 0.0)
            wn, un = np.linalg.norm(w[k]), np.linalg.norm(u)
            trust = wn / un if wn > 0 and un > 0 else 1.0
            w[k] = w[k] - lr * trust * u
    return w


def flat(tree) -> dict:
    from flax.traverse_util import flatten_dict

    return flatten_dict(tree, sep="/")


def test_lamb_follows_its_definition_with_the_decay_applied_once():
    c = base_config()
    c.optimizer, c.learning_rate, c.schedule = "lamb", 0.01, "constant"
    c.weight_decay, c.weight_decay_mode = 0.02, "decoupled"
    validate_config(c)
    tx, _ = make_optimizer(c, durations(c, 10))
    rng = np.random.default_rng(0)
    params = {"conv": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32)},
              "bn": {"bias": rng.standard_normal(4).astype(np.float32)}}
    grads = [jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
             for _ in range(3)]
    state, current = tx.init(params), params
    for g in grads:
        updates, state = tx.update(g, state, current)
        current = optax.apply_updates(current, updates)
    expected = lamb_reference(flat(params), [flat(g) for g in grads], 0.01, 0.02,
                              decayed=("conv/kernel",))  # kernels only, as every optimizer
    for k, v in flat(current).items():
        np.testing.assert_allclose(v, expected[k], rtol=2e-5, atol=1e-7)
    # without decay the kernel moves less far from the origin's pull: the decay is there once
    c.weight_decay = 0.0
    tx0, _ = make_optimizer(c, durations(c, 10))
    u0, _ = tx0.update(grads[0], tx0.init(params), params)
    u1, _ = tx.update(grads[0], tx.init(params), params)
    assert not np.allclose(u0["conv"]["kernel"], u1["conv"]["kernel"])
    np.testing.assert_allclose(u0["bn"]["bias"], u1["bn"]["bias"], rtol=1e-6)


# --- stochastic depth ---------------------------------------------------------------------

def test_drop_path_rates_rise_linearly_over_the_blocks_as_timm():
    # timm's make_blocks: drop_path_rate * block_index / (blocks - 1)
    np.testing.assert_allclose(drop_path_rates(16, 0.05), [0.05 * i / 15 for i in range(16)])
    assert drop_path_rates(1, 0.1) == [0.0]


def test_drop_path_drops_whole_examples_and_rescales_and_is_the_identity_in_evaluation():
    from flax import linen as nn

    class Branch(nn.Module):
        @nn.compact
        def __call__(self, y, train):
            return drop_path(y, 0.25, train)

    y = jnp.ones((4000, 2, 2, 3))
    out = np.asarray(Branch().apply({}, y, True, rngs={"dropout": jax.random.key(0)}))
    per_example = out.reshape(4000, -1)
    kept = per_example[:, 0] > 0
    assert np.all(per_example == per_example[:, :1])  # one draw per example
    np.testing.assert_allclose(per_example[kept], 1 / 0.75, rtol=1e-6)
    assert abs(1 - kept.mean() - 0.25) < 0.03  # binomial sd 0.007
    np.testing.assert_array_equal(Branch().apply({}, y, False), y)


def test_a_resnet_with_drop_path_is_unchanged_in_evaluation_and_random_in_training():
    plain = get_model("resnet18", num_classes=5)
    dropped = get_model("resnet18", num_classes=5, drop_path_rate=0.5)
    variables = init_variables(plain, (32, 32, 3))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    np.testing.assert_array_equal(plain.apply(variables, x), dropped.apply(variables, x))

    def train(model, key):
        return model.apply(variables, x, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(key)})[0]
    assert not np.allclose(train(dropped, 0), train(dropped, 1))
    np.testing.assert_array_equal(train(plain, 0), train(plain, 1))
    with pytest.raises(ValueError, match=r"drop_path_rate=1.0; expected \[0, 1\)"):
        get_model("resnet18", drop_path_rate=1.0).init(jax.random.key(0), x)


# --- repeated augmentation ----------------------------------------------------------------

def test_repeated_augmentation_puts_each_images_copies_on_different_devices():
    n, batch, repeats, devices = 120, 12, 3, 4
    positions = TrainPositions(n, batch, batch, 0, seed=5, pad=0, repeats=repeats)
    seen = []
    for step in range(n // batch):  # one epoch
        order, _, _, seeds = positions.batch(step)
        m = batch // repeats
        for k in range(m):
            places = [k, k + m, k + 2 * m]
            assert len({int(order[p]) for p in places}) == 1  # the same image three times
            assert len({p // (batch // devices) for p in places}) == 3  # on three devices
            assert len({int(seeds[p]) for p in places}) == 3  # each copy augmented apart
        seen.extend(order[:m].tolist())
    assert len(seen) == len(set(seen)) == n // repeats  # a third of the images, once each
    # a pure function of (seed, step): a fresh instance (a resumed run) gives the same
    again = TrainPositions(n, batch, batch, 0, seed=5, pad=0, repeats=repeats)
    np.testing.assert_array_equal(again.batch(7)[0], positions.batch(7)[0])
    # a batch that repeats does not divide: the last copies are cut
    odd = TrainPositions(n, 8, 8, 0, seed=5, pad=0, repeats=3).batch(0)[0]
    np.testing.assert_array_equal(odd[:3], odd[3:6])
    np.testing.assert_array_equal(odd[:2], odd[6:8])
    with pytest.raises(ValueError, match=r"num_repeats=9: expected 1 to the global batch 8"):
        TrainPositions(n, 8, 8, 0, seed=5, pad=0, repeats=9)


# --- binary cross-entropy with a target threshold -----------------------------------------

def test_bce_with_a_target_threshold_binarises_the_mixed_smoothed_targets():
    labels, partners = jnp.array([1, 2]), jnp.array([3, 2])
    # lam 0.7 with smoothing 0.1 over 5 classes: 0.7 * 0.92 + 0.02 = 0.664 and 0.3 * 0.92 +
    # 0.02 = 0.296 for the two classes, 0.02 elsewhere: both classes above 0.2
    targets = np.asarray(thresholded_targets(labels, partners, 0.7, 5, 0.1, 0.2))
    np.testing.assert_array_equal(targets, [[0, 1, 0, 1, 0], [0, 0, 1, 0, 0]])
    # lam 0.9: the partner's class at 0.9 * 0.02 + 0.1 * 0.92 + ... = 0.11, below 0.2
    targets = np.asarray(thresholded_targets(labels, partners, 0.9, 5, 0.1, 0.2))
    np.testing.assert_array_equal(targets, [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]])
    loss = get_loss("sigmoid_cross_entropy", 0.1, 0.2)
    logits = jax.random.normal(jax.random.key(0), (2, 5))
    expected = np.sum(np.asarray(optax.sigmoid_binary_cross_entropy(
        logits, jnp.asarray([[0, 1, 0, 1, 0], [0, 0, 1, 0, 0]], jnp.float32))), axis=-1)
    np.testing.assert_allclose(loss.mixed(logits, labels, partners, 0.7), expected, rtol=1e-6)
    np.testing.assert_allclose(loss(logits, labels), np.sum(np.asarray(
        optax.sigmoid_binary_cross_entropy(logits, jax.nn.one_hot(labels, 5))), -1), rtol=1e-6)
    c = base_config()
    c.bce_target_threshold = 0.2
    with pytest.raises(ValueError, match=r"bce_target_threshold=0.2 is for "
                                         r"loss='sigmoid_cross_entropy'"):
        validate_config(c)


# --- an evaluation crop apart from the training one ---------------------------------------

def test_the_evaluation_crop_takes_its_share_and_filter(tmp_path):
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(image).save(path)
    source = [{"data": path.read_bytes(), "where": str(path), "label": 0}]
    for crop_pct, interpolation in ((0.875, "bilinear"), (0.95, "bicubic")):
        decode = DecodeCrop(source, 48, False, crop_pct=crop_pct, interpolation=interpolation)
        got = decode({"index": 0})["image"]
        box = images.center_crop_box(300, 400, crop_pct, 48)
        # torchvision's geometry: the shorter side to floor(48 / crop_pct), then 48 central
        short = int(48 / crop_pct + 1e-6)
        assert abs((box[3] - box[1]) - 48 * 300 / short) < 1e-6
        expected = np.asarray(Image.fromarray(image).resize(
            (48, 48), Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR,
            box=box)) if interpolation == "bicubic" else None
        if expected is not None:
            np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match=r"interpolation='nearest'"):
        load_config("fashion_mnist", interpolation="nearest")


# --- the three RSB configs ----------------------------------------------------------------

@pytest.fixture(scope="module")
def small_jpeg_folder(tmp_path_factory):
    from benchmarks.jpeg_folder import write_folder

    return write_folder(str(tmp_path_factory.mktemp("rsb")), train=12, val=6, classes=3)


@pytest.mark.parametrize("name", ["imagenet_resnet50_rsb_a1", "imagenet_resnet50_rsb_a2",
                                  "imagenet_resnet50_rsb_a3"])
def test_the_rsb_configs_start_and_step(name, small_jpeg_folder, tmp_path):
    """Each recipe as written (LAMB, BCE at threshold 0.2, RandAugment, mixup and CutMix, its
    drop-path rate and repeats, bicubic resizing, the evaluation crop share), on 32-pixel
    crops of a folder of JPEGs, a batch of 6 and three steps, evaluated at 48 pixels (a test
    size apart from training's). The net is a ResNet-D of one basic block per stage
    instead of the configs' ResNet-50 (whose model, optimizer and schedule test_training
    builds from each config): three ResNet-50 compilations took 80 s each on 2 cores, and no
    recipe piece depends on depth (stochastic depth still rises over four blocks)."""
    import resnet_jax

    config = load_config(name)
    expected = {"imagenet_resnet50_rsb_a1": (600, 5e-3, 0.01, 0.05, 3, 0.2),
                "imagenet_resnet50_rsb_a2": (300, 5e-3, 0.02, 0.05, 3, 0.1),
                "imagenet_resnet50_rsb_a3": (100, 8e-3, 0.02, 0.0, 1, 0.1)}[name]
    assert (config.num_epochs, config.learning_rate, config.weight_decay, config.drop_path_rate,
            config.num_repeats, config.mixup_alpha) == expected
    assert config.optimizer == "lamb" and config.bce_target_threshold == 0.2
    assert config.eval_image_size == 224 and config.eval_crop_pct == 0.95
    assert config.image_size == (160 if name.endswith("a3") else 224)
    workdir = str(tmp_path / "run")
    config = load_config(name, model="resnet18d", model_overrides={"stage_sizes": (1, 1, 1, 1)},
                         dataset="image_folder",
                         data_dir=small_jpeg_folder,
                         eval_split="test", validation_split=0.0, image_size=32,
                         eval_image_size=48, batch_size=6, eval_batch_size=6, num_steps=3,
                         warmup_epochs=0.0, dtype="float32", cpu_kernels=True,
                         progress_bar=False, checkpoint_every_steps=0)
    resnet_jax.train(config, workdir)
    records = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    assert records[-1]["step"] == 3 and records[-1]["test_count"] == 6
    assert np.isfinite(records[-1]["train_loss"])


# --- the NNX door (here, not in test_api.py: flax 0.12.8's nnx does not import under the
# newest jax, 0.12.0.1, which .ci/newest runs test_api.py on) --------------------------------

def test_an_nnx_model_gives_the_linen_outputs_and_trains_one_optimizer_step():
    from flax import nnx

    from resnet_jax.models import get_nnx_model
    from resnet_jax.models.nnx_bridge import linen_variables

    model = get_nnx_model("cifar_resnet20", rngs=nnx.Rngs(params=0, dropout=1),
                          num_classes=10)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    labels = jnp.array([1, 2, 3, 4])
    linen = get_model("cifar_resnet20", num_classes=10)
    np.testing.assert_array_equal(model(x), linen.apply(linen_variables(model), x))

    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, labels):
        def loss_fn(model):
            logits = model(x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    before = jax.tree.map(np.array, linen_variables(model))
    loss = step(model, optimizer, x, labels)
    after = linen_variables(model)
    assert np.isfinite(float(loss))
    for collection in ("params", "batch_stats"):
        moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before[collection]),
                                                         jax.tree.leaves(after[collection]))]
        assert all(moved), (collection, sum(moved), len(moved))
    # the moved variables are still the linen model's
    np.testing.assert_allclose(model(x), linen.apply(after, x), rtol=1e-6, atol=1e-6)
