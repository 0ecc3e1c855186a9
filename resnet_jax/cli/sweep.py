"""Train a grid of config values times seeds, one ordinary run each, and summarise them.

    python -m experiments.sweep --config experiments/configs/fashion_mnist.py --workdir DIR \
        --grid learning_rate=0.1,0.2 --grid label_smoothing=0,0.1 --seeds 3 [--jobs J] \
        [--population N] [--slurm [--slurm-option=--gres=gpu:1 ...]] [--config.FIELD=VALUE ...]

Runs go to DIR/runs/FIELD=VALUE,...,seed=S (each an ordinary train command run; `Run.load`
reads it), their output to DIR/logs/, the summary to DIR/summary.json, DIR/summary.md and
DIR/plots/. Running the same command again skips the finished runs and resumes the others
(nothing left: it only rewrites the summary). --jobs J runs J at a time, each on 1/J of the
GPUs, or of the CPU cores. --population N packs the runs that may train together into
populations of at most N members, each trained in one step (`training.population`), each
run still an ordinary run. --slurm writes DIR/sweep.sbatch, a job array of one task per run,
and prints the command that submits it; --summarize trains nothing and writes the summary
of the runs as they stand. Exit status 0: every run finished (or was stopped
by SIGTERM/Ctrl-C and will resume); 1: a run failed (the others went on); 2: bad input,
found before any run started.
"""

from __future__ import annotations

import argparse
import re
import sys

from resnet_jax.sweeps import plan as plan_lib
from resnet_jax.sweeps import run_sweep
from resnet_jax.configs import load_config

OVERRIDE = re.compile(r"--config\.([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.S)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    """The options, and the fixed `--config.FIELD=VALUE` overrides read as their types."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Fixed overrides: --config.FIELD=VALUE, as for the train command.")
    parser.add_argument("--config", required=True,
                        help="experiment config file (.py) or the name of one in "
                             "experiments/configs")
    parser.add_argument("--workdir", required=True, help="the sweep's directory")
    parser.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                        help="a config field and its values (repeat for a grid)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs per grid point, seeds config.seed, config.seed + 1, ...")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time on this host")
    parser.add_argument("--slurm", action="store_true",
                        help="write an sbatch job-array script instead of running")
    parser.add_argument("--slurm-option", action="append", default=[], metavar="OPTION",
                        help="an #SBATCH line's option, e.g. --slurm-option=--gres=gpu:1")
    parser.add_argument("--processes-per-run", type=int, default=1,
                        help=">1: each run as a launch (resnet-jax-launch) of this many processes")
    parser.add_argument("--devices-per-process", type=int, default=1,
                        help="with --processes-per-run: CPU devices each process forces")
    parser.add_argument("--population", type=int, default=0, metavar="N",
                        help="train the runs that may train together (grid points of "
                             "per-member fields x seeds) as populations of at most N members, "
                             "each in one step in one process")
    parser.add_argument("--summarize", action="store_true",
                        help="train nothing: write the summary of the runs as they stand "
                             "(e.g. while a SLURM array runs them)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for arg in rest:
        match = OVERRIDE.fullmatch(arg)
        if not match:
            parser.error(f"unrecognised argument {arg!r}; fixed overrides are "
                         "--config.FIELD=VALUE")
        overrides[match[1]] = plan_lib.parse_value(match[1], match[2])
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_args(argv)
        config = load_config(args.config, **overrides)
        grid = plan_lib.parse_grid(args.grid)
        done = run_sweep(config, args.workdir, grid, args.seeds, args.jobs, args.slurm,
                         args.slurm_option, args.processes_per_run, args.devices_per_process,
                         progress=not args.no_progress and sys.stderr.isatty(),
                         train=not args.summarize, population=args.population)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if done.outcome.failed:
        print(f"{len(done.outcome.failed)} run(s) failed: "
              + ", ".join(f"{n} (exit status {c})" for n, c in done.outcome.failed.items()),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
