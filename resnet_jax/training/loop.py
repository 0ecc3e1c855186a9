"""The training loop: data, model, state and steps wired together, with evaluation,
logging, checkpoints, resume, and plots at the end."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax.data import pipeline
from resnet_jax.data.sources import DATASETS, ArraySource, DatasetInfo, load_source
from resnet_jax.models import get_model, get_spec
from resnet_jax.training import metrics as metrics_lib
from resnet_jax.training.checkpoint import Checkpointer
from resnet_jax.training.config import total_steps, validate_config
from resnet_jax.training.optim import make_optimizer
from resnet_jax.training.parallel import Strategy, fetch, make_strategy, maybe_initialize_distributed
from resnet_jax.training.state import TrainState, create_train_state
from resnet_jax.training.steps import make_eval_step, make_train_step

log = logging.getLogger("resnet_jax")


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The registry model of the config, with its compute dtype and overrides."""
    overrides = dict(config.model_overrides.to_dict()) if config.model_overrides else {}
    overrides["dtype"] = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    spec = get_spec(config.model)
    fields = {f.name for f in dataclasses.fields(spec.cls)}
    if config.get("sync_batch_norm", False) and config.get("parallel", "single") != "single":
        if "axis_name" not in fields:
            raise ValueError(f"sync_batch_norm=True but model {config.model!r} has no BatchNorm")
        overrides["axis_name"] = "data"
    if config.fast_cpu_conv and jax.default_backend() == "cpu" and "conv_general_dilated" in fields:
        from resnet_jax.ops.cpu_conv import conv_general_dilated

        overrides.setdefault("conv_general_dilated", conv_general_dilated)
    return get_model(config.model, num_classes=num_classes, **overrides)


def compiler_options(config: ml_collections.ConfigDict) -> dict | None:
    """XLA options for the jitted steps: the CPU conv path's (`ops.cpu_conv`) when it is on."""
    if config.fast_cpu_conv and jax.default_backend() == "cpu":
        from resnet_jax.ops.cpu_conv import compiler_options as cpu_options

        return cpu_options("cpu")
    return None


