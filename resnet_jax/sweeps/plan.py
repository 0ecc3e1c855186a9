"""A sweep's plan: a grid of config values times seeds, expanded into named runs, every
value checked against the config schema before anything runs, and each run's command
(an ordinary train command line: `python -m resnet_jax.cli.train`, the installed package's
`resnet-jax-train`)."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import ml_collections

from resnet_jax.training import config as config_lib
from resnet_jax.training import config_json
from resnet_jax.training import rundir
from resnet_jax.training.overrides import apply_overrides

PLAN_FILE = "sweep.json"
CONFIG_FILE = "config.json"  # the sweep's base config, as a run's config.json holds one
RUNS_DIR = "runs"
# what a run's directory name may hold; anything else in a value becomes "_"
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._+=-]+")
_MAX_NAME = 200

# the directory that holds this resnet_jax (site-packages, or a checkout used in place): the
# runs' processes import the same package
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
# the train command, run from the package (no checkout needed)
TRAIN_MODULE = "resnet_jax.cli.train"
LAUNCH_MODULE = "resnet_jax.cli.launch"
POPULATION_MODULE = "resnet_jax.cli.population"


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its grid point, its seed and its directory's name."""

    name: str
    point: dict[str, Any]
    seed: int

    @property
    def overrides(self) -> dict[str, Any]:
        """Every field this run sets over the sweep's base config."""
        return {**self.point, "seed": self.seed}


