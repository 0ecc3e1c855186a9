"""Populations against the same members trained one after another: the train step's aggregate
images/s and a whole job's wall time, for populations of 1, 2, 4 and 8 members.

    python -m experiments.benchmark --population 1,2,4,8 [--models fashion_mnist_resnet8,cifar_resnet20]
    python -m experiments.benchmark --population 1,2,4,8 --models cifar_resnet20 --platform gpu --job-steps 0

- step: in one process, the population's step (the engine's: each member's train step as
  `population_map` runs it, 'unroll' and 'vmap') on N batches against the single run's step
  called N times; rounds alternate the two, the median of `--steps` timed steps each. The
  aggregate rate is N x batch / step time.
- job: the train command (experiments.train) for `--job-steps` steps, one process with
  `population_size=N` against N processes one after another (seeds 0..N-1), start-up,
  compilation, data loading and the final evaluation included; each side from an empty
  compilation cache of its own (the separate runs share theirs, as a user's consecutive runs
  do). The data: Fashion-MNIST's IDX files (cifar_resnet20 on them with channels=3, 28x28).

Results: experiments/results/population/population_PLATFORM.json and .md.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results", "population")
# net: (config for the step, the train command's options for the job)
NETS = {
    "fashion_mnist_resnet8": ("fashion_mnist", []),
    "cifar_resnet20": ("cifar10_resnet20", ["--config.model=cifar_resnet20",
                                            "--config.channels=3"]),
}
JOB_STEPS = {"fashion_mnist_resnet8": 200, "cifar_resnet20": 60}


def _median_seconds(fn, steps: int, warmup: int) -> float:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_rows(net: str, members: list[int], steps: int, warmup: int, rounds: int) -> list[dict]:
    """The population's step against N single steps, for each N in `members`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from resnet_jax.configs import load_config
    from resnet_jax.training import experiment, population
    from resnet_jax.training.durations import durations
    from resnet_jax.training.optim import make_optimizer
    from resnet_jax.training.state import create_train_state

    c = load_config(NETS[net][0])
    experiment.apply_process_settings(c)
    classes = 10
    model = experiment.build_model(c, classes)
    tx, schedule = make_optimizer(c, durations(c, 1000))
    shape = experiment.image_shape(c)
    options = (experiment.jit_options(c) or (lambda kind: None))("train")
    step = experiment.train_step(c, model, tx, schedule, None)
    single = jax.jit(step, compiler_options=options)
    rng = np.random.default_rng(0)
    rows = []
    for n in members:
        keys = jax.random.split(jax.random.key(0), n)
        states = [create_train_state(model, tx, k, shape) for k in keys]
        batch = {"image": jnp.asarray(rng.integers(0, 256, (c.batch_size, n, *shape), np.uint8)),
                 "label": jnp.asarray(rng.integers(0, classes, (c.batch_size, n), np.int32))}
        one = [{"image": batch["image"][:, k], "label": batch["label"][:, k]} for k in range(n)]
        runs = {"separate": lambda: [single(states[k], one[k], keys[k]) for k in range(n)]}
        for mode in ("unroll", "vmap"):
            mapped = jax.jit(population._mapped(step, mode, n), compiler_options=options)
            held = tuple(states) if mode == "unroll" else jax.tree.map(
                lambda *xs: jnp.stack(xs), *states)
            start = time.perf_counter()
            jax.block_until_ready(mapped(held, batch, keys))
            compiled = time.perf_counter() - start
            runs[mode] = lambda mapped=mapped, held=held: mapped(held, batch, keys)
            runs[mode].compile_seconds = compiled
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(rounds):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                times[name].append(_median_seconds(runs[name], steps, warmup))
        seconds = {name: statistics.median(t) for name, t in times.items()}
        for name in ("unroll", "vmap"):
            rows.append({
                "net": net, "members": n, "population_map": name, "batch": c.batch_size,
                "input_shape": list(shape),
                "population_images_per_second": round(n * c.batch_size / seconds[name], 1),
                "separate_images_per_second": round(n * c.batch_size / seconds["separate"], 1),
                "speedup": round(seconds["separate"] / seconds[name], 3),
                "first_call_seconds": round(runs[name].compile_seconds, 2)})
            print(f"{net} step, {n} member(s), {name}: {rows[-1]['speedup']:.2f}x the members' "
                  f"own steps one after another ({rows[-1]['population_images_per_second']:.0f} "
                  f"against {rows[-1]['separate_images_per_second']:.0f} images/s)", flush=True)
    return rows


