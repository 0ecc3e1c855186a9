"""What a sweep's runs reached, read back: each run's selected model (selected.json) and
time, the means and spreads per grid point (summary.json, summary.md), and plots of each
metric against each swept field and of the runs' curves."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from resnet_jax.sweeps import plan as plan_lib
from resnet_jax.sweeps.plan import Plan
from resnet_jax.training import metrics as metrics_lib
from resnet_jax.training.run import Run
from resnet_jax.training import rundir

TIME_METRIC = "wall_seconds"  # the run's training loop, evaluations included (metrics.jsonl)
SUMMARY_JSON, SUMMARY_MD = "summary.json", "summary.md"
PLOTS = ("plots/summary.png", "plots/curves.png")
_NOT_METRICS = ("overrides", "runs", "seeds", "unfinished")


@dataclasses.dataclass
class SweepRun:
    """One run of a sweep as it stands: its grid point, seed, directory, what it selected
    (selected.json, {} until it finished) and its history (metrics.jsonl)."""

    name: str
    point: dict[str, Any]
    seed: int
    workdir: str
    selected: dict[str, Any]
    history: list[dict[str, Any]]

    @property
    def finished(self) -> bool:
        return bool(self.selected)

    @property
    def metrics(self) -> dict[str, float]:
        """The selected model's validation and test metrics and the run's time."""
        out = {k: float(v) for k, v in self.selected.items()
               if k.startswith(("val_", "test_")) and not k.endswith("_count")
               and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.history and TIME_METRIC in self.history[-1]:
            out[TIME_METRIC] = float(self.history[-1][TIME_METRIC])
        return out

    def load(self, which: str = "selected") -> Run:
        """The trained run (model, variables, predict...), as `Run.load` gives it."""
        return Run.load(self.workdir, which)


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """mean, std (the sample standard deviation, n - 1; None for one value), min, max."""
    x = np.asarray(values, np.float64)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else None,
            "min": float(x.min()), "max": float(x.max())}


def collect(workdir: str) -> tuple[Plan, list[SweepRun]]:
    """The plan of the sweep in `workdir` and each of its runs as it stands."""
    plan = plan_lib.read_plan(workdir)
    runs = []
    for r in plan.runs:
        where = plan_lib.run_dir(workdir, r)
        selected = rundir.read_selected(where)
        history = metrics_lib.read_metrics(where) if os.path.isdir(where) else []
        runs.append(SweepRun(r.name, r.point, r.seed, where, selected, history))
    return plan, runs


def points(plan: Plan, runs: list[SweepRun]) -> list[tuple[dict[str, Any], list[SweepRun]]]:
    """The grid points in order, each with its runs."""
    out: list[tuple[dict[str, Any], list[SweepRun]]] = []
    for run in runs:
        if out and out[-1][0] == run.point:
            out[-1][1].append(run)
        else:
            out.append((run.point, [run]))
    return out


def summary_rows(plan: Plan, runs: list[SweepRun]) -> list[dict[str, Any]]:
    """One row per grid point: its overrides, the number of finished runs, and each metric's
    mean, std, min and max over them (the runs not finished yet are named, not counted)."""
    rows = []
    for point, group in points(plan, runs):
        done = [r for r in group if r.finished]
        row: dict[str, Any] = {"overrides": point, "runs": len(done),
                               "seeds": [r.seed for r in done]}
        if len(done) < len(group):
            row["unfinished"] = [r.name for r in group if not r.finished]
        names = sorted(set().union(*(r.metrics for r in done))) if done else []
        for name in names:
            values = [r.metrics[name] for r in done if name in r.metrics]
            row[name] = spread(values)
        rows.append(row)
    return rows


def metric_names(rows: list[dict[str, Any]]) -> list[str]:
    """The metrics of a summary, test ones first, the time last."""
    names = {k for row in rows for k in row if k not in _NOT_METRICS}
    order = lambda n: (n == TIME_METRIC, not n.startswith("test_"), n)  # noqa: E731
    return sorted(names, key=order)


def _cell(name: str, s: dict[str, float | None] | None) -> str:
    if not s:
        return ""
    scale, digits = (100.0, 2) if "accuracy" in name else (1.0, 1 if "seconds" in name else 4)
    mean = f"{s['mean'] * scale:.{digits}f}"
    return mean if s["std"] is None else f"{mean} ± {s['std'] * scale:.{digits}f}"


def markdown(plan: Plan, rows: list[dict[str, Any]]) -> str:
    """The summary as a Markdown table: mean ± std per grid point (accuracies in %)."""
    fields, names = list(plan.grid), metric_names(rows)
    head = fields + ["runs"] + [f"{n} (%)" if "accuracy" in n else n for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [plan_lib.format_value(row["overrides"][f]) for f in fields]
        cells += [str(row["runs"]) + (f" (+{len(row['unfinished'])} unfinished)"
                                      if row.get("unfinished") else "")]
        cells += [_cell(n, row.get(n)) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = ", ".join(map(str, plan.seeds))
    return (f"Sweep of {len(plan.runs)} runs: {len(rows)} grid point(s) x seeds {seeds}. "
            "Mean ± sample standard deviation (n - 1) over each point's finished runs, for "
            f"the model each run selected (selected.json); {TIME_METRIC}: the training loop's "
            "time, evaluations included.\n\n" + "\n".join(lines) + "\n")


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_summary(plan: Plan, rows: list[dict[str, Any]], runs: list[SweepRun], path: str
                 ) -> None:
    """Each metric (accuracies and time) against each swept field, mean ± std over the seeds,
    one line per setting of the other fields; without a grid, each run's value by seed."""
    from matplotlib.figure import Figure

    names = [n for n in metric_names(rows)
             if (n.endswith("_accuracy") and "top5" not in n) or n == TIME_METRIC]
    fields = list(plan.grid) or ["seed"]
    fig = Figure(figsize=(4.2 * len(fields), 3.2 * max(len(names), 1)))
    axes = np.atleast_2d(fig.subplots(max(len(names), 1), len(fields), squeeze=False))
    for i, name in enumerate(names):
        for j, field in enumerate(fields):
            ax = axes[i, j]
            if field == "seed":
                done = [r for r in runs if name in r.metrics]
                seeds = [r.seed for r in done]
                ax.plot(seeds, [r.metrics[name] for r in done], "o", label="runs")
                if rows and rows[0].get(name):
                    s = rows[0][name]
                    ax.axhline(s["mean"], color="C1", label="mean")
                    if s["std"] is not None:
                        ax.axhspan(s["mean"] - s["std"], s["mean"] + s["std"], color="C1",
                                   alpha=0.2, label="± std")
                ax.legend(fontsize=7)
            else:
                _errorbars(ax, plan, rows, name, field)
            ax.set_xlabel(field)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
    fig.suptitle(f"{os.path.basename(os.path.dirname(os.path.dirname(path)))}: mean ± std "
                 f"over seeds {', '.join(map(str, plan.seeds))}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)


def _errorbars(ax, plan: Plan, rows: list[dict[str, Any]], name: str, field: str) -> None:
    values = list(plan.grid[field])
    numeric = _numeric(values)
    others = [f for f in plan.grid if f != field]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get(name):
            key = ", ".join(f"{f}={plan_lib.format_value(row['overrides'][f])}" for f in others)
            groups.setdefault(key, []).append(row)
    for key, group in groups.items():
        group.sort(key=lambda r: values.index(r["overrides"][field]))
        xs = [r["overrides"][field] if numeric else values.index(r["overrides"][field])
              for r in group]
        ax.errorbar(xs, [r[name]["mean"] for r in group],
                    yerr=[r[name]["std"] or 0.0 for r in group], marker="o", capsize=3,
                    label=key or None)
    if numeric and min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(values)), [plan_lib.format_value(v) for v in values],
                      rotation=20, fontsize=7)
    if others and groups:
        ax.legend(fontsize=7)


