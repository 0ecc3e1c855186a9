"""The public Python API (load_config, train, Run) on real Fashion-MNIST; a metric added to
the train step reaching every output; the loss chosen by the config; a user's own step."""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import resnet_jax
from conftest import ROOT
from test_readme import argv, command
from resnet_jax import Run, load_config
from resnet_jax.training import experiment


def quick(**overrides):
    fields = dict(train_subset=1024, eval_subset=500, num_epochs=2, batch_size=64,
                  eval_batch_size=250, progress_bar=False)
    return load_config("fashion_mnist", **{**fields, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("api") / "run")
    return workdir, resnet_jax.train(quick(), workdir)


def test_load_config_by_name_or_path_with_overrides():
    by_name = load_config("fashion_mnist", num_epochs=3, augment="none")
    by_path = load_config(os.path.join(ROOT, "experiments", "configs", "fashion_mnist.py"))
    assert by_name.num_epochs == 3 and by_name.augment == "none"
    assert by_path.model == by_name.model == "fashion_mnist_resnet8" and by_path.num_epochs == 9


@pytest.mark.parametrize("call, message", [
    (lambda: load_config("fashion_mnist", num_epoch=3),
     "unknown config field 'num_epoch'; did you mean 'num_epochs'?"),
    (lambda: load_config("fashion_mnist", optimizer="rmsprop"),
     r"optimizer='rmsprop'; expected one of \('sgd', 'adam', 'adamw', 'lars', 'lamb'\)"),
    (lambda: load_config("fashion_mnist", loss="hinge"),
     r"loss='hinge'; expected one of \('softmax_cross_entropy', 'sigmoid_cross_entropy'\)"),
    (lambda: load_config("fashion_mnist", momentum=1.5), r"momentum=1.5 must be in \[0, 1\)"),
    (lambda: load_config("fashion_mnist", batch_size=0.5), "batch_size=0.5 must be an integer"),
    (lambda: load_config("fashoin_mnist"), "no experiment config named 'fashoin_mnist'; known: "),
])
def test_load_config_names_the_bad_field_and_what_is_allowed(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_train_from_python_writes_the_run_and_resumes_it(trained):
    workdir, record = trained
    assert record["step"] == 32 and record["test_count"] == 500 and record["test_accuracy"] > 0.5
    again = resnet_jax.train(quick(), workdir)  # finished: resumes at the end, trains nothing
    assert again["step"] == 32 and again["test_accuracy"] == record["test_accuracy"]
    assert len(open(os.path.join(workdir, "metrics.jsonl")).readlines()) == 2
    assert os.path.exists(os.path.join(workdir, "plots", "curves.png"))


def test_run_load_gives_config_model_variables_and_history(trained):
    workdir, record = trained
    run = Run.load(workdir)
    # no validation split: no decision is taken, the model is the last step's
    assert run.config.model == "fashion_mnist_resnet8" and run.which == "latest"
    assert run.step == 32 and run.selected["by"] == "last step"
    assert run.selected["test_accuracy"] == record["test_accuracy"]
    assert [r["epoch"] for r in run.history] == [1, 2]
    assert set(run.variables) == {"params", "batch_stats"}
    assert run.variables["params"]["fc"]["kernel"].shape == (128, 10)
    assert Run.load(workdir, "latest").step == 32
    with pytest.raises(ValueError, match="which='newest'; expected one of"):
        Run.load(workdir, "newest")
    with pytest.raises(FileNotFoundError, match="is .* a training run directory"):
        Run.load(os.path.dirname(workdir))


def test_predict_takes_raw_images_and_agrees_with_evaluate(trained):
    run = Run.load(trained[0])
    split = run.load_split("test")
    assert split.images.dtype == np.uint8 and split.images.shape == (10_000, 28, 28, 1)
    # 2,000 of them, the sample `evaluate` takes with n=2000 (the main job's ten views on all
    # 10,000 images, twice, took 46 s of a family-25 EPYC's time at the tests' XLA level)
    sample = experiment.load_split(run.config, "test", 2000)
    assert set(map(bytes, sample.images)) <= set(map(bytes, split.images))
    probabilities = run.predict(sample.images)
    assert probabilities.shape == (2000, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)
    result = run.evaluate("test", 2000)
    assert result["count"] == 2000 and result["confusion"].sum() == 2000
    correct = np.argmax(probabilities, 1) == sample.labels
    # two differently compiled programs (softmax of a batch vs the eval step's sums): a
    # near-tie between two classes may round either way for an image or two
    assert abs(correct.mean() - result["accuracy"]) <= 2 / 2000
    with pytest.raises(ValueError, match="expected uint8 images"):
        run.predict(split.images.astype(np.float32))
    with pytest.raises(ValueError, match=r"images of shape \(32, 32, 1\); this run takes"):
        run.predict(np.zeros((2, 32, 32, 1), np.uint8))


def test_feature_maps_of_a_block(trained):
    run = Run.load(trained[0])
    images = run.load_split("test").images[:4]
    maps = run.feature_maps(images, "layer2_0")
    assert maps.shape == (4, 7, 7, 64)  # 28 -> 14 (stem stride 2) -> 7 (stage 2), 64 channels
    assert np.all(maps >= 0)  # a block ends in a ReLU
    with pytest.raises(ValueError, match="no top-level module 'layer9_0'; modules: "):
        run.feature_maps(images, "layer9_0")


def test_a_metric_added_to_the_train_step_reaches_metrics_jsonl_and_tensorboard(
        monkeypatch, tmp_path):
    from resnet_jax.training import steps

    make = steps.make_train_step

    def with_extra(*args, **kwargs):
        step = make(*args, **kwargs)

        def train_step(state, batch, rng):
            state, metrics = step(state, batch, rng)
            return state, {**metrics, "extra": jnp.float32(2.5)}  # the one-line addition
        return train_step

    monkeypatch.setattr(steps, "make_train_step", with_extra)
    workdir = str(tmp_path / "run")
    resnet_jax.train(quick(num_epochs=1, train_subset=256), workdir)
    record = json.loads(open(os.path.join(workdir, "metrics.jsonl")).readline())
    assert record["train_extra"] == 2.5
    window = json.loads(open(os.path.join(workdir, "train_metrics.jsonl")).readline())
    assert window["extra"] == 2.5
    (events,) = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert b"train_extra" in open(events, "rb").read()


def test_the_loss_is_chosen_by_the_config():
    from resnet_jax.training import experiment, losses
    from resnet_jax.training.state import create_train_state

    c = quick(loss="sigmoid_cross_entropy", schedule="constant", cpu_kernels=False,
              label_smoothing=0.0)  # the main job smooths; here the plain loss is compared
    model = experiment.build_model(c, 10)
    tx = optax.sgd(0.1)
    strategy = experiment.make_steps(c, model, 10, tx, optax.constant_schedule(0.1))
    state = create_train_state(model, tx, jax.random.key(0), (28, 28, 1))
    batch = {"image": jax.random.normal(jax.random.key(1), (64, 28, 28, 1)),
             "label": jnp.arange(64, dtype=jnp.int32) % 10}
    logits, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                            batch["image"], train=True, mutable=["batch_stats"])
    _, metrics = strategy.train_step(state, batch, jax.random.key(2))
    expected = jnp.mean(losses.sigmoid_cross_entropy(logits, batch["label"]))
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
    softmax = jnp.mean(losses.softmax_cross_entropy(logits, batch["label"]))
    assert abs(float(expected) - float(softmax)) > 0.1


def test_a_plain_jit_step_of_a_zoo_model_has_no_custom_calls():
    """Without the CPU layers, a user's step is plain XLA (the kernels are opt-in)."""
    model = resnet_jax.get_model("cifar_resnet20")
    x, y = jnp.zeros((8, 32, 32, 3)), jnp.zeros(8, jnp.int32)
    variables = model.init(jax.random.key(0), x)

    def step(params):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                train=True, mutable=["batch_stats"])
        return jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=True,
                        mutable=["batch_stats"])[0], y).mean())(params), logits

    hlo = jax.jit(step).lower(variables["params"]).as_text()
    assert "convolution" in hlo and "custom_call" not in hlo


