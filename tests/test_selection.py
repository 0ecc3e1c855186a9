"""Validation, model selection, the plateau schedule, early stopping and EMA: decisions are
taken on validation only, with Keras' semantics, and survive a resume."""

from __future__ import annotations

import json
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from resnet_jax import Run
from resnet_jax.data.sources import ArraySource, holdout
from resnet_jax.training import experiment, loop, selection
from resnet_jax.training.checkpoint import Checkpointer
from resnet_jax.training.config import base_config, validate_config, with_overrides
from resnet_jax.training.state import create_train_state
from resnet_jax.training.steps import make_train_step
from resnet_jax.training.losses import get_loss


@pytest.fixture
def real_fashion_mnist():
    """The Debian package's files; experiments/setup.sh installs them, so absence is a failure."""
    from resnet_jax.data.sources import DEBIAN_FASHION_MNIST

    if not os.path.exists(os.path.join(DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz")):
        pytest.fail("real Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """The main job's net on 512 real training images: 8 steps an epoch, 3 epochs."""
    c = base_config()
    c.update(dict(model="fashion_mnist_resnet8", dataset="fashion_mnist", train_subset=512,
                  eval_subset=200, batch_size=64, eval_batch_size=200, num_epochs=3,
                  optimizer="sgd", learning_rate=0.05, schedule="constant", nesterov=True,
                  progress_bar=False, log_every_steps=4, validation_split=0.1))
    c.update(overrides)
    return c


def records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def saved(workdir: str, which: str = "latest"):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.restore_raw(which)
    finally:
        ckpt.close()


# --- Keras semantics ------------------------------------------------------------------------

def keras_callback(kind: str, **kwargs):
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    cb = getattr(keras.callbacks, kind)(**kwargs)
    model = types.SimpleNamespace(optimizer=types.SimpleNamespace(learning_rate=0.1),
                                  stop_training=False)
    cb.set_model(model)
    cb.on_train_begin()
    return cb, model


@pytest.mark.parametrize("mode,patience,cooldown,min_delta,min_lr,factor", [
    ("min", 0, 0, 0.0, 0.0, 0.5),
    ("min", 2, 1, 0.01, 0.02, 0.5),
    ("max", 1, 2, 0.001, 0.0, 0.1),
    ("max", 3, 0, 0.0, 0.004, 0.3),
])
def test_the_plateau_schedule_cuts_as_keras_reduce_lr_on_plateau(mode, patience, cooldown,
                                                                   min_delta, min_lr, factor):
    rng = np.random.default_rng(patience)
    values = np.cumsum(rng.normal(0, 0.02, 40)) + 1.0  # a noisy, often stalling metric
    cb, model = keras_callback("ReduceLROnPlateau", monitor="val_loss", mode=mode,
                               factor=factor, patience=patience, cooldown=cooldown,
                               min_delta=min_delta, min_lr=min_lr)
    p = selection.Plateau(np.inf if mode == "min" else -np.inf)
    cuts = 0
    for epoch, v in enumerate(values):
        cb.on_epoch_end(epoch, {"val_loss": float(v)})
        before = p.scale
        p = selection.plateau_update(p, float(v), mode, min_delta, patience, factor, cooldown,
                                     min_lr, 0.1)
        cuts += p.scale != before
        assert 0.1 * p.scale == pytest.approx(model.optimizer.learning_rate, rel=1e-9), epoch
        assert (p.wait, p.cooldown) == (cb.wait, cb.cooldown_counter), epoch
    assert cuts >= 2  # the sequences do exercise the cuts


@pytest.mark.parametrize("mode,patience,min_delta", [("min", 2, 0.0), ("max", 3, 0.01),
                                                     ("min", 1, 0.02)])
def test_early_stopping_stops_when_keras_early_stopping_does(mode, patience, min_delta):
    rng = np.random.default_rng(patience)
    values = np.cumsum(rng.normal(0, 0.02, 60)) + 1.0
    metric = "val_loss" if mode == "min" else "val_accuracy"
    cb, model = keras_callback("EarlyStopping", monitor=metric, mode=mode, patience=patience,
                               min_delta=min_delta)
    c = tiny_config(selection_metric=metric, selection_mode=mode,
                    early_stopping_patience=patience, early_stopping_min_delta=min_delta)
    d = selection.initial(c)
    keras_stop = ours = None
    for epoch, v in enumerate(values):
        cb.on_epoch_end(epoch, {metric: float(v)})
        if model.stop_training and keras_stop is None:
            keras_stop = epoch
        d, _, stop = selection.decide(c, d, {metric: float(v)}, epoch)
        if stop and ours is None:
            ours = epoch
    assert keras_stop is not None and ours == keras_stop


def test_either_weights_select_the_better_of_trained_and_ema_on_validation():
    # each period counts with its better weights (trained on a tie); "auto" reads one metric
    periods = [(0.80, 0.82), (0.85, 0.84), (0.85, 0.85), (0.83, 0.86), (0.86, 0.86)]
    c = tiny_config(ema_decay=0.9, selection_weights="either")
    d, picked = selection.initial(c), []
    for step, (trained, ema) in enumerate(periods):
        d, new_best, _ = selection.decide(c, d, {"val_accuracy": trained,
                                                 "val_ema_accuracy": ema}, step)
        picked.append((new_best, d.best_step, d.best_weights, d.best))
    assert picked == [(True, 0, "ema", 0.82), (True, 1, "trained", 0.85),
                      (False, 1, "trained", 0.85), (True, 3, "ema", 0.86),
                      (False, 3, "ema", 0.86)]
    again = selection.Decisions.from_dict(d.to_dict())  # as a checkpoint's meta keeps it
    assert again == d and selection.best_weights(c, again) == "ema"
    for metric, weights in (("val_accuracy", "trained"), ("val_ema_accuracy", "ema")):
        auto = tiny_config(ema_decay=0.9, selection_metric=metric)
        d = selection.initial(auto)
        for step, (trained, ema) in enumerate(periods):
            d, _, _ = selection.decide(auto, d, {"val_accuracy": trained,
                                                 "val_ema_accuracy": ema}, step)
        assert (d.best_step, d.best_weights) == ((4, weights) if weights == "trained"
                                                 else (3, weights))
    # decisions saved without best_weights: the weights selection_metric names
    old = {k: v for k, v in d.to_dict().items() if k != "best_weights"}
    assert selection.best_weights(auto, selection.Decisions.from_dict(old)) == "ema"


# --- splits -------------------------------------------------------------------------------

def test_the_held_out_validation_split_is_fixed_by_the_seed_and_disjoint_from_train():
    source = ArraySource(np.zeros((1000, 2, 2, 1), np.uint8), np.arange(1000, dtype=np.int32))
    rest, held = holdout(source, 0.1, seed=3)
    assert len(held) == 100 and len(rest) == 900
    assert set(rest.labels) | set(held.labels) == set(range(1000))
    assert not set(rest.labels) & set(held.labels)
    again = holdout(source, 0.1, seed=3)[1]
    other = holdout(source, 0.1, seed=4)[1]
    assert np.array_equal(held.labels, again.labels)
    assert not np.array_equal(held.labels, other.labels)
    with pytest.raises(ValueError, match="leaves no training examples"):
        holdout(source, 0.9999, seed=0)


def test_a_run_splits_real_fashion_mnist_into_train_validation_and_test(real_fashion_mnist):
    c = tiny_config(train_subset=0, eval_subset=0, validation_split=0.1)
    train, val = experiment.load_split(c, "train"), experiment.load_split(c, "validation")
    test = experiment.load_split(c, "test")
    assert (len(train), len(val), len(test)) == (54000, 6000, 10000)
    assert experiment.split_names(c)["validation"].startswith("0.1 of train held out")
    with pytest.raises(ValueError, match="this run has no validation split"):
        experiment.load_split(tiny_config(validation_split=0.0), "validation")


@pytest.mark.parametrize("overrides,message", [
    (dict(validation_split=0.0, schedule="plateau"),
     r"schedule='plateau' decide on a validation split: set validation_split"),
    (dict(validation_split=0.0, early_stopping_patience=3),
     r"early_stopping_patience=3 decide on a validation split"),
    (dict(selection_metric="val_ema_accuracy"), r"val_ema_\* needs ema_decay > 0"),
    (dict(selection_metric="test_accuracy"), r"selection_metric='test_accuracy'; expected one of"),
    (dict(plateau_monitor="train_loss", schedule="plateau"), r"plateau_monitor='train_loss'"),
    (dict(validation_dataset_split="val"), r"set one of the two"),
    (dict(validation_split=0.0, validation_dataset_split="test"), r"is also the test split"),
    (dict(selection_weights="either"), r"selection_weights='either' compares the trained and "
                                       r"the EMA weights: set ema_decay > 0"),
    (dict(selection_weights="either", ema_decay=0.9, selection_metric="val_ema_loss"),
     r"name the trained weights' metric \('val_loss'\)"),
    (dict(selection_weights="either", ema_decay=0.9, validation_split=0.0),
     r"selection_weights='either' decide on a validation split"),
])
def test_decisions_on_anything_but_validation_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(tiny_config(**overrides))


# --- the loop ---------------------------------------------------------------------------

def test_the_best_checkpoint_is_chosen_on_validation_and_the_test_split_read_once(
        tmp_path, real_fashion_mnist):
    quiet, loud = str(tmp_path / "quiet"), str(tmp_path / "loud")
    c = tiny_config(learning_rate=0.2, eval_subset=300)
    out = loop.train_and_evaluate(c, quiet)
    history = records(quiet)
    assert all("val_accuracy" in r for r in history)
    assert [("test_accuracy" in r) for r in history] == [False, False, True]  # at the end only
    clock = [r["wall_seconds"] for r in history]
    assert 0 < clock[0] < clock[1] < clock[2]
    best = max(history, key=lambda r: r["val_accuracy"])
    with open(os.path.join(quiet, "selected.json")) as f:
        chosen = json.load(f)
    assert chosen["step"] == best["step"] == saved(quiet, "best")[0]
    assert chosen["by"] == "val_accuracy" and chosen["val_accuracy"] == best["val_accuracy"]
    assert out["selected"] == chosen
    run = Run.load(quiet)  # the selected model
    assert run.step == chosen["step"] and run.which == "best"
    assert chosen["test_count"] == 300  # eval_subset
    assert run.evaluate("test", 300)["accuracy"] == pytest.approx(chosen["test_accuracy"],
                                                                  abs=1e-6)
    # evaluating the test split after every period changes nothing that is decided or trained
    loop.train_and_evaluate(with_overrides(c, test_every_period=True), loud)
    assert all("test_accuracy" in r for r in records(loud))
    for a, b in zip(jax.tree.leaves(saved(quiet)[1]), jax.tree.leaves(saved(loud)[1])):
        np.testing.assert_array_equal(a, b)
    with open(os.path.join(loud, "selected.json")) as f:
        assert json.load(f) == chosen
    # the command line evaluates any of the run's splits
    from experiments.evaluate import evaluate_run

    val = evaluate_run(quiet, "validation")
    assert val["count"] == 6000 and val["split_is"].startswith("0.1 of train held out")
    assert val["step"] == chosen["step"]
    assert evaluate_run(quiet, "test", "latest")["step"] == 24
    # --flip / --no-flip on the same weights: the flip-averaged loss is another number
    one, both = (evaluate_run(quiet, "validation", flip=f) for f in (False, True))
    assert (one["flip"], both["flip"], val["flip"]) == (False, True, False)
    assert one["loss"] == val["loss"] and both["loss"] != one["loss"]
    # --shift N adds the views moved N pixels, whatever the run's eval_shift; --shift 0: none
    moved = evaluate_run(quiet, "validation", subset=64, flip=True, shift=1)
    flipped = evaluate_run(quiet, "validation", subset=64, flip=True, shift=0)
    assert (moved["shift"], flipped["shift"], val["shift"]) == (1, 0, 0)
    assert moved["count"] == flipped["count"] == 64 and moved["loss"] != flipped["loss"]
    with pytest.raises(ValueError, match="shift must be 0 .* got -1"):
        evaluate_run(quiet, "validation", shift=-1)


def test_the_plateau_schedule_cuts_on_validation_and_resumes_with_its_state(
        tmp_path, real_fashion_mnist):
    # min_delta 10: val_loss never "improves" after the first period, so with patience 0 the
    # learning rate halves after each later period; a run halted and resumed cuts the same
    c = tiny_config(schedule="plateau", plateau_patience=0, plateau_factor=0.5,
                    plateau_min_delta=10.0, checkpoint_every_steps=4, num_epochs=4)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    loop.train_and_evaluate(c, straight)
    loop.train_and_evaluate(with_overrides(c, halt_after_steps=13), resumed)
    loop.train_and_evaluate(c, resumed)
    rates = [r["train_learning_rate"] for r in records(straight)]
    # each period's mean rate: the cut after period k applies to period k + 1
    assert rates == pytest.approx([0.05, 0.05, 0.025, 0.0125], rel=1e-6)
    for a, b in zip(jax.tree.leaves(saved(straight)[1]), jax.tree.leaves(saved(resumed)[1])):
        np.testing.assert_array_equal(a, b)
    assert [r["train_learning_rate"] for r in records(resumed)] == rates


def test_early_stopping_ends_the_run_and_reads_the_test_split_then(tmp_path, real_fashion_mnist):
    workdir = str(tmp_path / "early")
    c = tiny_config(num_epochs=6, selection_metric="val_loss", early_stopping_patience=2,
                    early_stopping_min_delta=10.0)
    out = loop.train_and_evaluate(c, workdir)
    history = records(workdir)
    assert [r["step"] for r in history] == [8, 16, 24]  # stopped 2 periods after the first
    assert "test_accuracy" in history[-1] and "test_accuracy" not in history[0]
    assert out["selected"]["by"] == "val_loss" and saved(workdir)[0] == 24


# --- EMA ----------------------------------------------------------------------------------

def test_the_ema_step_averages_params_and_batch_statistics_as_the_formula(real_fashion_mnist):
    c = tiny_config(ema_decay=0.9)
    exp = experiment.setup(c, load_train=False)
    state = create_train_state(exp.model, exp.tx, jax.random.key(0), exp.image_shape, ema=True)
    step = jax.jit(make_train_step(exp.model, exp.tx, exp.schedule, get_loss(c.loss),
                                   ema=(0.9, True)))
    rng = np.random.default_rng(0)
    average = jax.tree.map(lambda x: np.asarray(x, np.float64),
                           {"params": state.params, "batch_stats": state.batch_stats})
    for t in range(4):
        batch = {"image": rng.normal(size=(16, 28, 28, 1)).astype(np.float32),
                 "label": rng.integers(0, 10, 16).astype(np.int32)}
        state, _ = step(state, batch, jax.random.key(1))
        decay = min(0.9, (2 + t) / (11 + t))  # warm-up: (1 + n) / (10 + n), n = t + 1
        new = {"params": state.params, "batch_stats": state.batch_stats}
        average = jax.tree.map(lambda a, n: decay * a + (1 - decay) * np.asarray(n, np.float64),
                               average, new)
    for a, b in zip(jax.tree.leaves(average), jax.tree.leaves(state.ema)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    assert not np.allclose(state.ema["params"]["fc"]["kernel"], state.params["fc"]["kernel"])


def test_ema_weights_are_evaluated_checkpointed_selected_and_predict(tmp_path,
                                                                      real_fashion_mnist):
    workdir = str(tmp_path / "ema")
    c = tiny_config(ema_decay=0.8, selection_metric="val_ema_accuracy")
    loop.train_and_evaluate(c, workdir)
    history = records(workdir)
    assert all("val_ema_accuracy" in r and "val_accuracy" in r for r in history)
    assert "test_ema_accuracy" in history[-1]
    with open(os.path.join(workdir, "selected.json")) as f:
        chosen = json.load(f)
    assert chosen["weights"] == "ema"
    assert chosen["step"] == max(history, key=lambda r: r["val_ema_accuracy"])["step"]
    _, raw = saved(workdir, "best")
    run, trained = Run.load(workdir), Run.load(workdir, "selected", ema=False)
    assert run.ema and not trained.ema and run.step == trained.step == chosen["step"]
    for a, b in zip(jax.tree.leaves(run.variables["params"]), jax.tree.leaves(raw["ema"]["params"])):
        np.testing.assert_array_equal(a, b)
    images = experiment.load_split(c, "test", 50).images
    x = jnp.asarray(run.preprocess(images))
    expected = jax.nn.softmax(run.model.apply(
        {"params": raw["ema"]["params"], "batch_stats": raw["ema"]["batch_stats"]}, x))
    np.testing.assert_allclose(run.predict(images), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(trained.predict(images), run.predict(images), atol=1e-4)
    assert run.evaluate("test", 200)["accuracy"] == pytest.approx(chosen["test_accuracy"],
                                                                  abs=1e-6)


def test_a_run_selecting_either_weights_hands_over_the_better_on_validation(
        tmp_path, real_fashion_mnist):
    workdir = str(tmp_path / "either")
    c = tiny_config(ema_decay=0.8, selection_weights="either", num_epochs=4)
    loop.train_and_evaluate(c, workdir)
    history = records(workdir)
    scored = [(r[f"val_{m}accuracy"], w == "trained", r["step"], w)
              for r in history for w, m in (("trained", ""), ("ema", "ema_"))]
    # the best value, then the trained weights on a tie, then the earliest step
    best = max(scored, key=lambda t: (t[0], t[1], -t[2]))
    with open(os.path.join(workdir, "selected.json")) as f:
        chosen = json.load(f)
    by = "val_accuracy" if best[3] == "trained" else "val_ema_accuracy"
    assert (chosen["step"], chosen["weights"], chosen["by"]) == (best[2], best[3], by)
    assert chosen[by] == best[0]
    assert chosen["compared"] == ["val_accuracy", "val_ema_accuracy"]
    run, at_best = Run.load(workdir), Run.load(workdir, "best")
    assert run.ema == at_best.ema == (best[3] == "ema")
    assert run.step == at_best.step == best[2]
    assert run.evaluate("test", 200)["accuracy"] == pytest.approx(chosen["test_accuracy"],
                                                                  abs=1e-6)


def test_plot_runs_draws_test_accuracy_against_time_for_several_runs(tmp_path):
    from experiments import plot_runs

    runs = []
    for k, name in enumerate(("a", "b")):
        workdir = tmp_path / name
        workdir.mkdir()
        lines = [{"step": i, "epoch": i, "wall_seconds": 30.0 * i * (k + 1),
                  "test_accuracy": 0.88 + 0.01 * i} for i in range(1, 5)]
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (workdir / "selected.json").write_text(json.dumps({"step": 4, "test_accuracy": 0.92}))
        runs += ["--run", f"{name}={workdir}"]
    out = tmp_path / "plot.png"
    assert plot_runs.main(runs + ["--output", str(out)]) == 0
    data = plot_runs.curves({"b": str(tmp_path / "b")})
    assert data["b"]["points"][-1] == (4.0, pytest.approx(0.92))
    assert data["b"]["end_minutes"] == 4.0 and data["b"]["selected"]["test_accuracy"] == 0.92
    assert out.stat().st_size > 10_000
    assert plot_runs.main(["--run", "nolabel", "--output", str(out)]) == 2
