"""Evaluation over a whole split (every example exactly once, on any strategy), of a run's
validation and test splits, and of the model a run hands over."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import jax
import numpy as np

from resnet_jax.data.pipeline import EvalInput, eval_batches
from resnet_jax.data.sources import DatasetInfo
from resnet_jax.training import experiment, optim, selection
from resnet_jax.training.checkpoint import Checkpointer
from resnet_jax.training.metrics import summarize_eval
from resnet_jax.training.parallel import Strategy, fetch

if TYPE_CHECKING:
    from resnet_jax.training.experiment import Experiment


def evaluate(eval_step: Callable, state: Any, source: Any, info: DatasetInfo,
             options: EvalInput, strategy: Strategy | None = None) -> dict[str, Any]:
    """Means of the eval step's sums (loss, accuracy, top5_accuracy, ...), the count and the
    confusion matrix over every example of `source`, read as `options` says (its batches,
    crop, workers; with `skip_corrupt` an unreadable image is masked out and counted in
    "corrupt_images").

    The last batch is padded and masked. With a strategy, each process feeds its part of
    every batch and the mapped step sums over all devices; `eval_step` is then the strategy's.
    """
    put = strategy.put_eval_batch if strategy else (lambda b: b)
    first = strategy.first if strategy else (lambda m: m)
    totals, corrupt = None, 0
    for batch in eval_batches(source, info, options):
        corrupt += int(np.sum(batch.pop("corrupt", 0)))
        sums = jax.tree.map(fetch, first(eval_step(state, put(batch))))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    result = summarize_eval(totals)
    if options.skip_corrupt:
        result["corrupt_images"] = corrupt
    return result


def evaluate_split(exp: "Experiment", state, strategy, prefix: str, ema: bool | None = None
                   ) -> dict[str, Any]:
    """The metrics of the validation ("val") or test ("test") split, keys prefixed; with an
    EMA, those of the averaged weights too (prefix + "_ema_"). `ema` True/False: only those
    of the averaged/trained weights, unprefixed by "_ema"."""
    source = exp.val_source if prefix == "val" else exp.eval_source
    out = {}
    for averaged in ((False, True) if state.ema else (False,)) if ema is None else (ema,):
        result = evaluate(strategy.eval_step, state.averaged() if averaged else state, source,
                          exp.info, experiment.eval_input(
                              exp.config, experiment.eval_batch_size(exp.config)), strategy)
        tag = prefix + ("_ema_" if averaged and ema is None else "_")
        out.update({tag + k: v for k, v in result.items() if k != "per_class_accuracy"})
    return out


def selected(exp: "Experiment", state, strategy, decisions, record: dict[str, Any],
             confusion: dict[str, Any], where: str) -> dict[str, Any]:
    """The model the run hands over and its test metrics, read once ({"summary",
    "confusion"}): the best checkpoint by the validation metric (its EMA weights if that is a
    val_ema_ metric), or the last state when the run has no validation split. `record` and
    `confusion` are the last period's, which evaluated the test split."""
    c = exp.config
    if "test_confusion" in confusion:
        last = {k: v for k, v in record.items() if k.startswith("test_")
                and not k.startswith("test_ema_")}
        last["test_confusion"] = confusion["test_confusion"]
    else:  # a finished run started again: nothing was trained, the last state is read again
        last = evaluate_split(exp, state, strategy, "test", ema=False)
    summary: dict[str, Any] = {"step": record["step"], "weights": "trained", "by": "last step"}
    result = last
    if decisions is not None:
        weights = selection.best_weights(c, decisions)
        ema = weights == "ema"
        by = dict(selection.candidates(c))[weights]
        summary = {"step": decisions.best_step, "weights": weights, "by": by,
                   by: decisions.best}
        if c.selection_weights == "either":
            summary["compared"] = [metric for _, metric in selection.candidates(c)]
        if decisions.best_step != record["step"]:
            ckpt = Checkpointer(where)
            try:
                best = ckpt.restore(strategy.gather_state(state), "best", decisions.best_step)
            finally:
                ckpt.close()
            state = strategy.place_state(best)
        if ema or decisions.best_step != record["step"]:
            result = evaluate_split(exp, state, strategy, "test", ema=ema)
    summary.update({k: v for k, v in result.items() if k != "test_confusion"})
    note = experiment.test_split_note(c)
    if note:
        summary["test_split"] = note
    return {"summary": summary, "confusion": result["test_confusion"]}


def with_plateau_scale(state, scale: float):
    """`state` with its plateau multiplier set to `scale`."""
    return state.replace(opt_state=optim.with_plateau_scale(state.opt_state, scale))
