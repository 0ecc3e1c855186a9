"""Train runs of a sweep as one population (what `experiments.sweep --population N` runs).

    python -m resnet_jax.cli.population --sweep DIR --run NAME [--run NAME ...]

Each run is the sweep's run of that name (DIR/sweep.json): its config is the sweep's base
config with the run's overrides, as its train command would build it, and its directory
DIR/runs/NAME is an ordinary run. Running it again resumes every member. Exit statuses as
the train command's (`training.rundir.EXIT_STATUS`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from resnet_jax.sweeps import plan as plan_lib
from resnet_jax.training import experiment, rundir
from resnet_jax.training.population import train_population


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", required=True, help="the sweep's directory")
    parser.add_argument("--run", action="append", required=True, metavar="NAME",
                        help="a run of the sweep (repeat for each member)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    sys.stdout.reconfigure(line_buffering=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        plan = plan_lib.read_plan(args.sweep)
        by_name = {run.name: run for run in plan.runs}
        missing = [name for name in args.run if name not in by_name]
        if missing:
            raise ValueError(f"run(s) {missing} are not in {args.sweep}'s plan")
        runs = [by_name[name] for name in args.run]
        configs = [plan_lib.run_config(plan, run) for run in runs]
        experiment.apply_process_settings(configs[0])  # before JAX starts
        records = train_population(configs, [plan_lib.run_dir(args.sweep, r) for r in runs])
    except rundir.FAILURES as err:
        print(f"error: {err}", file=sys.stderr)
        return rundir.exit_status(err)
    for run, record in zip(runs, records):
        state = (f"stopped at step {record['step']} ({record['stopped']})"
                 if record.get("stopped") else
                 f"step {record.get('step')} test_accuracy {record.get('test_accuracy', 0):.4f}")
        print(f"{run.name}: {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
