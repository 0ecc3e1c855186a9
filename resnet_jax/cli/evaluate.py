"""Evaluate a run's selected checkpoint on one of its splits; print top-1/top-5 and
per-class accuracy as JSON.

    python -m experiments.evaluate --workdir DIR [--split test|validation|train|NAME]
        [--checkpoint selected|best|latest] [--ema | --no-ema] [--flip | --no-flip]
        [--shift PIXELS]

The splits are the run's: "train" (less any held-out validation examples), "validation"
(held out of train by the run's seed, or the dataset's validation split) and "test" (the
run's eval_split); any other NAME is that split of the dataset. "selected" is the model the
run handed over (chosen on validation; the last step without one). `--flip` averages each
image's and its mirror image's class probabilities (`--no-flip`: one view), whatever the run's
`eval_flip`: what flip-averaging adds to a trained model, on the same weights. `--shift N`
also averages the views moved N pixels up, down, left and right (`--shift 0`: none), whatever
the run's `eval_shift`.
"""

from __future__ import annotations

import argparse
import json
import sys


def evaluate_run(workdir: str, split: str = "test", which: str = "selected",
                 ema: bool | None = None, subset: int = 0, flip: bool | None = None,
                 shift: int | None = None) -> dict:
    """Metrics of checkpoint `which` (selected, best or latest) of the run in `workdir` on
    `split` (`subset` of its examples when > 0, sampled across the classes by the seed);
    `flip` True/False and `shift` (pixels) override the run's eval_flip and eval_shift (None:
    as the run evaluated)."""
    from resnet_jax import Run

    if shift is not None and shift < 0:
        raise ValueError(f"shift must be 0 (no shifted views) or a positive number of pixels, "
                         f"got {shift}")
    run = Run.load(workdir, which, ema)
    if flip is not None:
        run.config.eval_flip = bool(flip)
    if shift is not None:
        with run.config.unlocked():
            run.config.eval_shift = int(shift)
    result = run.evaluate(split, subset)
    return {
        "workdir": workdir, "checkpoint": run.which, "step": run.step,
        "weights": "ema" if run.ema else "trained", "split": split,
        "flip": bool(run.config.get("eval_flip", False)),
        "shift": int(run.config.get("eval_shift", 0)),
        "split_is": run.splits.get(split, f"the dataset's split {split!r}"),
        "count": result["count"], "top1_accuracy": result["accuracy"],
        "top5_accuracy": result["top5_accuracy"], "loss": result["loss"],
        "per_class_accuracy": dict(zip(run.class_names, result["per_class_accuracy"])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--checkpoint", choices=("selected", "best", "latest"),
                        default="selected")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="the EMA weights (default: as the run selected)")
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                        help="average each image's and its mirror's probabilities (default: "
                             "as the run's eval_flip)")
    parser.add_argument("--shift", type=int, default=None, metavar="PIXELS",
                        help="also average the views moved this many pixels up, down, left "
                             "and right (0: none; default: as the run's eval_shift)")
    parser.add_argument("--subset", type=int, default=0,
                        help="only N examples of the split, sampled across the classes by the run's seed (0: all)")
    args = parser.parse_args(argv)
    try:
        out = evaluate_run(args.workdir, args.split, args.checkpoint, args.ema, args.subset,
                           args.flip, args.shift)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
