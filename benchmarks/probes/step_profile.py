"""Where a train step's time goes on the CPU: a `jax.profiler` trace of the training engine's
step for one speed-suite model, its XLA:CPU thunks summed by kind over both threads.

    python -m benchmarks.probes.step_profile --model cifar_resnet56 [--steps 5] [--top 25]
    python -m benchmarks.probes.step_profile --config fashion_mnist   # a config's model, batch,
                                                                      # optimizer and CPU options

Kinds: the oneDNN convolutions by handler (forward, input gradient, weight gradient), XLA's
own convolutions and dots, and every fusion by its name with the trailing number dropped
(`add_maximum_fusion.12` -> `add_maximum_fusion`). Prints the median step time, each kind's
milliseconds per step (thread time: with two threads it can add up to twice the step), its
wall time (the part of the timeline where at least one of its thunks runs), its count per
step and share of thread time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time


def _events(log_dir: str) -> list[dict]:
    (path,) = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        trace = json.load(f)
    return [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]


def covered_ms(spans: list[tuple[float, float]]) -> float:
    """Milliseconds of the timeline covered by at least one of the (start, end) spans (in us):
    a kind's wall time, where thunk time counts concurrent or waiting thunks twice."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e3


def kind(name: str) -> str:
    """A thunk's kind: the name less its instance number and wrapping."""
    name = re.sub(r"\.\d+$", "", name)
    return re.sub(r"^wrapped_", "", name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cifar_resnet56",
                        help="a speed-suite model, at the suite's input and batch")
    parser.add_argument("--config", default=None,
                        help="a config (name or file) instead: its model, input, batch, "
                             "optimizer and cpu_conv_dtype")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from benchmarks.speed_suite import SUITE
    from resnet_jax.configs import load_config
    from resnet_jax.models import get_spec
    from resnet_jax.training import config, experiment
    from resnet_jax.training.durations import durations
    from resnet_jax.training.optim import make_optimizer
    from resnet_jax.training.state import create_train_state

    if args.config:
        c = load_config(args.config)
        spec = get_spec(c.model)
        shape, batch, args.model = spec.input_shape, c.batch_size, c.model
    else:
        shape, batch = next((s, b) for m, s, b in SUITE if m == args.model)
        spec = get_spec(args.model)
        c = config.base_config()
        c.model, c.schedule, c.momentum, c.batch_size = args.model, "constant", 0.9, batch
    experiment.apply_process_settings(c)
    model = experiment.build_model(c, spec.num_classes)
    tx, schedule = make_optimizer(c, durations(c, 1000))
    state = jax.jit(create_train_state, static_argnums=(0, 1, 3))(model, tx, jax.random.key(0),
                                                                  shape)
    rng = np.random.default_rng(0)
    data = {"image": jax.device_put(rng.normal(size=(batch, *shape)).astype(np.float32)),
            "label": jax.device_put(rng.integers(0, spec.num_classes, batch).astype(np.int32))}
    step = experiment.make_steps(c, model, spec.num_classes, tx, schedule).train_step
    key = jax.random.key(1)
    for _ in range(3):
        state, m = step(state, data, key)
    jax.block_until_ready(m)
    times = []
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                start = time.perf_counter()
                state, m = step(state, data, key)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - start)
        events = _events(log_dir)
    thunks = [e for e in events if e.get("name") and not e["name"].startswith(("$", "Pjit",
                                                                               "PjRt", "Thunk"))]
    by_kind: dict[str, list[float]] = collections.defaultdict(list)
    spans: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for e in thunks:
        by_kind[kind(e["name"])].append(e["dur"] / 1e3)
        spans[kind(e["name"])].append((e["ts"], e["ts"] + e["dur"]))
    step_ms = statistics.median(times) * 1e3
    total = sum(sum(v) for v in by_kind.values()) / args.steps
    print(f"{args.model}, batch {batch}: step {step_ms:.1f} ms (median of {args.steps}), "
          f"{batch / step_ms * 1e3:.1f} images/s; thunk time {total:.1f} ms per step")
    print(f"{'kind':48s} {'ms/step':>9s} {'wall ms':>8s} {'count':>6s} {'share':>6s}")
    rows = sorted(by_kind.items(), key=lambda kv: -sum(kv[1]))
    for name, durs in rows[:args.top]:
        per = sum(durs) / args.steps
        wall = covered_ms(spans[name]) / args.steps
        print(f"{name[:48]:48s} {per:9.2f} {wall:8.2f} {len(durs) / args.steps:6.0f} "
              f"{per / total:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
