"""Converted weights on disk, `init_from` and `freeze=backbone`: the CLI writes a checkpoint
the training engine starts from; with a frozen backbone only the head moves."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from resnet_jax.training import experiment, loop, transfer
from resnet_jax.training.checkpoint import Checkpointer
from resnet_jax.training.config import base_config
from test_convert import randomized_torch_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A (randomly initialised) torchvision ResNet-18 saved as .pth and converted by the CLI."""
    import torch

    from experiments import convert_weights

    directory = tmp_path_factory.mktemp("weights")
    model = randomized_torch_model("resnet18", seed=3)
    pth = str(directory / "my_resnet18.pth")
    torch.save(model.state_dict(), pth)
    out = str(directory / "converted")
    assert convert_weights.main(["--source", "torchvision", "--model", "resnet18",
                                 "--input", pth, "--output", out]) == 0
    return out, {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.torch
def test_the_cli_writes_the_converted_variables_and_a_record(converted, tmp_path):
    from resnet_jax.convert import torchvision as tv_convert
    from experiments import convert_weights
    from safetensors.numpy import save_file

    out, state_dict = converted
    loaded = transfer.load_pretrained(out)
    expected = tv_convert.convert(state_dict, "resnet18")
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, b)
    record = json.load(open(os.path.join(out, "conversion.json")))
    assert record["params"] == 11_689_512 and record["num_classes"] == 1000
    assert len(record["sha256"]) == 64 and record["published"] is None
    # the same tensors from .npz and .safetensors give the same variables
    for name, write in (("w.npz", lambda p: np.savez(p, **state_dict)),
                        ("w.safetensors", lambda p: save_file(state_dict, p))):
        path = str(tmp_path / name)
        write(path)
        variables, _ = convert_weights.convert_file("torchvision", "resnet18", path)
        for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.torch
def test_a_file_named_as_a_published_one_must_have_its_hash(converted, tmp_path):
    import shutil

    from experiments import convert_weights

    _, state_dict = converted
    fake = str(tmp_path / "resnet18-f37072fd.pth")
    shutil.copy(os.path.join(os.path.dirname(converted[0]), "my_resnet18.pth"), fake)
    with pytest.raises(ValueError, match=r"SHA-256 [0-9a-f]+\.\.\. is not the published "
                       r"f37072fd"):
        convert_weights.convert_file("torchvision", "resnet18", fake)
    assert convert_weights.main(["--source", "torchvision", "--model", "resnet18", "--input",
                                 fake, "--output", str(tmp_path / "o")]) == 2


def fine_tune_config(init_from: str, freeze: str, **overrides):
    c = base_config()
    c.update(dict(model="resnet18", dataset="fashion_mnist", num_classes=10, channels=3,
                  init_from=init_from, freeze=freeze, train_subset=256, eval_subset=100,
                  batch_size=32, eval_batch_size=100, num_steps=6, num_epochs=1,
                  optimizer="adam", learning_rate=1e-3, schedule="constant",
                  weight_decay=1e-4, progress_bar=False, augment="flip"))
    c.update(overrides)
    return c


def final_variables(workdir: str):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.restore_raw()[1]
    finally:
        ckpt.close()


def flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
    return out


@pytest.mark.torch
def test_frozen_backbone_fine_tuning_moves_only_the_head(converted, tmp_path):
    out, _ = converted
    start = transfer.load_pretrained(out)
    loop.train_and_evaluate(fine_tune_config(out, "backbone"), str(tmp_path / "frozen"))
    end = final_variables(str(tmp_path / "frozen"))
    before = {**{("params",) + k: v for k, v in flat(start["params"]).items()},
              **{("batch_stats",) + k: v for k, v in flat(start["batch_stats"]).items()}}
    after = {**{("params",) + k: v for k, v in flat(end["params"]).items()},
             **{("batch_stats",) + k: v for k, v in flat(end["batch_stats"]).items()}}
    backbone = [k for k in before if not transfer.is_head(k[1:])]
    assert len(backbone) == len(before) - 2  # all but fc/kernel and fc/bias
    for key in backbone:  # bit-identical, BatchNorm statistics included
        np.testing.assert_array_equal(after[key], before[key], err_msg="/".join(key))
    assert after[("params", "fc", "kernel")].shape == (512, 10)  # re-initialised: 1000 -> 10
    # the head did train: it moved away from the fresh initialisation of the run's seed
    exp = experiment.setup(fine_tune_config(out, "backbone"), load_train=False)
    init_rng = jax.random.split(jax.random.key(0))[0]
    fresh = jax.jit(lambda k: exp.model.init({"params": k, "dropout": k},
                                             np.zeros((1, 28, 28, 3), np.float32)))(init_rng)
    assert not np.allclose(after[("params", "fc", "kernel")], fresh["params"]["fc"]["kernel"])


@pytest.mark.torch
def test_full_fine_tuning_moves_the_backbone_too(converted, tmp_path):
    out, _ = converted
    start = transfer.load_pretrained(out)
    loop.train_and_evaluate(fine_tune_config(out, ""), str(tmp_path / "full"))
    end = final_variables(str(tmp_path / "full"))
    assert not np.array_equal(end["params"]["conv1"]["kernel"], start["params"]["conv1"]["kernel"])
    assert not np.array_equal(end["batch_stats"]["bn1"]["mean"], start["batch_stats"]["bn1"]["mean"])


