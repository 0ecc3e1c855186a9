"""Train a model from a config file.

    python -m experiments.train --config experiments/configs/fashion_mnist.py --workdir DIR \
        [--config.field=value ...]

Running again with the same DIR resumes from its latest intact checkpoint. SIGTERM or
Ctrl-C saves a checkpoint at the current step and exits with status 0. Exit status 2: bad
input (config, data, a checkpoint of another run); 3: the workdir is in use by another run;
4: the loss or a gradient went non-finite; 5: no intact checkpoint left.
`python -m experiments.train --describe` lists every config field.
"""

from __future__ import annotations

import logging
import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from resnet_jax.training import config as config_lib
from resnet_jax.training import experiment
from resnet_jax.training.config_files import config_names
from resnet_jax.training.overrides import apply_overrides
from resnet_jax.training.loop import train_and_evaluate
from resnet_jax.training.checkpoint import CheckpointError
from resnet_jax.training.guard import WorkdirBusyError

# bad input (config, data, a checkpoint of another run), busy workdir, divergence, no intact
# checkpoint left
EXIT_STATUS = {ValueError: 2, FileNotFoundError: 2, WorkdirBusyError: 3, FloatingPointError: 4,
               CheckpointError: 5}

config_flags.DEFINE_config_file("config", None, "experiment config file (.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: config, metrics, checkpoints, plots")
flags.mark_flags_as_required(["config", "workdir"])


def given_fields(argv: list[str]) -> list[str]:
    """The NAMEs of the `--config.NAME=...` arguments, in order."""
    return [m[1] for m in (re.match(r"--config\.([A-Za-z_][A-Za-z0-9_]*)", a) for a in argv)
            if m]


def unknown_overrides(argv: list[str]) -> list[str]:
    """Errors for `--config.NAME=...` arguments whose NAME the config schema lacks."""
    return [str(config_lib.unknown_field_error(name)) for name in given_fields(argv)
            if name not in config_lib.FIELDS]


def config_file_errors(argv: list[str]) -> list[str]:
    """Errors for a `--config FILE` (or `--config=FILE`) that names no file."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        path = path.split(":", 1)[0]  # FILE:ARGS passes ARGS to the config's get_config
        if not os.path.isfile(path):
            return [f"--config {path}: no such file; expected an experiment config file "
                    f"(.py), one of experiments/configs/: {', '.join(config_names())}"]
    return []


def main(argv):
    del argv
    sys.stdout.reconfigure(line_buffering=True)  # epoch lines reach logs as they happen
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        config, lines = apply_overrides(flags.FLAGS.config, given_fields(sys.argv[1:]))
        for line in lines:
            logging.info("%s", line)
        experiment.apply_process_settings(config)  # before JAX starts
        record = train_and_evaluate(config, flags.FLAGS.workdir)
    except tuple(EXIT_STATUS) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(next(code for kind, code in EXIT_STATUS.items() if isinstance(err, kind)))
    if record.get("stopped"):
        print(f"stopped at step {record['step']} ({record['stopped']}); checkpoint saved")
    elif record:
        print(f"final: step {record['step']} test_accuracy {record['test_accuracy']:.4f}")
        chosen = record.get("selected", {})
        if chosen.get("by", "last step") != "last step":
            print(f"selected by {chosen['by']}: step {chosen['step']} ({chosen['weights']} "
                  f"weights) test_accuracy {chosen['test_accuracy']:.4f}")


def run() -> None:
    if "--describe" in sys.argv[1:]:
        print(config_lib.describe())
        return
    errors = config_file_errors(sys.argv[1:]) + unknown_overrides(sys.argv[1:])
    if errors:
        print("error: " + "\nerror: ".join(errors), file=sys.stderr)
        sys.exit(2)
    app.run(main)


if __name__ == "__main__":
    run()