def plot_runs_curves(plan: Plan, runs: list[SweepRun], path: str) -> None:
    """Every run's accuracy per epoch (validation and test, where evaluated), one colour per
    grid point."""
    from matplotlib.figure import Figure

    splits = [s for s in ("val", "test")
              if any(f"{s}_accuracy" in rec for r in runs for rec in r.history)] or ["train"]
    fig = Figure(figsize=(5.5 * len(splits), 4))
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    for ax, split in zip(axes, splits):
        for k, (point, group) in enumerate(points(plan, runs)):
            label = ", ".join(f"{f}={plan_lib.format_value(v)}" for f, v in point.items())
            labelled = False
            for run in group:
                xy = [(rec["epoch"], rec[f"{split}_accuracy"]) for rec in run.history
                      if f"{split}_accuracy" in rec]
                if xy:
                    ax.plot(*zip(*xy), "-", color=f"C{k % 10}", alpha=0.7, marker=".",
                            label=None if labelled else (label or "runs"))
                    labelled = True
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{split}_accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)


def write_summary(results: "SweepResults") -> None:
    """Write summary.json, summary.md and the plots of a sweep read back (`load_runs`) into
    its directory."""
    plan, runs, rows, workdir = results.plan, results.runs, results.table, results.workdir
    metrics_lib.write_json(os.path.join(workdir, SUMMARY_JSON), rows)
    with open(os.path.join(workdir, SUMMARY_MD), "w") as f:
        f.write(markdown(plan, rows))
    if any(r.finished for r in runs):
        plot_summary(plan, rows, runs, os.path.join(workdir, PLOTS[0]))
        plot_runs_curves(plan, runs, os.path.join(workdir, PLOTS[1]))


@dataclasses.dataclass
class SweepResults:
    """A sweep read back, for notebooks: its plan, its runs and the summary table."""

    workdir: str
    plan: Plan
    runs: list[SweepRun]
    table: list[dict[str, Any]]

    def select(self, **fields: Any) -> list[SweepRun]:
        """The runs of the one grid point whose fields have these values (all of them when
        the sweep has one point and no fields are given)."""
        matches = [(p, g) for p, g in points(self.plan, self.runs)
                   if all(p.get(k, _MISSING) == plan_lib.json_value(v)
                          for k, v in fields.items())]
        if len(matches) != 1:
            known = "; ".join(", ".join(f"{k}={plan_lib.format_value(v)}" for k, v in p.items())
                              or "(no grid)" for p, _ in points(self.plan, self.runs))
            what = ", ".join(f"{k}={v!r}" for k, v in fields.items()) or "no fields"
            raise ValueError(f"{what} matches {len(matches)} grid points of {self.workdir}; "
                             f"expected one of: {known}")
        return matches[0][1]

    def markdown(self) -> str:
        return markdown(self.plan, self.table)

    def _repr_markdown_(self) -> str:
        return self.markdown()


_MISSING = object()


def load_runs(workdir: str) -> SweepResults:
    """The sweep in `workdir`: its runs (each `.load()`s as a `Run`) and its summary table,
    computed from the runs as they stand."""
    plan, runs = collect(workdir)
    return SweepResults(workdir, plan, runs, summary_rows(plan, runs))
