"""The training loop: steps, evaluation, logging, checkpoints and preemption, read top to
bottom in `_Loop.run` and the short methods it calls.

The pieces it runs are built elsewhere: data, model, optimizer and durations by
`experiment.setup`, the mapped steps by `experiment.build_strategy`, the pre-flight check by
`preflight`; metrics by `metrics`, the time lines by `timing`, checkpoints by `checkpoint`,
decisions on validation by `selection`, the workdir lock and signals by `guard`.
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
from resnet_jax.training import (compilation_cache, config_json, experiment, guard, metrics,
                                 preflight, selection, timing, trackers, transfer)
from resnet_jax.training import checkpoint as checkpoint_lib
from resnet_jax.training.checkpoint import Checkpointer
from resnet_jax.training.evaluation import evaluate_split, selected, with_plateau_scale
from resnet_jax.training.experiment import Experiment
from resnet_jax.training.parallel import fetch, maybe_initialize_distributed
from resnet_jax.training import rundir
from resnet_jax.training.state import create_train_state

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
    trackers.check(config)  # installed and reachable, before anything is trained
    compilation_cache.configure(config.compilation_cache)
    maybe_initialize_distributed(config)
    exp = experiment.setup(config)
    chief = jax.process_index() == 0
    lock = guard.workdir_lock(workdir) if chief else contextlib.nullcontext()
    with lock, guard.StopSignal() as stop:
        return _train(exp, workdir, chief, stop, entered)


def _train(exp: Experiment, workdir: str, chief: bool, stop: guard.StopSignal,
           entered: float) -> dict[str, Any]:
    if chief:
        _write_config(exp.config, workdir)
    loop = _Loop(exp, workdir, chief, entered)
    try:
        try:
            loop.run(stop)
        finally:
            loop.close()
        return loop.result()
    finally:
        loop.trackers.close()  # after the result: the selected model and plots reach them


class _Loop:
    """One run's training, its state explicit: the train state and its step, the data and
    its position, the pending step metrics, the records written, the selection decisions."""

    def __init__(self, exp: Experiment, workdir: str, chief: bool, entered: float):
        config, self.d = exp.config, exp.durations
        self.exp, self.config, self.workdir, self.chief = exp, config, workdir, chief
        self.strategy = experiment.build_strategy(exp)
        init_rng, self.dropout_rng = jax.random.split(jax.random.key(config.seed))
        state = jax.jit(create_train_state, static_argnums=(0, 1, 3, 4))(
            exp.model, exp.tx, init_rng, exp.image_shape, config.ema_decay > 0)
        self.where = rundir.path(workdir, rundir.CHECKPOINTS)
        self.ckpt = Checkpointer(self.where, keep=config.keep_checkpoints)
        try:
            state, saved = _restore_or_initialize(exp, state, self.ckpt, self.where, chief)
        except BaseException:
            self.ckpt.close()
            raise
        self.start_step = self.step = int(state.step)
        self.state = self.strategy.place_state(state)
        preflight.check(exp, self.strategy, self.state, self.dropout_rng)  # before any batch
        self._open_data(saved.get("pipeline"))
        self._open_records(saved.get("decisions"), entered)

    def _open_data(self, position: dict | None, put=None) -> None:
        """The training batches from the resumed step, put on the devices ahead of use (by
        `put`, else the strategy)."""
        self.data = experiment.train_data(self.exp, self.start_step, position)
        self.data_state = self.data.get_state()  # the position after the last step's batch
        put = put or self.strategy.put_train_batch
        self.batches = prefetch(self.data, lambda b: (
            put({"image": b["image"], "label": b["label"]}), int(np.sum(b.get("corrupt", 0)))),
            state=self.data.get_state)

    def _open_records(self, decisions: dict | None, entered: float) -> None:
        """metrics.jsonl cut back to the resumed step, its writer, the progress bar and the
        clock; the selection decisions as the checkpoint left them."""
        config, workdir = self.config, self.workdir
        self.history = [r for r in metrics.read_metrics(workdir) if r["step"] <= self.start_step]
        if self.chief:
            metrics.rewrite_metrics(workdir, self.history)  # drop records past the resumed step
        self.writer = metrics.MetricWriter(workdir, enabled=self.chief,
                                           tensorboard="tensorboard" in config.trackers)
        self.trackers = trackers.open_trackers(config, workdir, self.chief)
        self.trackers.catch_up(self.history, workdir, self.start_step)
        self.decisions = (selection.Decisions.from_dict(decisions) if decisions
                          else selection.initial(config))
        self.record: dict[str, Any] = self.history[-1] if self.history else {}
        self.corrupt = int(self.record.get("corrupt_images", 0))
        self.bar = metrics.progress_bar(self.d.total_steps, self.start_step,
                                        config.progress_bar and self.chief)
        self.pending: list[dict[str, jax.Array]] = []  # step metrics not fetched yet
        self.period = metrics.Mean()  # train metrics since the last evaluation
        self.clock = timing.Clock(config, workdir, self.chief, self.start_step, entered, self.d)
        # a resumed run goes on counting its wall time
        self.started = time.monotonic() - self.record.get("wall_seconds", 0.0)
        self.skipped, self.stopped, self.early, self.confusion = 0, "", False, {}

    def run(self, stop: guard.StopSignal) -> None:
        """Steps until the end (or early stopping, or a stop signal), evaluating and
        checkpointing on the way."""
        d = self.d
        while self.step < d.end_step:
            self._train_step()
            if len(self.pending) >= self.config.log_every_steps \
                    or self.step % d.steps_per_epoch == 0 or self.step == d.end_step:
                self._flush()
            if self.step % d.eval_every_steps == 0 or self.step == d.total_steps:
                self._end_period()
            elif d.checkpoint_every_steps and self.step % d.checkpoint_every_steps == 0:
                self._save()
            if self.early:
                log.info("early stopping at step %d: %s did not improve for %d periods",
                         self.step, self.config.selection_metric,
                         self.config.early_stopping_patience)
                break
            if guard.stop_requested(stop, self.step, self.config.log_every_steps):
                self.stopped = stop.name or "stop"
                self._save()
                break
        if self.step == d.end_step or self.early:
            self._save()

    def _train_step(self) -> None:
        (batch, bad), self.data_state = self.clock.next_batch(self.batches, self.step + 1)
        with jax.profiler.StepTraceAnnotation("train", step_num=self.step + 1):
            self.state, step_metrics = self.strategy.train_step(self.state, batch,
                                                                self.dropout_rng)
        self.corrupt += bad
        self.pending.append(step_metrics)
        self.step += 1
        self.clock.after(self.step, step_metrics)

    def _flush(self) -> None:
        """Fetch the pending metrics; stop on a non-finite step (or skip it); log the rest."""
        if not self.pending:
            return
        fetched = self._fetch_pending()
        self.pending.clear()
        window = metrics.Mean()
        for k, values in enumerate(fetched, start=self.step - len(fetched) + 1):
            if not bool(values.pop("finite")):
                if not self.config.skip_nonfinite_steps:
                    raise FloatingPointError(
                        f"non-finite loss or gradient at step {k} (counting from 1); the latest "
                        f"checkpoint is the last finite state. {NONFINITE_HELP}")
                self.skipped += 1
                log.warning("step %d: non-finite loss or gradient, update skipped", k)
                continue
            window.add(values)
            self.period.add(values)
        line = {**window.result(), **self.clock.speed.window(self.step)}
        if self.config.skip_corrupt_images:
            line["corrupt_images"] = self.corrupt
        metrics.show(self.bar, self.step, line)
        if self.chief:
            metrics.append_jsonl(rundir.path(self.workdir, rundir.TRAIN_METRICS),
                                 {"step": self.step, **line, "skipped_steps": self.skipped})
            self.trackers.log_steps(self.step, line)

    def _fetch_pending(self) -> list[dict[str, Any]]:
        """The pending step metrics on the host, oldest first."""
        return [jax.tree.map(fetch, self.strategy.first(m)) for m in self.pending]

    def _end_period(self) -> None:
        """The period's record: train means, validation (and the decisions taken on it),
        test where due; written, shown and checkpointed (the best too when it is)."""
        self._flush()
        exp, strategy, step = self.exp, self.strategy, self.step
        record = _record(step, self.d, self.period, self.clock.speed, self.skipped)
        record["wall_seconds"] = round(time.monotonic() - self.started, 2)
        self.clock.annotate(record)
        new_best = False
        if self.decisions is not None:
            record.update(evaluate_split(exp, self.state, strategy, "val"))
            new_best = self._decide(record)
        if self.config.test_every_period or self.early or step == self.d.total_steps:
            record.update(evaluate_split(exp, self.state, strategy, "test"))
        self.confusion = {k: record.pop(k) for k in list(record) if k.endswith("_confusion")}
        if self.config.skip_corrupt_images:
            record["corrupt_images"] = self.corrupt
        self.period = metrics.Mean()
        self.writer.write(record)
        self.trackers.log_record(record)
        self.history.append(record)
        self.record = record
        if self.chief:
            self.bar.write(metrics.summary_line(record))
        self._save()
        if new_best:
            self._save("best")
        self.clock.speed.restart(step)  # evaluation time is not training throughput

    def _decide(self, record: dict[str, Any]) -> bool:
        """Selection's decisions on the period's validation record (a plateau's new learning
        rate scale applied to the state); whether the model is the best so far."""
        scale = self.decisions.plateau and self.decisions.plateau.scale
        self.decisions, new_best, self.early = selection.decide(self.config, self.decisions,
                                                                record, self.step)
        if self.decisions.plateau and self.decisions.plateau.scale != scale:
            self.state = self.strategy.place_state(with_plateau_scale(
                self.strategy.gather_state(self.state), self.decisions.plateau.scale))
        return new_best

    def _save(self, which: str = "latest") -> None:
        self._flush()  # never save a state that went non-finite
        meta = checkpoint_lib.meta(experiment.run_identity(self.exp), self.dropout_rng,
                                   self.step, self.d.steps_per_epoch,
                                   {"workers": self.config.data_workers,
                                    "state": self.data_state})
        if self.decisions is not None:
            meta["decisions"] = self.decisions.to_dict()
        gathered = self.strategy.gather_state(self.state)
        (self.ckpt.save_best if which == "best" else self.ckpt.save_latest)(gathered, self.step,
                                                                          meta)

    def close(self) -> None:
        """Stop the clock, the prefetch thread and the workers; wait for the checkpoints in
        flight (then their manifests are written) and close the metric files. (A population
        member fed by another member's pipeline has none.)"""
        self.clock.close()
        if self.batches is not None:
            self.batches.close()
            workers.close(self.data)
        self.bar.close()
        self.ckpt.close()
        self.writer.close()

    def result(self) -> dict[str, Any]:
        """The last record: with "stopped" after a stop signal; with "selected" (and
        selected.json and the plots written) when the run finished."""
        if self.stopped:
            if self.chief:
                print(f"received {self.stopped} at step {self.step}: checkpoint saved to "
                      f"{self.where}; run the same command again to resume from it",
                      file=sys.stderr, flush=True)
            return dict(self.record, stopped=self.stopped, step=self.step)
        if (self.step == self.d.total_steps or self.early) and self.history:
            chosen = selected(self.exp, self.state, self.strategy, self.decisions, self.record,
                              self.confusion, self.where)  # all processes
            if self.chief:
                self._write_selected(chosen)
            return dict(self.record, selected=chosen["summary"])
        return self.record

    def _write_selected(self, chosen: dict[str, Any]) -> None:
        files = {"selected.json": rundir.path(self.workdir, rundir.SELECTED)}
        metrics.write_json(files["selected.json"], chosen["summary"])
        plots = rundir.path(self.workdir, rundir.PLOTS)
        files.update({name: os.path.join(plots, name)
                      for name in ("curves.png", "confusion_matrix.png")})
        metrics.plot_curves(self.history, files["curves.png"])
        metrics.plot_confusion_matrix(chosen["confusion"], self.exp.info.class_names,
                                      files["confusion_matrix.png"])
        self.trackers.finish(self.step, chosen["summary"], files)


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
        json.dump(config_json.config_to_dict(config), f, indent=2, sort_keys=True)
