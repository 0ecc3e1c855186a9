"""Evaluate the best checkpoint of a run and print top-1/top-5 and per-class accuracy as JSON.

    python -m experiments.evaluate --workdir DIR [--split test] [--checkpoint best|latest]
"""

from __future__ import annotations

import argparse
import json
import sys


def evaluate_run(workdir: str, split: str = "test", which: str = "best") -> dict:
    """Metrics of checkpoint `which` (best or latest) of the run in `workdir` on `split`."""
    from resnet_jax import Run

    run = Run.load(workdir, which)
    result = run.evaluate(split)
    return {
        "workdir": workdir, "checkpoint": which, "step": run.step, "split": split,
        "count": result["count"], "top1_accuracy": result["accuracy"],
        "top5_accuracy": result["top5_accuracy"], "loss": result["loss"],
        "per_class_accuracy": dict(zip(run.class_names, result["per_class_accuracy"])),
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