def test_the_export_command_writes_onnx_with_preprocessing_and_class_names(trained, tmp_path,
                                                                           capsys):
    import onnxruntime

    from resnet_jax.cli import export

    out = str(tmp_path / "serving")
    readme = argv(command(".venv/bin/python -m experiments.export --workdir runs/fashion_mnist "
                          "--out runs/fashion_mnist/serving"),
                  **{"runs/fashion_mnist/serving": out, "runs/fashion_mnist": trained[0]})
    assert "--format" not in readme  # the default: onnx
    assert export.main(readme[3:]) == 0
    assert capsys.readouterr().out.strip() == os.path.join(out, "model.onnx")
    run = Run.load(trained[0])
    described = json.load(open(os.path.join(out, "preprocessing.json")))
    assert described["input"] == {"name": "images", "layout": "NHWC", "dtype": "float32",
                                  "shape": [None, 28, 28, 1]}
    assert described["class_names"] == list(run.class_names) and "T-shirt/top" in run.class_names
    assert open(os.path.join(out, "class_names.txt")).read().splitlines() == list(run.class_names)
    assert described["mean"] == list(run.info.mean) and described["step"] == run.step
    raw = run.load_split("test").images[:50]
    session = onnxruntime.InferenceSession(os.path.join(out, "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": run.preprocess(raw)})[0]
    want = run.logits(raw)
    # the run evaluates with bfloat16 CPU convolutions (the main job's cpu_conv_dtype), the
    # export in float32: they differ by bfloat16's rounding (8 bits of mantissa), not more
    # (1.4e-2 of the largest logit over the main job's 10,000 test images, RESULTS.md)
    assert np.abs(got - want).max() <= 3e-2 * np.abs(want).max()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.96
    np.testing.assert_allclose(np.exp(want) / np.exp(want).sum(1, keepdims=True),
                               run.predict(raw), rtol=1e-4, atol=1e-6)
    # the StableHLO export of the README: the same logits as the ONNX graph's
    hlo = str(tmp_path / "stablehlo")
    readme = argv(command(".venv/bin/python -m experiments.export --workdir runs/fashion_mnist "
                          "--out runs/fashion_mnist/stablehlo"),
                  **{"runs/fashion_mnist/stablehlo": hlo, "runs/fashion_mnist": trained[0]})
    assert export.main(readme[3:]) == 0
    exported = jax.export.deserialize(open(os.path.join(hlo, "model.stablehlo"), "rb").read())
    hlo_logits = np.asarray(exported.call(run.preprocess(raw)))
    assert np.abs(hlo_logits - got).max() <= 1e-4 * np.abs(got).max()


def test_a_bad_export_format_is_a_one_line_error(trained, tmp_path, capsys):
    from resnet_jax.cli import export

    assert export.main(["--workdir", trained[0], "--out", str(tmp_path / "x"),
                        "--format", "tflite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: format='tflite'; expected one of ('pytorch', 'onnx', 'stablehlo')"
    with pytest.raises(ValueError, match=r"^format='savedmodel'; expected one of"):
        Run.load(trained[0]).export(str(tmp_path / "y"), format="savedmodel")
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
