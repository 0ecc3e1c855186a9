"""Train a model from an experiment config.

    resnet-jax-train --config fashion_mnist --workdir DIR [--config.field=value ...]
    python -m experiments.train --config experiments/configs/fashion_mnist.py --workdir DIR

`--config` takes an experiment's name (`resnet_jax.configs`), a .py config file or a run's
config.json (that run's config again). Running again with the same DIR resumes from its
latest intact checkpoint. SIGTERM or Ctrl-C saves a checkpoint at the current step and exits
with status 0. Exit status 2: bad input (config, data, a checkpoint of another run); 3: the
workdir is in use by another run; 4: the loss or a gradient went non-finite; 5: no intact
checkpoint left (`training.rundir.EXIT_STATUS`). `--describe` lists every config field.
"""

from __future__ import annotations

import logging
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from resnet_jax import configs
from resnet_jax.training import config as config_lib
from resnet_jax.training import experiment, rundir
from resnet_jax.training.loop import train_and_evaluate
from resnet_jax.training.population import train_population_config
from resnet_jax.training.overrides import apply_overrides

flags.DEFINE_string("workdir", None, "run directory: config, metrics, checkpoints, plots")


def given_fields(argv: list[str]) -> list[str]:
    """The NAMEs of the `--config.NAME=...` arguments, in order."""
    return [m[1] for m in (re.match(r"--config\.([A-Za-z_][A-Za-z0-9_]*)", a) for a in argv)
            if m]


def unknown_overrides(argv: list[str]) -> list[str]:
    """Errors for `--config.NAME=...` arguments whose NAME the config schema lacks."""
    return [str(config_lib.unknown_field_error(name)) for name in given_fields(argv)
            if name not in config_lib.FIELDS]


def split_config_argument(argv: list[str]) -> tuple[str | None, list[str]]:
    """The value of `--config X` / `--config=X` and the other arguments."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def _train(given: list[str]) -> None:
    sys.stdout.reconfigure(line_buffering=True)  # epoch lines reach logs as they happen
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if not flags.FLAGS.workdir:
        _fail(["--workdir is required: the run's directory (config, metrics, checkpoints)"])
    try:
        config, lines = apply_overrides(flags.FLAGS.config, given)
        for line in lines:
            logging.info("%s", line)
        experiment.apply_process_settings(config)  # before JAX starts
        if config.population_size:
            records = train_population_config(config, flags.FLAGS.workdir)
        else:
            records = [train_and_evaluate(config, flags.FLAGS.workdir)]
    except rundir.FAILURES as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(rundir.exit_status(err))
    for k, record in enumerate(records):
        if config.population_size:
            print(f"seed={config.seed + k}:", end=" ")
        _report(record)


def _report(record: dict) -> None:
    if record.get("stopped"):
        print(f"stopped at step {record['step']} ({record['stopped']}); checkpoint saved")
    elif record:
        print(f"final: step {record['step']} test_accuracy {record['test_accuracy']:.4f}")
        chosen = record.get("selected", {})
        if chosen.get("by", "last step") != "last step":
            print(f"selected by {chosen['by']}: step {chosen['step']} ({chosen['weights']} "
                  f"weights) test_accuracy {chosen['test_accuracy']:.4f}")


def _fail(errors: list[str]) -> None:
    print("error: " + "\nerror: ".join(errors), file=sys.stderr)
    sys.exit(rundir.EXIT_BAD_INPUT)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else [sys.argv[0], *argv]
    if "--describe" in argv[1:]:
        print(config_lib.describe())
        return
    source, rest = split_config_argument(argv[1:])
    errors = unknown_overrides(rest)
    if source is None:
        errors.insert(0, "--config is required: an experiment's name "
                      f"({', '.join(configs.config_names())}), a .py config file or a run's "
                      "config.json")
    if errors:
        _fail(errors)
    try:
        config = configs.read_config(source)
    except (ValueError, FileNotFoundError) as err:
        _fail([f"--config: {err}"])
    config_flags.DEFINE_config_dict("config", config, "the experiment's config",
                                    lock_config=True, sys_argv=[argv[0], *rest])
    app.run(lambda _: _train(given_fields(rest)), argv=[argv[0], *rest])


if __name__ == "__main__":
    main()
