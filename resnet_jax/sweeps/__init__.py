"""Sweeps: many ordinary runs from one call (a grid of config values times seeds), run J at a
time on this host or as a SLURM job array, and read back as means and spreads.

    results = resnet_jax.sweep("fashion_mnist", "runs/lr", grid={"learning_rate": [0.1, 0.2]},
                               seeds=3)
    results.table                           # one row per grid point: mean/std/min/max
    resnet_jax.compare(results.select(learning_rate=0.1), results.select(learning_rate=0.2))
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import ml_collections

from resnet_jax.sweeps import local, plan as plan_lib, report, stats
from resnet_jax.sweeps.report import SweepResults, SweepRun, load_runs
from resnet_jax.configs import load_config
from resnet_jax.training import trackers
from resnet_jax.training.config import with_overrides


@dataclasses.dataclass
class SweepOutcome:
    """What one call did (`local.Outcome`), the summary's rows and, for SLURM, the script."""

    results: SweepResults
    outcome: local.Outcome
    script: str = ""


def _grouped(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """The config with the sweep's name as `tracker_group` where it reports to W&B or MLflow
    and names no group: the runs of one sweep side by side in the tracker's UI."""
    if config.tracker_group or not {"wandb", "mlflow"} & set(config.trackers):
        return config
    name = os.path.basename(os.path.abspath(workdir).rstrip(os.sep))
    return with_overrides(config, tracker_group=name)


def run_sweep(config: ml_collections.ConfigDict | str, workdir: str,
              grid: dict[str, Sequence[Any]] | None = None, seeds: int = 1, jobs: int = 1,
              slurm: bool = False, slurm_options: Sequence[str] = (), processes_per_run: int = 1,
              devices_per_process: int = 1, progress: bool = True, train: bool = True,
              echo: Callable[[str], None] = print, population: int = 0) -> SweepOutcome:
    """`sweep`, returning what the call did as well (for the command line)."""
    if isinstance(config, str):
        config = load_config(config)
    for name, value in (("processes_per_run", processes_per_run),
                        ("devices_per_process", devices_per_process)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: expected an integer >= 1")
    _check_population(population, slurm, processes_per_run)
    config = _grouped(config, workdir)
    plan = plan_lib.make_plan(config, grid, seeds)  # every value checked before any run
    trackers.check(config)  # installed and reachable, before the first run starts
    if not slurm:
        local.shares(jobs)
    plan_lib.write_plan(workdir, plan)
    if slurm:
        script = local.slurm_script(workdir, plan, list(slurm_options), processes_per_run,
                                    devices_per_process)
        path = os.path.join(workdir, local.SLURM_FILE)
        with open(path, "w") as f:
            f.write(script)
        os.chmod(path, 0o755)
        echo(f"wrote {path} ({len(plan.runs)} tasks); submit it with:\n  sbatch {path}\n"
             "then write the summary with the same command, --summarize instead of --slurm")
        return SweepOutcome(load_runs(workdir), local.Outcome(), path)
    outcome = (local.run_all(workdir, plan, jobs, processes_per_run, devices_per_process,
                             echo=echo, progress=progress, population=population)
               if train else local.Outcome())
    results = load_runs(workdir)
    report.write_summary(results)
    done = sum(r.finished for r in results.runs)
    echo(f"{done} of {len(plan.runs)} runs finished; summary: "
         f"{os.path.join(workdir, report.SUMMARY_MD)}")
    if outcome.stopped:
        echo(f"stopped by {outcome.stopped}: the runs in flight saved a checkpoint; run the same "
             "command again to resume")
    return SweepOutcome(results, outcome)


def _check_population(population: int, slurm: bool, processes_per_run: int) -> None:
    if not isinstance(population, int) or isinstance(population, bool) or population < 0:
        raise ValueError(f"population={population!r}: expected a number of members >= 1 "
                         "(0: one run per process)")
    if population and slurm:
        raise ValueError(f"population={population} trains members together in this host's "
                         "processes; a SLURM array runs one run per task (leave one out)")
    if population and processes_per_run > 1:
        raise ValueError(f"population={population} trains in one process; "
                         f"processes_per_run={processes_per_run} launches several per run "
                         "(leave one out)")


def sweep(config: ml_collections.ConfigDict | str, workdir: str,
          grid: dict[str, Sequence[Any]] | None = None, seeds: int = 1, jobs: int = 1,
          slurm: bool = False, slurm_options: Sequence[str] = (), processes_per_run: int = 1,
          devices_per_process: int = 1, progress: bool = True, population: int = 0
          ) -> SweepResults:
    """Train `config` (a config, or a name/path for `load_config`) at every point of `grid`
    ({field: values}) with `seeds` seeds each, into workdir/runs/NAME, `jobs` at a time, and
    write the summary; finished runs are skipped and interrupted ones resumed. With `slurm`,
    write an sbatch job-array script instead. With `population` N, the runs that may train
    together (differing only in seeds and per-member fields, `population.MEMBER_FIELDS`)
    are packed into populations of at most N members, each trained in one step in one
    process (`train_population`); every run is still an ordinary run. Returns the sweep
    read back (`load_runs`)."""
    return run_sweep(config, workdir, grid, seeds, jobs, slurm, slurm_options,
                     processes_per_run, devices_per_process, progress,
                     population=population).results


def values_of(runs: Sequence[SweepRun]) -> dict[str, list[float]]:
    """metric -> its value in each finished run of `runs`."""
    out: dict[str, list[float]] = {}
    for run in runs:
        for name, value in run.metrics.items():
            out.setdefault(name, []).append(value)
    return out


def compare(a: Sequence[SweepRun], b: Sequence[SweepRun], confidence: float = 0.95
            ) -> dict[str, dict[str, Any]]:
    """For each metric of two sets of runs (e.g. two grid points, `SweepResults.select`):
    mean(a) - mean(b) with its confidence interval by Welch's t."""
    a, b = [r for r in a if r.finished], [r for r in b if r.finished]
    if not a or not b:
        raise ValueError(f"compare needs finished runs on both sides, got {len(a)} and {len(b)}")
    return stats.compare_runs(values_of(a), values_of(b), confidence)


__all__ = ["SweepResults", "SweepRun", "compare", "load_runs", "run_sweep", "sweep"]
