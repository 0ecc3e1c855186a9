"""One-off measurements behind the findings of docs/cpu_speed_log.md (single ops, A/B of one
layer inside a train step, device-layout agreement), kept to re-check them; the benchmarks
users run are `experiments.benchmark`'s (benchmarks/*.py)."""
