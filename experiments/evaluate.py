"""Evaluate the best checkpoint of a run and print top-1/top-5 and per-class accuracy as JSON.

    python -m experiments.evaluate --workdir DIR [--split test] [--checkpoint best|latest]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import ml_collections

from resnet_jax.training.checkpoint import Checkpointer
from resnet_jax.training.loop import compiler_options, evaluate, setup
from resnet_jax.training.state import create_train_state
from resnet_jax.training.steps import make_eval_step


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was started with (its config.json)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a training run directory?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def evaluate_run(workdir: str, split: str = "test", which: str = "best") -> dict:
    """Metrics of checkpoint `which` (best or latest) of the run in `workdir` on `split`."""
    config = load_run_config(workdir)
    config.eval_split = split
    config.eval_subset = 0
    exp = setup(config, load_train=False)
    abstract = jax.eval_shape(
        lambda key: create_train_state(exp.model, exp.tx, key, exp.image_shape), jax.random.key(0))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        state = ckpt.restore(abstract, which=which)
        step = (ckpt.best if which == "best" else ckpt.latest).latest_step()
    finally:
        ckpt.close()
    if state is None:
        raise FileNotFoundError(f"no {which} checkpoint under {workdir}/checkpoints")
    result = evaluate(exp, state, jax.jit(make_eval_step(exp.model, exp.num_classes),
                                           compiler_options=compiler_options(config, "eval")))
    names = exp.info.class_names or tuple(str(i) for i in range(exp.num_classes))
    return {
        "workdir": workdir, "checkpoint": which, "step": int(step), "split": split,
        "count": result["count"], "top1_accuracy": result["top1"],
        "top5_accuracy": result["top5"], "loss": result["loss"],
        "per_class_accuracy": dict(zip(names, result["per_class_accuracy"])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best")
    args = parser.parse_args(argv)
    try:
        out = evaluate_run(args.workdir, args.split, args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
