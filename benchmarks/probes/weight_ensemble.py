"""Whether averaging a run's trained and EMA weights' predictions beats either alone: the
probabilities of both (each over the run's own test-time views) mixed at several weights, on
one split, from the same checkpoint.

    python -m benchmarks.probes.weight_ensemble --workdir runs/fashion_mnist_best [--split validation]

Prints one JSON line: the accuracy of the trained weights, of the EMA weights, and of the
mixtures (w the EMA's share of the averaged probabilities; `geometric`: the summed log
probabilities), with the number of images.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from resnet_jax.training import experiment
from resnet_jax.training.run import Run

SHARES = (0.25, 0.5, 0.75)


def accuracies(trained: np.ndarray, ema: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy of each probability array (N, classes) alone and of their mixtures."""
    def accuracy(p):
        return float(np.mean(p.argmax(1) == labels))
    out = {"trained": accuracy(trained), "ema": accuracy(ema)}
    out.update({f"mix_w{w}": accuracy((1 - w) * trained + w * ema) for w in SHARES})
    out["geometric"] = accuracy(np.log(trained + 1e-12) + np.log(ema + 1e-12))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--checkpoint", default="latest", choices=("latest", "best"))
    args = parser.parse_args(argv)
    trained = Run.load(args.workdir, args.checkpoint, ema=False)
    ema = Run.load(args.workdir, args.checkpoint, ema=True)
    source = experiment.load_split(trained.config, args.split, 0)
    images, labels = np.asarray(source.images), np.asarray(source.labels)
    result = accuracies(trained.predict(images), ema.predict(images), labels)
    print(json.dumps({"split": args.split, "step": trained.step, "n": len(labels), **result}))


if __name__ == "__main__":
    main()