def test_the_frozen_optimizer_gives_zero_updates_and_keeps_no_state_for_the_backbone():
    import optax

    params = {"conv1": {"kernel": np.ones((3, 3, 3, 4), np.float32)},
              "fc": {"kernel": np.ones((4, 2), np.float32), "bias": np.zeros(2, np.float32)}}
    tx = transfer.freeze_backbone(optax.adam(0.1))
    state = tx.init(params)
    grads = jax.tree.map(np.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert not np.any(updates["conv1"]["kernel"])
    assert np.all(updates["fc"]["kernel"] != 0)


@pytest.mark.torch
def test_init_from_another_model_names_the_tensor(converted, tmp_path):
    out, _ = converted
    with pytest.raises(ValueError, match=r"init_from=.* lacks params/layer1_2/bn1/bias"):
        loop.train_and_evaluate(fine_tune_config(out, "backbone", model="resnet34"),
                                str(tmp_path / "r34"))
    with pytest.raises(ValueError, match=r"params/conv1/kernel has shape \(7, 7, 3, 64\), the "
                       r"model's is \(7, 7, 1, 64\)"):
        loop.train_and_evaluate(fine_tune_config(out, "backbone", channels=0),
                                str(tmp_path / "gray"))
    with pytest.raises(FileNotFoundError, match=r"holds neither converted weights"):
        loop.train_and_evaluate(fine_tune_config(str(tmp_path), "backbone"), str(tmp_path / "x"))


def test_the_transfer_config_is_the_seed_recipe():
    from test_training import load_config

    c = load_config("transfer_resnet50")
    assert c.model == "resnet50" and c.model_overrides.head_hidden == 1024
    assert c.num_classes == 10 and c.freeze == "backbone" and c.channels == 3
    model = experiment.build_model(c, 10)
    import jax.numpy as jnp

    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3))))
    assert variables["params"]["fc_hidden"]["kernel"].shape == (2048, 1024)
    assert variables["params"]["fc"]["kernel"].shape == (1024, 10)


# --- the weights' own preprocessing ------------------------------------------------------------

@pytest.mark.torch
def test_a_fine_tuning_run_feeds_the_model_as_its_weights_were_fed(converted, tmp_path):
    """conversion.json records torchvision's preprocessing; the run resolves it into its
    config, its pipeline normalises with it, and Run.preprocess does the same."""
    from resnet_jax import Run
    from resnet_jax.convert.files import TORCHVISION_PREPROCESS

    out, _ = converted
    recorded = json.load(open(os.path.join(out, "conversion.json")))["preprocess"]
    assert tuple(recorded["mean"]) == TORCHVISION_PREPROCESS["mean"]
    workdir = str(tmp_path / "ft")
    loop.train_and_evaluate(fine_tune_config(out, "backbone", num_steps=2), workdir)
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert tuple(saved["input_mean"]) == (0.485, 0.456, 0.406)
    assert tuple(saved["input_std"]) == (0.229, 0.224, 0.225)
    assert saved["input_channel_order"] == "RGB"
    run = Run.load(workdir)
    images = np.full((2, 28, 28, 1), 128, np.uint8)
    expected = (128 / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(run.preprocess(images)[0, 0, 0], expected, rtol=1e-5)
    # a run started from that run starts from the model it selected, and is fed the same
    start = transfer.load_pretrained(workdir)
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(run.variables)):
        np.testing.assert_array_equal(a, b)
    assert transfer.recorded_preprocessing(workdir)["mean"] == list(saved["input_mean"])
    # the config's own fields win over the record
    c = experiment.resolve_input(fine_tune_config(out, "backbone", input_mean=(0.5,),
                                                  input_std=(0.25,)))
    assert tuple(c.input_mean) == (0.5,) and c.input_channel_order == "RGB"


def test_the_keras_entry_normalises_as_keras_preprocess_input(tmp_path):
    """The registry's Keras ResNet50 preprocessing, applied on the device to the pipeline's
    batch of real photos, equals keras.applications.resnet50.preprocess_input on the same
    pixels."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    from keras.applications import resnet50
    from skimage import data as photos

    from resnet_jax.convert.files import KNOWN_FILES
    from resnet_jax.data import pipeline
    from resnet_jax.data.sources import ArraySource

    entry = KNOWN_FILES["resnet50_weights_tf_dim_ordering_tf_kernels.h5"]
    weights = str(tmp_path / "keras_weights")
    os.makedirs(weights)
    with open(os.path.join(weights, "conversion.json"), "w") as f:
        json.dump({"source": "keras", "preprocess": entry["preprocess"]}, f)
    c = experiment.resolve_input(fine_tune_config(weights, "backbone", model="keras_resnet50"))
    assert c.input_channel_order == "BGR"
    info = experiment.info_of(c)
    prepare = experiment.device_input(c, train=False)
    pictures = [photos.astronaut(), photos.chelsea(), photos.coffee(), photos.rocket()]
    images = np.stack([p[:224, :224] for p in pictures]).astype(np.uint8)
    source = ArraySource(images, np.zeros(4, np.int32))
    batch = next(iter(pipeline.eval_batches(source, info, pipeline.EvalInput(4))))
    expected = resnet50.preprocess_input(images.astype(np.float32))
    assert batch["image"].dtype == np.uint8  # the host does no per-pixel float work
    np.testing.assert_allclose(prepare(batch["image"]), expected, atol=2e-4, rtol=0)
    # and not what the dataset's own statistics would give
    plain = experiment.device_input(fine_tune_config("", ""), train=False)(batch["image"])
    assert np.abs(plain - expected).max() > 50