def _train(args: list[str], cache: str) -> float:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, PYTHONPATH=ROOT)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return time.perf_counter() - start


def job_rows(net: str, members: list[int], job_steps: int) -> list[dict]:
    """The train command's whole job: a population of N against N runs in turn."""
    rows = []
    common = ["--config", "fashion_mnist", *NETS[net][1], f"--config.num_steps={job_steps}",
              "--config.eval_subset=2000", "--config.test_every_period=False",
              "--config.progress_bar=False"]
    for n in members:
        scratch = tempfile.mkdtemp(prefix="population_bench_")
        try:
            together = _train([*common, "--workdir", os.path.join(scratch, "pop"),
                               f"--config.population_size={n}"], os.path.join(scratch, "c1"))
            apart = sum(_train([*common, "--workdir", os.path.join(scratch, f"seed{k}"),
                                f"--config.seed={k}"], os.path.join(scratch, "c2"))
                        for k in range(n))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        rows.append({"net": net, "members": n, "steps": job_steps,
                     "population_seconds": round(together, 1),
                     "separate_seconds": round(apart, 1),
                     "speedup": round(apart / together, 3)})
        print(f"{net} job of {job_steps} steps, {n} member(s): population {together:.1f} s, "
              f"separate {apart:.1f} s ({apart / together:.2f}x)", flush=True)
    return rows


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def markdown(meta: dict, steps: list[dict], jobs: list[dict]) -> str:
    lines = [f"Populations against their members one after another ({meta['device']}, "
             f"{meta['date']}, jax {meta['jax']}). Step: the aggregate train-step rate of N "
             "members (N x batch / step time); job: the train command's wall time, start-up "
             "included.", "",
             "| net | members | map | population images/s | separate images/s | speed-up |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['net']} | {r['members']} | {r['population_map']} | "
              f"{r['population_images_per_second']:.0f} | {r['separate_images_per_second']:.0f}"
              f" | {r['speedup']:.2f}x |" for r in steps]
    if jobs:
        lines += ["", "| net | members | steps | population (s) | separate (s) | speed-up |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['net']} | {r['members']} | {r['steps']} | {r['population_seconds']} "
                  f"| {r['separate_seconds']} | {r['speedup']:.2f}x |" for r in jobs]
    return "\n".join(lines) + "\n"


def main(members: list[int], nets: list[str] | None = None, steps: int = 10, warmup: int = 2,
         rounds: int = 2, job_steps: int | None = None, out_dir: str = RESULTS) -> int:
    """Measure and write population_PLATFORM.json/.md; `job_steps` 0 skips the jobs."""
    import jax

    nets = nets or list(NETS)
    unknown = [n for n in nets if n not in NETS]
    if unknown:
        raise ValueError(f"models {unknown}: expected some of {list(NETS)}")
    if any(n < 1 for n in members):
        raise ValueError(f"members {members}: expected counts >= 1")
    step = [row for net in nets for row in step_rows(net, members, steps, warmup, rounds)]
    jobs = [row for net in nets if job_steps != 0
            for row in job_rows(net, members, job_steps or JOB_STEPS[net])]
    device = jax.devices()[0]
    meta = {"date": time.strftime("%Y-%m-%d"), "platform": jax.default_backend(),
            "device": _cpu_name() if device.platform == "cpu" else device.device_kind,
            "cores": os.cpu_count(), "jax": jax.__version__, "steps": steps, "rounds": rounds}
    os.makedirs(out_dir, exist_ok=True)
    name = f"population_{meta['platform']}"
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump({"meta": meta, "step": step, "job": jobs}, f, indent=2)
    table = markdown(meta, step, jobs)
    with open(os.path.join(out_dir, name + ".md"), "w") as f:
        f.write(table)
    print(table)
    return 0
