"""Train a model from a config file.

    python -m experiments.train --config experiments/configs/fashion_mnist.py --workdir DIR \
        [--config.field=value ...]

Running again with the same DIR resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from resnet_jax.training.loop import train_and_evaluate

config_flags.DEFINE_config_file("config", None, "experiment config file (.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: config, metrics, checkpoints, plots")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    sys.stdout.reconfigure(line_buffering=True)  # epoch lines reach logs as they happen
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        record = train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if record:
        print(f"final: step {record['step']} test_accuracy {record['test_accuracy']:.4f}")


if __name__ == "__main__":
    app.run(main)
