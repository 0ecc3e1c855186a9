"""The training loop: data, model, state and steps wired together, with evaluation,
logging, checkpoints, resume, and plots at the end."""

from __future__ import annotations

import contextlib
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
from resnet_jax.training import guard, transfer
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
    if config.fast_cpu_conv and jax.default_backend() == "cpu":
        from resnet_jax.ops.batch_norm import BatchNorm
        from resnet_jax.ops.cpu_conv import conv_general_dilated
        from resnet_jax.ops.max_pool import max_pool

        if "conv_general_dilated" in fields:
            overrides.setdefault("conv_general_dilated", conv_general_dilated)
        if "max_pool" in fields:
            overrides.setdefault("max_pool", max_pool)
        # Not with statistics synchronised over devices: there, a run resumed on 2x2 devices
        # over processes disagreed with one device by 1e-3 relative in the stem BN's bias
        # after one step (nn.BatchNorm's agree to 1e-5); cpu_speed_log.md sections 11, 15.
        if "batch_norm" in fields and overrides.get("axis_name") is None:
            overrides.setdefault("batch_norm", BatchNorm)
    return get_model(config.model, num_classes=num_classes, **overrides)


def compiler_options(config: ml_collections.ConfigDict, step: str = "train") -> dict | None:
    """XLA options for a jitted train or eval step: the CPU conv path's (`ops.cpu_conv`) when
    it is on."""
    if config.fast_cpu_conv and jax.default_backend() == "cpu":
        from resnet_jax.ops.cpu_conv import compiler_options as cpu_options

        return cpu_options("cpu", step)
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


def _to_rgb(source):
    if source is None:
        return None
    if not isinstance(source, ArraySource):
        raise ValueError("channels=3 needs an in-memory dataset (IDX files or tfds arrays)")
    return ArraySource(np.repeat(source.images, 3, axis=-1), source.labels)


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
    to_rgb = bool(config.channels) and config.channels != image_shape[-1]
    if to_rgb:
        if image_shape[-1] != 1 or config.channels != 3:
            raise ValueError(f"channels={config.channels}: {config.dataset} images have "
                             f"{image_shape[-1]} channel(s); only 1 -> 3 is supported")
        image_shape = (*image_shape[:-1], 3)
    check_input_shape(model, config.model, image_shape)  # before any data is read
    data_dir = config.data_dir or None
    train_source = _subset(load_source(config.dataset, "train", data_dir, config.data_source),
                           config.train_subset) if load_train else None
    eval_source = _subset(load_source(config.dataset, config.eval_split, data_dir,
                                      config.data_source), config.eval_subset)
    if to_rgb:
        train_source, eval_source = _to_rgb(train_source), _to_rgb(eval_source)
    if isinstance(eval_source, ArraySource) and eval_source.images.shape[1:] != image_shape:
        raise ValueError(f"{config.dataset} images have shape {eval_source.images.shape[1:]}, "
                         f"expected {image_shape}")
    n_train = len(train_source) if train_source is not None else config.batch_size
    spe = pipeline.steps_per_epoch(n_train, config.batch_size)
    if config.plateau_accumulation == 0:
        config = ml_collections.ConfigDict(config.to_dict())
        config.plateau_accumulation = spe
    tx, schedule = make_optimizer(config, spe)
    if config.freeze == "backbone":
        tx = transfer.freeze_backbone(tx)
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


def _run_identity(exp: Experiment) -> dict[str, Any]:
    """The fields a checkpoint must share with the run that resumes it."""
    c = exp.config
    return {"model": c.model, "num_classes": int(exp.num_classes), "dataset": c.dataset,
            "image_shape": list(exp.image_shape), "batch_size": int(c.batch_size),
            "seed": int(c.seed)}


