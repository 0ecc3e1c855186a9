"""Running a sweep's runs on this host, J at a time, each a process of its own on its own
share of the devices (GPUs split between the jobs; on a CPU, the cores), and the SLURM
job-array script that spreads them over a cluster instead."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from resnet_jax.sweeps import pinned, plan as plan_lib
from resnet_jax.sweeps.plan import Plan, PlannedRun
from resnet_jax.training import rundir

LOG_FILE = "sweep_log.jsonl"  # one line per start of a run: when, how long, exit status
SLURM_FILE = "sweep.sbatch"


@dataclasses.dataclass(frozen=True)
class Share:
    """What one job may use: environment settings and, on a CPU, the cores it is pinned to."""

    env: dict[str, str]
    cores: tuple[int, ...] | None = None


def visible_gpus() -> list[str]:
    """The GPUs of this host a process could use: CUDA_VISIBLE_DEVICES when set, else those
    nvidia-smi lists; [] without either (a CPU host)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g for g in given.split(",") if g.strip() and g.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def shares(jobs: int, gpus: list[str] | None = None, cores: list[int] | None = None
           ) -> list[Share]:
    """`jobs` equal shares of the host: each job a contiguous group of the GPUs, or on a
    host without GPUs a contiguous group of the cores (its OpenMP threads as many). One job
    gets the whole host, unchanged."""
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs={jobs!r}: expected a number of runs at a time >= 1")
    if jobs == 1:
        return [Share({})]
    gpus = visible_gpus() if gpus is None else gpus
    if gpus:
        if jobs > len(gpus):
            raise ValueError(f"jobs={jobs} but this host has {len(gpus)} GPU(s): expected "
                             f"at most {len(gpus)}, one GPU or more a job")
        each = len(gpus) // jobs
        return [Share({"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * each:(i + 1) * each])})
                for i in range(jobs)]
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    if jobs > len(cores):
        raise ValueError(f"jobs={jobs} but this process may use {len(cores)} CPU core(s): "
                         f"expected at most {len(cores)}, one core or more a job")
    bounds = [round(i * len(cores) / jobs) for i in range(jobs + 1)]
    groups = [tuple(cores[bounds[i]:bounds[i + 1]]) for i in range(jobs)]
    return [Share({"OMP_NUM_THREADS": str(len(g))}, g) for g in groups]


def _pinned(command: list[str], cores: tuple[int, ...] | None) -> list[str]:
    """`command` started pinned to `cores` (where the OS lets a process choose its cores)."""
    if cores is None or not hasattr(os, "sched_setaffinity"):
        return command
    return pinned.command(cores, command)


def append_log(workdir: str, entry: dict) -> None:
    with open(os.path.join(workdir, LOG_FILE), "a") as f:
        f.write(json.dumps(entry) + "\n")


def read_log(workdir: str) -> list[dict]:
    """Every start of a run the sweep made (sweep_log.jsonl), oldest first."""
    path = os.path.join(workdir, LOG_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclasses.dataclass
class Outcome:
    """What a call of `run_all` did: runs trained (to the end), failed, or left for later."""

    skipped: list[str] = dataclasses.field(default_factory=list)  # finished before
    trained: list[str] = dataclasses.field(default_factory=list)
    failed: dict[str, int] = dataclasses.field(default_factory=dict)  # name -> exit status
    busy: list[str] = dataclasses.field(default_factory=list)  # another process holds them
    stopped: str = ""  # the signal that stopped the sweep, if one did


@dataclasses.dataclass
class _Unit:
    """What one process trains: a run, or a population of runs (`population`)."""

    name: str  # its log's name
    runs: list[PlannedRun]
    command: list[str]


def _units(workdir: str, plan: Plan, todo: list[PlannedRun], population: int, processes: int,
           devices_per_process: int) -> list[_Unit]:
    if population < 1:
        return [_Unit(run.name, [run], plan_lib.run_command(workdir, run, processes,
                                                            devices_per_process))
                for run in todo]
    return [_Unit(f"population,{pack[0].name}", pack,
                  plan_lib.population_command(workdir, pack))
            for pack in plan_lib.populations(plan, todo, population)]


def run_all(workdir: str, plan: Plan, jobs: int = 1, processes: int = 1,
            devices_per_process: int = 1, echo: Callable[[str], None] = print,
            progress: bool = True, population: int = 0) -> Outcome:
    """Train every run of `plan` that has not finished, `jobs` at a time. A run's output goes
    to logs/NAME.log. SIGTERM or Ctrl-C passes SIGTERM on to the runs (each saves a
    checkpoint) and starts no more: the same call later resumes them. With `population` N,
    the runs that may train together are packed into populations of at most N members, one
    process each (`plan.populations`; output in logs/population,FIRST_RUN.log)."""
    from tqdm import tqdm

    workdir = os.path.abspath(workdir)
    outcome = Outcome()
    todo: list[PlannedRun] = []
    for run in plan.runs:
        if plan_lib.is_finished(plan_lib.run_dir(workdir, run)):
            outcome.skipped.append(run.name)
        else:
            todo.append(run)
    if not todo:
        return outcome
    units = _units(workdir, plan, todo, population, processes, devices_per_process)
    free = shares(min(jobs, len(units)))
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    env = plan_lib.run_environment()
    running: dict[subprocess.Popen, tuple[_Unit, Share, float, object]] = {}
    stop = {"signal": 0}

    def on_signal(signum, frame):
        stop["signal"] = signum
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    bar = tqdm(total=len(plan.runs), initial=len(outcome.skipped), unit="run",
               disable=not progress, desc="sweep")
    packed = f" in {len(units)} population(s)" if population >= 1 else ""
    echo(f"{len(todo)} of {len(plan.runs)} runs to train{packed}, "
         f"{min(jobs, len(units))} at a time"
         + (f" ({len(outcome.skipped)} finished before)" if outcome.skipped else ""))
    try:
        while (units and not stop["signal"]) or running:
            while units and free and not stop["signal"]:
                unit, share = units.pop(0), free.pop(0)
                log = open(os.path.join(workdir, "logs", f"{unit.name}.log"), "a")
                command = _pinned(unit.command, share.cores)
                log.write(f"$ {shlex.join(command)}\n")
                log.flush()
                proc = subprocess.Popen(command, env={**env, **share.env}, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                running[proc] = (unit, share, time.time(), log)
            done = [p for p in running if p.poll() is not None]
            if not done:
                time.sleep(0.2)
                continue
            for proc in done:
                unit, share, started, log = running.pop(proc)
                log.close()
                free.append(share)
                for run in unit.runs:
                    _account(workdir, outcome, unit, run, proc.returncode, started,
                             bool(stop["signal"]), bar, echo)
    finally:
        for proc in running:  # only after an exception: hand the runs the stop as well
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        bar.close()
    if stop["signal"]:
        outcome.stopped = signal.Signals(stop["signal"]).name
    return outcome


def _account(workdir: str, outcome: Outcome, unit: _Unit, run: PlannedRun, code: int,
             started: float, stopping: bool, bar, echo: Callable[[str], None]) -> None:
    """Log and count how a run of a finished process ended."""
    finished = plan_lib.is_finished(plan_lib.run_dir(workdir, run))
    append_log(workdir, {"run": run.name, "started": round(started, 2),
                         "seconds": round(time.time() - started, 2), "exit": code,
                         "finished": finished,
                         **({"population": unit.name} if len(unit.runs) > 1 else {})})
    if finished:
        outcome.trained.append(run.name)
        bar.update(1)
    elif code == rundir.EXIT_BUSY:
        outcome.busy.append(run.name)
        echo(f"run {run.name} is in use by another process (a SLURM task, another "
             "sweep): left to it")
    elif code != 0 and not stopping:  # not one the stop ended
        outcome.failed[run.name] = code
        bar.update(1)
        echo(f"run {run.name} failed (exit status {code}); its output: "
             f"{os.path.join(workdir, 'logs', unit.name + '.log')}")


def slurm_script(workdir: str, plan: Plan, options: list[str] = (), processes: int = 1,
                 devices_per_process: int = 1, python: str = sys.executable) -> str:
    """An sbatch job-array script with one task per run of `plan`: $SLURM_ARRAY_TASK_ID
    picks the run, whose command is the one `run_all` would start (a finished run is left
    alone)."""
    workdir = os.path.abspath(workdir)
    n = len(plan.runs)
    lines = ["#!/bin/bash",
             f"# The {n} runs of the sweep in {workdir}, one task of a SLURM job array each.",
             f"# Submit: sbatch {shlex.quote(os.path.join(workdir, SLURM_FILE))}",
             f"# One run by hand: SLURM_ARRAY_TASK_ID=K bash {shlex.quote(os.path.join(workdir, SLURM_FILE))}",
             f"#SBATCH --job-name={shlex.quote('sweep-' + os.path.basename(workdir))}",
             f"#SBATCH --array=0-{n - 1}",
             f"#SBATCH --output={os.path.join(workdir, 'logs', 'slurm-%A_%a.log')}",
             *[f"#SBATCH {option}" for option in options],
             "set -euo pipefail",
             f"cd {shlex.quote(os.getcwd())}",
             f"export PYTHONPATH={shlex.quote(str(plan_lib.PACKAGE_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
             'case "${SLURM_ARRAY_TASK_ID:?set by sbatch; to run one task by hand, set it}" in']
    for i, run in enumerate(plan.runs):
        command = plan_lib.run_command(workdir, run, processes, devices_per_process, python)
        lines.append(f"  {i}) RUN={shlex.quote(run.name)}; COMMAND=({shlex.join(command)}) ;;")
    lines += [f'  *) echo "no task $SLURM_ARRAY_TASK_ID in this sweep: 0-{n - 1}" >&2; exit 2 ;;',
              "esac",
              f'if [ -f {shlex.quote(os.path.join(workdir, plan_lib.RUNS_DIR))}/"$RUN"/{rundir.SELECTED} ]; then',
              '  echo "run $RUN finished before"; exit 0',
              "fi",
              f'mkdir -p {shlex.quote(os.path.join(workdir, "logs"))}',
              'exec "${COMMAND[@]}"', ""]
    return "\n".join(lines)
