"""Test accuracy against wall-clock training time for several runs, on one plot.

    python -m experiments.plot_runs --run "main job=runs/fashion_mnist" \
        --run "fashion_mnist_best=runs/fashion_mnist_best" --output plot.png

Each run's curve is its metrics.jsonl records that evaluated the test split (a run with
test_every_period=True has one per period; otherwise only the last); the selected model's
test accuracy (selected.json) is marked with a star at the end of its run. The time is the
run's own clock (`wall_seconds`: training and evaluations since it started).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from resnet_jax.training import metrics
from resnet_jax.training import rundir


def curves(runs: dict[str, str]) -> dict[str, dict]:
    """Per label: (minutes, test accuracy) points and the selected model, from run dirs."""
    out = {}
    for label, workdir in runs.items():
        records = metrics.read_metrics(workdir)
        if not records:
            raise FileNotFoundError(f"{workdir}: no metrics.jsonl records")
        points = [(r["wall_seconds"] / 60, r["test_accuracy"]) for r in records
                  if "test_accuracy" in r and "wall_seconds" in r]
        chosen = rundir.read_selected(workdir)
        end = records[-1].get("wall_seconds", 0.0) / 60
        out[label] = {"points": points, "selected": chosen, "end_minutes": end}
    return out


def plot(data: dict[str, dict], path: str, title: str = "") -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for label, d in data.items():
        if d["points"]:
            line, = ax.plot(*zip(*d["points"]), "o-", markersize=3, label=label)
            color = line.get_color()
        else:
            color = None
        chosen = d["selected"]
        if "test_accuracy" in chosen:
            ax.plot([d["end_minutes"]], [chosen["test_accuracy"]], "*", markersize=14,
                    color=color, label=f"{label}: selected model {chosen['test_accuracy']:.2%}")
    ax.set_xlabel("wall-clock minutes since the start of training (evaluations included)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.85, 0.97)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL=WORKDIR")
    parser.add_argument("--output", required=True)
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    runs = {}
    for item in args.run:
        if "=" not in item:
            print(f"error: --run {item!r}: expected LABEL=WORKDIR", file=sys.stderr)
            return 2
        label, workdir = item.split("=", 1)
        runs[label] = workdir
    try:
        data = curves(runs)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plot(data, args.output, args.title)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