def checkpoint_meta(exp: Experiment, seed_key: jax.Array, step: int) -> dict[str, Any]:
    """What a checkpoint records beside the state: enough to continue exactly and to refuse
    a checkpoint that belongs to another run."""
    return {
        **_run_identity(exp),
        # the dropout key of step s is fold_in(dropout_key, s): the RNG state is (key, step)
        "dropout_key": np.asarray(jax.random.key_data(seed_key)).tolist(),
        # the data order is a function of (seed, step): the iterator resumes at `step`
        "data_position": {"step": int(step), "epoch": int(step // exp.steps_per_epoch),
                          "batch_in_epoch": int(step % exp.steps_per_epoch)},
    }


def check_checkpoint_fits(exp: Experiment, meta: dict[str, Any], saved: Any, target: Any,
                          where: str) -> None:
    """A ValueError naming what differs when a checkpoint was written by another model,
    class count, dataset, batch size or seed, or holds differently shaped arrays."""
    for key, value in _run_identity(exp).items():
        if key in meta and meta[key] != value:
            raise ValueError(
                f"checkpoint {where} was written with {key}={meta[key]!r}, but this run has "
                f"{key}={value!r}; use another --workdir (or set {key} to match)")
    for part in ("params", "batch_stats"):
        a = _named_leaves(saved[part] if isinstance(saved, dict) else getattr(saved, part))
        b = _named_leaves(getattr(target, part))
        for key in sorted(set(a) | set(b)):
            name = f"{part}/{key}"
            if key not in b:
                raise ValueError(f"checkpoint {where} has {name}, which the model does not")
            if key not in a:
                raise ValueError(f"checkpoint {where} lacks {name}, which the model has")
            if tuple(np.shape(a[key])) != tuple(np.shape(b[key])):
                raise ValueError(f"checkpoint {where}: {name} has shape {tuple(np.shape(a[key]))}"
                                 f", the model's is {tuple(np.shape(b[key]))}")


def _named_leaves(tree: Any) -> dict[str, Any]:
    """{'layer1_0/conv1/kernel': leaf} whatever the containers (dicts, dataclasses, tuples)."""
    def name(entry) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                return str(getattr(entry, attr))
        return str(entry)

    return {"/".join(name(e) for e in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def init_from_pretrained(exp: Experiment, state: TrainState, directory: str) -> TrainState:
    """`state` with the pretrained variables of `directory` (transfer.merge_pretrained rules)
    and a fresh optimizer state for them."""
    pretrained = transfer.load_pretrained(directory)
    merged, fresh_head = transfer.merge_pretrained(
        {"params": state.params, "batch_stats": state.batch_stats}, pretrained,
        f"init_from={directory!r}")
    log.info("initialised from %s%s", directory,
             f"; head re-initialised: {', '.join(fresh_head)}" if fresh_head else "")
    params = jax.tree.map(jnp.asarray, merged["params"])
    return state.replace(params=params,
                         batch_stats=jax.tree.map(jnp.asarray, merged["batch_stats"]),
                         opt_state=exp.tx.init(params))


def _lock(workdir: str, chief: bool):
    return guard.workdir_lock(workdir) if chief else contextlib.nullcontext()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train per the config into `workdir`, resuming from its latest intact checkpoint.

    Returns the last evaluation record (with "stopped": signal name when SIGTERM/SIGINT
    ended the run early, after saving a checkpoint at the step it had reached).
    """
    maybe_initialize_distributed(config)
    exp = setup(config)
    chief = jax.process_index() == 0
    with _lock(workdir, chief), guard.StopSignal() as stop:
        return _train(exp, workdir, chief, stop)


def _train(exp: Experiment, workdir: str, chief: bool, stop: guard.StopSignal) -> dict[str, Any]:
    config = exp.config
    if chief:
        _write_config(config, workdir)
    strategy = make_strategy(
        config.parallel,
        lambda axis: make_train_step(exp.model, exp.tx, exp.schedule, config.label_smoothing, axis,
                                     config.skip_nonfinite_steps, config.freeze == "backbone"),
        lambda axis: make_eval_step(exp.model, exp.num_classes, axis),
        config.batch_size, config.eval_batch_size, compiler_options(config),
        compiler_options(config, "eval"))
    root = jax.random.key(config.seed)
    init_rng, dropout_rng = jax.random.split(root)
    state = jax.jit(create_train_state, static_argnums=(0, 1, 3))(
        exp.model, exp.tx, init_rng, exp.image_shape)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    where = os.path.join(workdir, "checkpoints")
    try:
        restored = ckpt.restore_checked(
            state, check=lambda meta, saved: check_checkpoint_fits(exp, meta, saved, state, where))
    except BaseException:
        ckpt.close()
        raise
    if restored is not None:
        state = restored.state
        log.info("resumed from step %d", restored.step)
        if chief:
            print(f"resumed from step {restored.step}", file=sys.stderr, flush=True)
    elif config.init_from:
        state = init_from_pretrained(exp, state, config.init_from)
    start_step = int(state.step)
    state = strategy.place_state(state)

    history = [r for r in metrics_lib.read_metrics(workdir) if r["step"] <= start_step]
    if chief:
        metrics_lib.rewrite_metrics(workdir, history)  # drop records past the resumed step
    writer = metrics_lib.MetricWriter(workdir, enabled=chief)
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
    loop = _Window(exp, strategy, workdir, bar, start_step, chief)
    record: dict[str, Any] = history[-1] if history else {}
    step = start_step
    stopped = ""

    def save(which: str = "latest") -> None:
        loop.flush(step)  # never save a state that went non-finite
        meta = checkpoint_meta(exp, dropout_rng, step)
        gathered = strategy.gather_state(state)
        if which == "best":
            ckpt.save_best(gathered, step, meta)
        else:
            ckpt.save_latest(gathered, step, meta)

    try:
        while step < end_step:
            batch = next(batches)
            state, m = strategy.train_step(state, batch, dropout_rng)
            loop.window.append(m)
            step += 1
            at_epoch_end = step % exp.steps_per_epoch == 0
            if len(loop.window) >= config.log_every_steps or at_epoch_end or step == end_step:
                loop.flush(step)
            epoch = step / exp.steps_per_epoch
            eval_now = (at_epoch_end and round(epoch) % config.eval_every_epochs == 0) \
                or step == exp.total_steps
            if eval_now:
                result = evaluate(exp, state, strategy.eval_step, strategy)
                record = loop.epoch_record(step, result)
                writer.write(record)
                history.append(record)
                save()
                if result["top1"] > best_accuracy:
                    best_accuracy = result["top1"]
                    save("best")
                loop.window_start = time.perf_counter()
            elif config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
                save()
            if _stop_requested(stop, step, config.log_every_steps):
                stopped = stop.name or "stop"
                save()
                break
        if step == end_step:
            save()
    finally:
        bar.close()
        ckpt.close()  # waits for the saves in flight, then writes their manifests
        writer.close()

    if stopped:
        if chief:
            print(f"received {stopped} at step {step}: checkpoint saved to {where}; run the "
                  "same command again to resume from it", file=sys.stderr, flush=True)
        return dict(record, stopped=stopped, step=step)
    if step == exp.total_steps and history:
        final = evaluate(exp, state, strategy.eval_step, strategy)
        if not chief:
            return record
        plots = os.path.join(workdir, "plots")
        metrics_lib.plot_curves(history, os.path.join(plots, "curves.png"))
        metrics_lib.plot_confusion_matrix(final["confusion"], exp.info.class_names,
                                          os.path.join(plots, "confusion_matrix.png"))
    return record


def _stop_requested(stop: guard.StopSignal, step: int, every: int) -> bool:
    """Whether to stop after `step`. One process: as soon as a signal arrived. Several:
    every `every` steps, all processes agree (any one signalled), so they save the same step."""
    if jax.process_count() == 1:
        return stop.received is not None
    if step % max(every, 1):
        return False
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(stop.received is not None))
    return bool(np.any(flags))


class _Window:
    """The step metrics not yet looked at: fetched, checked for non-finite values, summed
    into the epoch's numbers, shown on the progress bar and appended to train_metrics.jsonl."""

    def __init__(self, exp: Experiment, strategy: Strategy, workdir: str, bar, step: int,
                 chief: bool):
        self.exp, self.strategy, self.bar, self.chief = exp, strategy, bar, chief
        self.path = os.path.join(workdir, "train_metrics.jsonl")
        self.window: list[dict[str, jax.Array]] = []
        self.window_start, self.window_step = time.perf_counter(), step
        self.epoch_sums = {"loss": 0.0, "accuracy": 0.0, "n": 0}
        self.epoch_images, self.epoch_time = 0, 0.0
        self.last_lr = float("nan")
        self.skipped = 0

    def flush(self, step: int) -> None:
        if not self.window:
            return
        config = self.exp.config
        fetched = [jax.tree.map(fetch, self.strategy.first(m)) for m in self.window]
        self.window = []
        first_step = step - len(fetched) + 1
        for k, f in enumerate(fetched):
            if not bool(f["finite"]):
                if not config.skip_nonfinite_steps:
                    raise FloatingPointError(
                        f"non-finite loss or gradient at step {first_step + k} (counting from "
                        f"1); the latest checkpoint is the last finite state. Lower the "
                        "learning rate, clip gradients (grad_clip) or set skip_nonfinite_steps")
                self.skipped += 1
                log.warning("step %d: non-finite loss or gradient, update skipped",
                            first_step + k)
                continue
            self.epoch_sums["loss"] += float(f["loss"])
            self.epoch_sums["accuracy"] += float(f["accuracy"])
            self.epoch_sums["n"] += 1
        elapsed = time.perf_counter() - self.window_start
        images = (step - self.window_step) * config.batch_size
        ips = images / max(elapsed, 1e-9)
        self.epoch_images += images
        self.epoch_time += elapsed
        last = fetched[-1]
        self.last_lr = float(last["learning_rate"])
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{float(last['loss']):.4f}",
                             acc=f"{np.mean([float(f['accuracy']) for f in fetched]):.3f}",
                             img_s=f"{ips:.0f}", lr=f"{self.last_lr:.4g}")
        if self.chief:
            with open(self.path, "a") as out:
                out.write(json.dumps({"step": step, "loss": float(last["loss"]),
                                      "accuracy": float(np.mean([float(f["accuracy"])
                                                                 for f in fetched])),
                                      "learning_rate": self.last_lr,
                                      "images_per_second": ips,
                                      "skipped_steps": self.skipped}) + "\n")
        self.window_start, self.window_step = time.perf_counter(), step

    def epoch_record(self, step: int, result: dict[str, Any]) -> dict[str, Any]:
        n = max(self.epoch_sums["n"], 1)
        record = {
            "step": step, "epoch": round(step / self.exp.steps_per_epoch, 4),
            "learning_rate": self.last_lr,
            "train_loss": self.epoch_sums["loss"] / n,
            "train_accuracy": self.epoch_sums["accuracy"] / n,
            "test_loss": result["loss"], "test_accuracy": result["top1"],
            "test_top5_accuracy": result["top5"], "test_count": result["count"],
            "images_per_second": self.epoch_images / max(self.epoch_time, 1e-9),
        }
        if self.skipped:
            record["skipped_steps"] = self.skipped
        if self.chief:
            self.bar.write(f"epoch {record['epoch']:g}: train loss {record['train_loss']:.4f} acc "
                           f"{record['train_accuracy']:.4f} | test loss {result['loss']:.4f} acc "
                           f"{result['top1']:.4f} | {record['images_per_second']:.0f} img/s")
        self.epoch_sums = {"loss": 0.0, "accuracy": 0.0, "n": 0}
        self.epoch_images, self.epoch_time = 0, 0.0
        return record
