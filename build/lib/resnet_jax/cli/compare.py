"""Compare two sets of runs: for each metric, the difference of the means with its 95%
confidence interval by Welch's t (unequal variances, Welch-Satterthwaite degrees of freedom).

    python -m experiments.compare DIR_A DIR_B            two sweeps of one grid point each
    python -m experiments.compare DIR --a learning_rate=0.1 --b learning_rate=0.2
                                                         two grid points of one sweep
    [--a ... --b ... with two sweeps picks a point in each] [--confidence 0.95] [--json]

An interval that holds 0 means the runs cannot tell A from B at that confidence.
"""

from __future__ import annotations

import argparse
import json
import sys

from resnet_jax.sweeps import compare, load_runs
from resnet_jax.sweeps import plan as plan_lib
from resnet_jax.sweeps.report import metric_names


def point_spec(text: str | None) -> dict:
    """'FIELD=V,FIELD=V' -> {FIELD: V} with values read as their fields' types."""
    if not text:
        return {}
    out = {}
    for part in plan_lib.split_values(text):
        field, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"{text!r}: expected FIELD=VALUE[,FIELD=VALUE...]")
        out[field.strip()] = plan_lib.parse_value(field.strip(), value.strip())
    return out


def table(result: dict, label_a: str, label_b: str) -> str:
    """The comparison as a Markdown table (accuracies in percentage points)."""
    lines = [f"A: {label_a}", f"B: {label_b}", "",
             "| metric | A mean (n) | B mean (n) | A - B | 95% CI of A - B (Welch) | p |",
             "|---|---|---|---|---|---|"]
    for name in metric_names([result]):
        r = result[name]
        scale = 100.0 if "accuracy" in name else 1.0
        digits = 2 if "accuracy" in name else (1 if "seconds" in name else 4)
        f = lambda v: "-" if v is None else f"{v * scale:.{digits}f}"  # noqa: E731
        ci = (f"[{f(r['low'])}, {f(r['high'])}]" if r["low"] is not None
              else r.get("note", "-"))
        if r["confidence"] != 0.95:
            ci += f" ({100 * r['confidence']:g}%)"
        p = "-" if r["p"] is None else f"{r['p']:.3g}"
        unit = " (%)" if "accuracy" in name else ""
        lines.append(f"| {name}{unit} | {f(r['mean_a'])} ({r['n_a']}) | {f(r['mean_b'])} "
                     f"({r['n_b']}) | {f(r['difference'])} | {ci} | {p} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="one sweep, or two")
    parser.add_argument("--a", default=None, metavar="FIELD=V,...", help="A's grid point")
    parser.add_argument("--b", default=None, metavar="FIELD=V,...", help="B's grid point")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        if len(args.dirs) > 2:
            raise ValueError(f"{len(args.dirs)} directories given; expected one sweep (with "
                             "--a and --b) or two")
        if len(args.dirs) == 1 and not (args.a and args.b):
            raise ValueError("one sweep given: name its two grid points with --a and --b")
        dir_a, dir_b = args.dirs[0], args.dirs[-1]
        spec_a, spec_b = point_spec(args.a), point_spec(args.b)
        runs_a = load_runs(dir_a).select(**spec_a)
        runs_b = load_runs(dir_b).select(**spec_b)
        result = compare(runs_a, runs_b, args.confidence)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    label_a = dir_a + (f" ({args.a})" if args.a else "")
    label_b = dir_b + (f" ({args.b})" if args.b else "")
    if args.json:
        print(json.dumps({"a": label_a, "b": label_b, "test": "welch", "metrics": result},
                         indent=2))
    else:
        print(table(result, label_a, label_b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