@dataclasses.dataclass(frozen=True)
class Plan:
    """A sweep: the base config (fixed overrides applied), the grid, the seeds, the runs in
    order (grid points in the order given, the seeds of each point together)."""

    config: dict[str, Any]
    grid: dict[str, tuple]
    seeds: tuple[int, ...]
    runs: tuple[PlannedRun, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "grid": {k: list(v) for k, v in self.grid.items()},
                "seeds": list(self.seeds),
                "runs": [{"name": r.name, "point": r.point, "seed": r.seed} for r in self.runs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        runs = tuple(PlannedRun(r["name"], r["point"], int(r["seed"])) for r in d["runs"])
        return cls(d["config"], {k: tuple(v) for k, v in d["grid"].items()},
                   tuple(d["seeds"]), runs)


def split_values(text: str) -> list[str]:
    """'0.1,0.2' -> ['0.1', '0.2']: commas inside brackets, braces or quotes do not split."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def parse_value(field: str, text: str) -> Any:
    """A command-line value as the field's type reads it (as `--config.FIELD=TEXT` would)."""
    if field not in config_lib.FIELDS:
        raise config_lib.unknown_field_error(field)
    default = config_lib.FIELDS[field].default
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise ValueError(f"{field}={text!r}: expected True or False")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if default and isinstance(default, tuple) and all(isinstance(d, str) for d in default):
            return tuple(name for name in split_values(text) if name)  # trackers=a,b
        raise ValueError(f"{field}={text!r} is not a value of type {type(default).__name__} "
                         f"like the default {default!r}") from None
    return ml_collections.ConfigDict(value) if isinstance(value, dict) else value


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """['FIELD=V1,V2', ...] -> {FIELD: [V1, V2]}, each value read as its field's type."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        field, sep, values = spec.partition("=")
        field = field.strip()
        if not sep or not field or not values.strip():
            raise ValueError(f"--grid {spec!r}: expected FIELD=VALUE1,VALUE2,...")
        if field in grid:
            raise ValueError(f"--grid {field} is given twice; give all its values in one")
        grid[field] = [parse_value(field, v) for v in split_values(values)]
    return grid


def format_value(value: Any) -> str:
    """A value as `--config.FIELD=...` takes it (strings raw, the rest as Python literals)."""
    if isinstance(value, str):
        return value
    return repr(config_json.tuples_from_json(json_value(value)))


def coerce(field: str, value: Any) -> Any:
    """A number as its field's type (0 for a float field is 0.0, 2.0 for an integer one 2),
    so that one value has one spelling in run names whichever way it was written."""
    default = config_lib.FIELDS[field].default
    if isinstance(value, bool) or isinstance(default, bool):
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def json_value(value: Any) -> Any:
    """A value in its JSON form (ConfigDicts as dicts, tuples as lists)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return json.loads(json.dumps(value))


def run_name(point: dict[str, Any], seed: int) -> str:
    """The directory name of a run: its overrides, FIELD=VALUE joined by commas."""
    parts = [f"{k}={format_value(v)}" for k, v in point.items()] + [f"seed={seed}"]
    return ",".join(_NAME_CHARS.sub("_", p) for p in parts)[:_MAX_NAME]


def make_plan(config: ml_collections.ConfigDict, grid: dict[str, list[Any]] | None = None,
              seeds: int = 1) -> Plan:
    """The runs of `config` at every point of `grid` with `seeds` seeds each (config.seed,
    config.seed + 1, ...). Every value, and every point's whole config, is validated first:
    a ValueError names the field and the value."""
    grid = {k: [coerce(k, v) for v in vs] if k in config_lib.FIELDS else list(vs)
            for k, vs in (grid or {}).items()}
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ValueError(f"seeds={seeds!r}: expected a number of seeds >= 1")
    if "seed" in grid:
        raise ValueError("the grid sweeps 'seed'; give the number of seeds instead (--seeds N: "
                         "config.seed, config.seed + 1, ...)")
    for field, values in grid.items():
        if field not in config_lib.FIELDS:
            raise config_lib.unknown_field_error(field)
        if not values:
            raise ValueError(f"grid field {field!r} has no values")
        plain = [json_value(v) for v in values]
        if len({json.dumps(p, sort_keys=True) for p in plain}) < len(plain):
            raise ValueError(f"grid field {field!r} repeats a value: {values}")
        for value in values:
            try:
                config_lib.with_overrides(config, **{field: value})
            except ValueError as err:
                raise ValueError(f"grid {field}={format_value(value)}: {err}") from None
    base = config_json.config_to_dict(config)
    runs = []
    for combo in itertools.product(*grid.values()):
        point = dict(zip(grid, combo))
        try:  # as each run's command line will give it (`overrides`)
            apply_overrides(config_lib.with_overrides(config, **point), point)
        except ValueError as err:
            where = ", ".join(f"{k}={format_value(v)}" for k, v in point.items())
            raise ValueError(f"grid point {where}: {err}") from None
        for seed in range(config.seed, config.seed + seeds):
            runs.append(PlannedRun(run_name(point, seed), {k: json_value(v) for k, v in point.items()},
                                   seed))
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        clash = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two runs would share the directory {clash!r}: grid values that "
                         "differ only in characters a directory name cannot hold")
    return Plan(base, {k: tuple(json_value(v) for v in vs) for k, vs in grid.items()},
                tuple(range(config.seed, config.seed + seeds)), tuple(runs))


def run_dir(workdir: str, run: PlannedRun) -> str:
    return os.path.join(os.path.abspath(workdir), RUNS_DIR, run.name)


def train_args(workdir: str, run: PlannedRun) -> list[str]:
    """The train command's arguments of a run (the sweep's config.json, its workdir, its
    overrides): the run is an ordinary run, which this command resumes too."""
    args = ["--config", os.path.join(os.path.abspath(workdir), CONFIG_FILE),
            "--workdir", run_dir(workdir, run)]
    return args + [f"--config.{k}={format_value(v)}" for k, v in run.overrides.items()]


def run_command(workdir: str, run: PlannedRun, processes: int = 1, devices_per_process: int = 1,
                python: str = sys.executable) -> list[str]:
    """The whole command of a run: `python -m resnet_jax.cli.train ...`, or with several
    processes `python -m resnet_jax.cli.launch ... -- ...` around the same arguments."""
    if processes > 1:
        return [python, "-m", LAUNCH_MODULE, "--num-processes", str(processes),
                "--devices-per-process", str(devices_per_process), "--",
                *train_args(workdir, run)]
    return [python, "-m", TRAIN_MODULE, *train_args(workdir, run)]


def run_config(plan: Plan, run: PlannedRun) -> ml_collections.ConfigDict:
    """A run's config as its train command builds it: the base config with its overrides."""
    base = config_json.config_from_dict(plan.config)
    config, _ = apply_overrides(config_lib.with_overrides(base, **run.overrides),
                                run.overrides)
    return config


def populations(plan: Plan, runs: list[PlannedRun], size: int) -> list[list[PlannedRun]]:
    """`runs` packed, in order, into populations of at most `size` members whose configs
    may train together (`population.check_members`): each run joins the first open
    population it fits."""
    from resnet_jax.training import population

    packs: list[list[PlannedRun]] = []
    firsts: list[ml_collections.ConfigDict] = []
    for run in runs:
        config = run_config(plan, run)
        for pack, first in zip(packs, firsts):
            if len(pack) < size and population.fits(first, config):
                pack.append(run)
                break
        else:
            packs.append([run])
            firsts.append(config)
    return packs


def population_command(workdir: str, runs: list[PlannedRun], python: str = sys.executable
                       ) -> list[str]:
    """The command that trains `runs` as one population (`resnet_jax.cli.population`)."""
    return [python, "-m", POPULATION_MODULE, "--sweep", os.path.abspath(workdir),
            *[f"--run={run.name}" for run in runs]]


def run_environment() -> dict[str, str]:
    """The environment of a run's process: this one's, with the package on its path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(PACKAGE_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


is_finished = rundir.is_finished  # whether a run finished (it wrote selected.json)


def write_plan(workdir: str, plan: Plan) -> None:
    """Write sweep.json and config.json (the base config) into `workdir`. A sweep already there must be the same
    config, grid and seeds (a ValueError says what differs): its runs are resumed."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, PLAN_FILE)
    if os.path.exists(path):
        old = read_plan(workdir)
        differs = [f"config field {k!r}: {old.config.get(k)!r} there, {plan.config.get(k)!r} now"
                   for k in sorted(set(old.config) | set(plan.config))
                   if old.config.get(k) != plan.config.get(k)]
        if old.to_dict()["grid"] != plan.to_dict()["grid"]:
            differs.append(f"grid: {old.to_dict()['grid']} there, {plan.to_dict()['grid']} now")
        if old.seeds != plan.seeds:
            differs.append(f"seeds: {list(old.seeds)} there, {list(plan.seeds)} now")
        if differs:
            raise ValueError(f"{workdir} holds another sweep ({'; '.join(differs[:3])}); "
                             "give a new --workdir, or the same config, grid and seeds to "
                             "resume it")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(plan.to_dict(), f, indent=2)
    os.replace(tmp, path)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        json.dump(plan.config, f, indent=2)


def read_plan(workdir: str) -> Plan:
    """The plan of the sweep in `workdir` (its sweep.json)."""
    path = os.path.join(workdir, PLAN_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a sweep directory "
                                "(made by experiments.sweep or resnet_jax.sweep)?")
    with open(path) as f:
        return Plan.from_dict(json.load(f))
