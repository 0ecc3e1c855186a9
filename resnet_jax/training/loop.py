"""The training loop: steps, evaluation, logging, checkpoints and preemption, top to bottom.

The pieces it runs are built elsewhere: data, model, optimizer and durations by
`experiment.setup`, the mapped steps by `experiment.build_strategy`; metrics by `metrics`,
checkpoints by `checkpoint`, the workdir lock and signals by `guard`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from resnet_jax.data import workers
from resnet_jax.data.prefetch import prefetch
from resnet_jax.training import (compilation_cache, config as config_lib, experiment, guard,
                                 metrics, preflight, selection, timing, transfer)
from resnet_jax.training import checkpoint as checkpoint_lib
from resnet_jax.training.checkpoint import Checkpointer
from resnet_jax.training.evaluation import evaluate_split, selected, with_plateau_scale
from resnet_jax.training.experiment import Experiment
from resnet_jax.training.parallel import fetch, maybe_initialize_distributed
from resnet_jax.training.state import create_train_state
from resnet_jax.training import rundir

log = logging.getLogger("resnet_jax")

NONFINITE_HELP = ("Lower the learning rate, clip gradients (grad_clip) or set "
                  "skip_nonfinite_steps")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train per the config into `workdir`, resuming from its latest intact checkpoint.

    Returns the last evaluation record (with "stopped": signal name when SIGTERM/SIGINT
    ended the run early, after saving a checkpoint at the step it had reached).
    """
    entered = time.monotonic()
    guard.check_workdir(workdir)
    compilation_cache.configure(config.compilation_cache)
    maybe_initialize_distributed(config)
    exp = experiment.setup(config)
    chief = jax.process_index() == 0
    lock = guard.workdir_lock(workdir) if chief else contextlib.nullcontext()
    with lock, guard.StopSignal() as stop:
        return _train(exp, workdir, chief, stop, entered)