def check_input_shape(model, name: str, shape: tuple[int, ...]) -> None:
    """Trace the model on `shape` without running it; a ValueError names a shape it cannot take."""
    try:
        jax.eval_shape(model.init, {"params": jax.random.key(0), "dropout": jax.random.key(0)},
                       jax.ShapeDtypeStruct((1, *shape), jnp.float32))
    except Exception as err:  # noqa: BLE001 - any failure here is a shape mismatch
        raise ValueError(f"model {name!r} cannot take images of shape {shape}: {err}") from err


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, built from the config (no training done yet)."""

    config: ml_collections.ConfigDict
    info: DatasetInfo
    train_source: Any
    eval_source: Any
    image_shape: tuple[int, int, int]
    num_classes: int
    model: Any
    tx: Any
    schedule: Any
    steps_per_epoch: int
    total_steps: int


def _subset(source, n: int):
    if n and isinstance(source, ArraySource) and n < len(source):
        return ArraySource(source.images[:n], source.labels[:n])
    return source


def setup(config: ml_collections.ConfigDict, load_train: bool = True) -> Experiment:
    """Validate the config, load the data, build model and optimizer."""
    validate_config(config)
    info = DATASETS[config.dataset]
    num_classes = config.num_classes or info.num_classes
    model = build_model(config, num_classes)
    if info.image_shape is not None:
        image_shape = info.image_shape
    else:
        size = config.image_size or 224
        image_shape = (size, size, 3)
    check_input_shape(model, config.model, image_shape)  # before any data is read
    data_dir = config.data_dir or None
    train_source = _subset(load_source(config.dataset, "train", data_dir, config.data_source),
                           config.train_subset) if load_train else None
    eval_source = _subset(load_source(config.dataset, config.eval_split, data_dir,
                                      config.data_source), config.eval_subset)
    if isinstance(eval_source, ArraySource) and eval_source.images.shape[1:] != image_shape:
        raise ValueError(f"{config.dataset} images have shape {eval_source.images.shape[1:]}, "
                         f"expected {image_shape}")
    n_train = len(train_source) if train_source is not None else config.batch_size
    spe = pipeline.steps_per_epoch(n_train, config.batch_size)
    if config.plateau_accumulation == 0:
        config = ml_collections.ConfigDict(config.to_dict())
        config.plateau_accumulation = spe
    tx, schedule = make_optimizer(config, spe)
    return Experiment(config, info, train_source, eval_source, image_shape, num_classes, model,
                      tx, schedule, spe, total_steps(config, spe))


def evaluate(exp: Experiment, state: TrainState, eval_step, strategy: Strategy | None = None
             ) -> dict[str, Any]:
    """Accuracy and loss over every example of the evaluation split, exactly once.

    With a strategy, each process feeds its part of every batch and the mapped step sums
    over all devices; `eval_step` is then the strategy's.
    """
    put = strategy.put_eval_batch if strategy else (lambda b: b)
    first = strategy.first if strategy else (lambda m: m)
    totals = None
    for batch in pipeline.eval_batches(exp.eval_source, exp.info, exp.config.eval_batch_size,
                                       exp.config.image_size or None, jax.process_index(),
                                       jax.process_count()):
        sums = first(eval_step(state, put(batch)))
        sums = jax.tree.map(fetch, sums)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    return metrics_lib.summarize_eval(totals)


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(json.loads(config.to_json_best_effort()), f, indent=2, sort_keys=True)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30.0, file=sys.stderr)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train per the config into `workdir`, resuming from its latest checkpoint if any.

    Returns the last evaluation record.
    """
    maybe_initialize_distributed(config)
    exp = setup(config)
    config = exp.config
    chief = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if chief:
        _write_config(config, workdir)

    strategy = make_strategy(
        config.parallel,
        lambda axis: make_train_step(exp.model, exp.tx, exp.schedule, config.label_smoothing, axis),
        lambda axis: make_eval_step(exp.model, exp.num_classes, axis),
        config.batch_size, config.eval_batch_size, compiler_options(config))
    root = jax.random.key(config.seed)
    init_rng, dropout_rng = jax.random.split(root)
    state = jax.jit(create_train_state, static_argnums=(0, 1, 3))(
        exp.model, exp.tx, init_rng, exp.image_shape)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    restored = ckpt.restore(state)
    if restored is not None:
        state = restored
        log.info("resumed from step %d", int(state.step))
    start_step = int(state.step)
    state = strategy.place_state(state)

    writer = metrics_lib.MetricWriter(workdir, enabled=chief)
    history = [r for r in metrics_lib.read_metrics(workdir) if r["step"] <= start_step]
    best_accuracy = max((r["test_accuracy"] for r in history), default=-1.0)

    end_step = exp.total_steps
    if config.halt_after_steps:
        end_step = min(end_step, config.halt_after_steps)
    batches = pipeline.prefetch(
        pipeline.train_batches(exp.train_source, exp.info, config.batch_size, config.seed,
                               start_step, config.augment or None, config.image_size or None,
                               jax.process_index(), jax.process_count()),
        strategy.put_train_batch)
    bar = _progress(exp.total_steps, start_step, config.progress_bar and chief)
    window: list[dict[str, jax.Array]] = []
    epoch_sums = {"loss": 0.0, "accuracy": 0.0, "n": 0}
    window_start, window_step = time.perf_counter(), start_step
    epoch_images, epoch_time = 0, 0.0
    record: dict[str, Any] = history[-1] if history else {}
    last_lr = float("nan")
    step = start_step
    try:
        while step < end_step:
            batch = next(batches)
            state, m = strategy.train_step(state, batch, dropout_rng)
            window.append(m)
            step += 1
            at_epoch_end = step % exp.steps_per_epoch == 0
            if len(window) >= config.log_every_steps or at_epoch_end or step == end_step:
                fetched = [jax.tree.map(fetch, strategy.first(m)) for m in window]
                elapsed = time.perf_counter() - window_start
                ips = (step - window_step) * config.batch_size / max(elapsed, 1e-9)
                epoch_images += (step - window_step) * config.batch_size
                epoch_time += elapsed
                for k, f in enumerate(fetched):
                    if not bool(f["finite"]):
                        raise FloatingPointError(
                            f"non-finite loss or gradient at step {step - len(fetched) + k + 1}")
                    epoch_sums["loss"] += float(f["loss"])
                    epoch_sums["accuracy"] += float(f["accuracy"])
                    epoch_sums["n"] += 1
                bar.update(step - bar.n)
                bar.set_postfix(loss=f"{float(fetched[-1]['loss']):.4f}",
                                acc=f"{np.mean([float(f['accuracy']) for f in fetched]):.3f}",
                                img_s=f"{ips:.0f}", lr=f"{float(fetched[-1]['learning_rate']):.4g}")
                last_lr = float(fetched[-1]["learning_rate"])
                window = []
                window_start, window_step = time.perf_counter(), step
            epoch = step / exp.steps_per_epoch
            eval_now = (at_epoch_end and round(epoch) % config.eval_every_epochs == 0) \
                or step == exp.total_steps
            if eval_now:
                result = evaluate(exp, state, strategy.eval_step, strategy)
                record = {
                    "step": step, "epoch": round(epoch, 4), "learning_rate": last_lr,
                    "train_loss": epoch_sums["loss"] / max(epoch_sums["n"], 1),
                    "train_accuracy": epoch_sums["accuracy"] / max(epoch_sums["n"], 1),
                    "test_loss": result["loss"], "test_accuracy": result["top1"],
                    "test_top5_accuracy": result["top5"], "test_count": result["count"],
                    "images_per_second": epoch_images / max(epoch_time, 1e-9),
                }
                writer.write(record)
                history.append(record)
                if chief:
                    bar.write(f"epoch {epoch:g}: train loss {record['train_loss']:.4f} acc "
                              f"{record['train_accuracy']:.4f} | test loss {result['loss']:.4f} "
                              f"acc {result['top1']:.4f} | {record['images_per_second']:.0f} img/s")
                epoch_sums = {"loss": 0.0, "accuracy": 0.0, "n": 0}
                epoch_images, epoch_time = 0, 0.0
                ckpt.save_latest(strategy.gather_state(state), step)
                if result["top1"] > best_accuracy:
                    best_accuracy = result["top1"]
                    ckpt.save_best(strategy.gather_state(state), step)
                window_start = time.perf_counter()
            elif config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
                ckpt.save_latest(strategy.gather_state(state), step)
        if step == end_step:
            ckpt.save_latest(strategy.gather_state(state), step)
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        writer.close()

    if step == exp.total_steps and history:
        final = evaluate(exp, state, strategy.eval_step, strategy)
        if not chief:
            return record
        plots = os.path.join(workdir, "plots")
        metrics_lib.plot_curves(history, os.path.join(plots, "curves.png"))
        metrics_lib.plot_confusion_matrix(final["confusion"], exp.info.class_names,
                                          os.path.join(plots, "confusion_matrix.png"))
    return record