def _train(exp: Experiment, workdir: str, chief: bool, stop: guard.StopSignal,
           entered: float) -> dict[str, Any]:
    config, d = exp.config, exp.durations
    if chief:
        _write_config(config, workdir)
    strategy = experiment.build_strategy(exp)
    init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))
    state = jax.jit(create_train_state, static_argnums=(0, 1, 3, 4))(
        exp.model, exp.tx, init_rng, exp.image_shape, config.ema_decay > 0)
    where = rundir.path(workdir, rundir.CHECKPOINTS)
    ckpt = Checkpointer(where, keep=config.keep_checkpoints)
    try:
        state, saved = _restore_or_initialize(exp, state, ckpt, where, chief)
    except BaseException:
        ckpt.close()
        raise
    start_step = step = int(state.step)
    state = strategy.place_state(state)
    preflight.check(exp, strategy, state, dropout_rng)  # before any batch is read
    data = experiment.train_data(exp, start_step, saved.get("pipeline"))
    data_state = data.get_state()  # the pipeline's position after the last step's batch
    history = [r for r in metrics.read_metrics(workdir) if r["step"] <= start_step]
    if chief:
        metrics.rewrite_metrics(workdir, history)  # drop records past the resumed step
    writer = metrics.MetricWriter(workdir, enabled=chief)
    decisions = (selection.Decisions.from_dict(saved["decisions"]) if saved.get("decisions")
                 else selection.initial(config))
    record: dict[str, Any] = history[-1] if history else {}
    batches = prefetch(data, lambda b: (strategy.put_train_batch(
        {"image": b["image"], "label": b["label"]}), int(np.sum(b.get("corrupt", 0)))),
        state=data.get_state)
    corrupt = int(record.get("corrupt_images", 0))
    bar = metrics.progress_bar(d.total_steps, start_step, config.progress_bar and chief)
    pending: list[dict[str, jax.Array]] = []  # step metrics not yet fetched from the devices
    period = metrics.Mean()  # train metrics since the last evaluation
    clock = timing.Clock(config, workdir, chief, start_step, entered, d)
    started = time.monotonic() - record.get("wall_seconds", 0.0)  # a resumed run goes on counting
    skipped, stopped, early, confusion = 0, "", False, {}

    def flush() -> None:
        """Fetch the pending metrics; stop on a non-finite step (or skip it); log the rest."""
        nonlocal skipped
        if not pending:
            return
        fetched = [jax.tree.map(fetch, strategy.first(m)) for m in pending]
        pending.clear()
        window = metrics.Mean()
        for k, values in enumerate(fetched, start=step - len(fetched) + 1):
            if not bool(values.pop("finite")):
                if not config.skip_nonfinite_steps:
                    raise FloatingPointError(
                        f"non-finite loss or gradient at step {k} (counting from 1); the latest "
                        f"checkpoint is the last finite state. {NONFINITE_HELP}")
                skipped += 1
                log.warning("step %d: non-finite loss or gradient, update skipped", k)
                continue
            window.add(values)
            period.add(values)
        line = {**window.result(), **clock.speed.window(step)}
        if config.skip_corrupt_images:
            line["corrupt_images"] = corrupt
        metrics.show(bar, step, line)
        if chief:
            metrics.append_jsonl(rundir.path(workdir, rundir.TRAIN_METRICS),
                                 {"step": step, **line, "skipped_steps": skipped})

    def save(which: str = "latest") -> None:
        flush()  # never save a state that went non-finite
        meta = checkpoint_lib.meta(experiment.run_identity(exp), dropout_rng, step,
                                   d.steps_per_epoch,
                                   {"workers": config.data_workers, "state": data_state})
        if decisions is not None:
            meta["decisions"] = decisions.to_dict()
        gathered = strategy.gather_state(state)
        (ckpt.save_best if which == "best" else ckpt.save_latest)(gathered, step, meta)

    try:
        while step < d.end_step:
            (batch, bad), data_state = clock.next_batch(batches, step + 1)
            with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                state, step_metrics = strategy.train_step(state, batch, dropout_rng)
            corrupt += bad
            pending.append(step_metrics)
            step += 1
            clock.after(step, step_metrics)
            if len(pending) >= config.log_every_steps or step % d.steps_per_epoch == 0 \
                    or step == d.end_step:
                flush()
            if step % d.eval_every_steps == 0 or step == d.total_steps:
                flush()
                record = _record(step, d, period, clock.speed, skipped)
                record["wall_seconds"] = round(time.monotonic() - started, 2)
                clock.annotate(record)
                new_best = False
                if decisions is not None:
                    record.update(evaluate_split(exp, state, strategy, "val"))
                    scale = decisions.plateau and decisions.plateau.scale
                    decisions, new_best, early = selection.decide(config, decisions, record, step)
                    if decisions.plateau and decisions.plateau.scale != scale:
                        state = strategy.place_state(with_plateau_scale(
                            strategy.gather_state(state), decisions.plateau.scale))
                if config.test_every_period or early or step == d.total_steps:
                    record.update(evaluate_split(exp, state, strategy, "test"))
                confusion = {k: record.pop(k) for k in list(record) if k.endswith("_confusion")}
                if config.skip_corrupt_images:
                    record["corrupt_images"] = corrupt
                period = metrics.Mean()
                writer.write(record)
                history.append(record)
                if chief:
                    bar.write(metrics.summary_line(record))
                save()
                if new_best:
                    save("best")
                clock.speed.restart(step)  # evaluation time is not training throughput
            elif d.checkpoint_every_steps and step % d.checkpoint_every_steps == 0:
                save()
            if early:
                log.info("early stopping at step %d: %s did not improve for %d periods", step,
                         config.selection_metric, config.early_stopping_patience)
                break
            if guard.stop_requested(stop, step, config.log_every_steps):
                stopped = stop.name or "stop"
                save()
                break
        if step == d.end_step or early:
            save()
    finally:
        clock.close()
        batches.close()
        workers.close(data)
        bar.close()
        ckpt.close()  # waits for the saves in flight, then writes their manifests
        writer.close()

    if stopped:
        if chief:
            print(f"received {stopped} at step {step}: checkpoint saved to {where}; run the "
                  "same command again to resume from it", file=sys.stderr, flush=True)
        return dict(record, stopped=stopped, step=step)
    if (step == d.total_steps or early) and history:
        chosen = selected(exp, state, strategy, decisions, record, confusion, where)  # all processes
        if chief:
            metrics.write_json(rundir.path(workdir, rundir.SELECTED), chosen["summary"])
            plots = rundir.path(workdir, rundir.PLOTS)
            metrics.plot_curves(history, os.path.join(plots, "curves.png"))
            metrics.plot_confusion_matrix(chosen["confusion"], exp.info.class_names,
                                          os.path.join(plots, "confusion_matrix.png"))
        return dict(record, selected=chosen["summary"])
    return record


def _restore_or_initialize(exp: Experiment, state, ckpt: Checkpointer, where: str,
                           chief: bool):
    """(state, the checkpoint's meta or {}): the latest intact checkpoint that belongs to
    this run; else the pretrained start of `init_from`; else `state` as initialised."""
    identity = experiment.run_identity(exp)
    restored = ckpt.restore_checked(
        state, check=lambda meta, saved: checkpoint_lib.check_fits(identity, meta, saved, state,
                                                                   where))
    if restored is not None:
        log.info("resumed from step %d", restored.step)
        if chief:
            print(f"resumed from step {restored.step}", file=sys.stderr, flush=True)
        return restored.state, restored.meta
    if exp.config.init_from:
        return transfer.init_from_pretrained(state, exp.tx, exp.config.init_from), {}
    return state, {}


def _record(step: int, d, period: metrics.Mean, speed: metrics.Throughput, skipped: int
            ) -> dict[str, Any]:
    """The start of a line of metrics.jsonl: every train metric's mean over the period
    (`train_` + key) and the period's throughput; the evaluations add `val_*`/`test_*`."""
    record: dict[str, Any] = {"step": step, "epoch": round(step / d.steps_per_epoch, 4)}
    record.update({f"train_{k}": v for k, v in period.result().items()})
    rates = speed.period()
    record["images_per_second"] = rates["images_per_second"]
    record["train_data_wait"] = round(rates["data_wait"], 4)
    if skipped:
        record["skipped_steps"] = skipped
    return record


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(rundir.path(workdir, rundir.CONFIG), "w") as f:
        json.dump(config_lib.config_to_dict(config), f, indent=2, sort_keys=True)
