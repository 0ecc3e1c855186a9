"""Train the same few steps under two device layouts and report how far apart they end.

    python -m benchmarks.probes.layout_agreement --steps 3 --seed 0 \
        --layouts 1x4:sharded 2x2:pmap

Each layout is PROCESSESxDEVICES:STRATEGY, run by `python -m experiments.launch` on the main
job's config (synchronised BatchNorm, batch 32, constant learning rate 0.05, 256 training
images). Prints, for each pair of layouts, the largest difference over all parameters
relative to each leaf's largest entry, and the leaf where it occurs. Layouts that split the
batch differently agree to rounding (~1e-6) for a step or two; ReLU sign flips then move
them apart by ~1e-2 for some seeds (cpu_speed_log.md section 15).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_layout(text: str) -> tuple[int, int, str]:
    m = re.fullmatch(r"(\d+)x(\d+):(single|pmap|sharded)", text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"layout {text!r}: expected PROCESSESxDEVICES:STRATEGY with STRATEGY one of "
            "single, pmap, sharded, e.g. 2x2:pmap")
    return int(m[1]), int(m[2]), m[3]


def train_args(workdir: str, strategy: str, steps: int, seed: int) -> list[str]:
    return ["--config", os.path.join(ROOT, "experiments/configs/fashion_mnist.py"),
            "--workdir", workdir, f"--config.parallel={strategy}", f"--config.seed={seed}",
            "--config.train_subset=256", "--config.eval_subset=500", "--config.batch_size=32",
            "--config.eval_batch_size=100", f"--config.num_steps={steps}",
            "--config.schedule=constant", "--config.learning_rate=0.05",
            "--config.sync_batch_norm=True", "--config.progress_bar=False"]


def final_params(workdir: str) -> dict[str, np.ndarray]:
    import jax

    from resnet_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        _, state = ckpt.restore_raw()
    finally:
        ckpt.close()
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]}


def largest_difference(a: dict, b: dict) -> tuple[float, str]:
    return max((float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(a[k])), 1e-6)), k)
               for k in a)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layouts", nargs="+", type=parse_layout,
                        default=[parse_layout("1x4:sharded"), parse_layout("2x2:pmap")])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if len(args.layouts) < 2:
        parser.error("--layouts needs at least two layouts to compare")
    params = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (processes, devices, strategy) in enumerate(args.layouts):
            name = f"{processes}x{devices}:{strategy}"
            print(f"training {name} for {args.steps} steps", flush=True)
            workdir = os.path.join(tmp, str(i))
            code = subprocess.call(
                [sys.executable, "-m", "experiments.launch", "--num-processes", str(processes),
                 "--devices-per-process", str(devices), "--",
                 *train_args(workdir, strategy, args.steps, args.seed)], cwd=ROOT)
            if code != 0:
                sys.exit(f"layout {name} exited with {code}")
            params[name] = final_params(workdir)
    for a, b in itertools.combinations(params, 2):
        diff, leaf = largest_difference(params[a], params[b])
        print(f"{a} vs {b}, {args.steps} steps, seed {args.seed}: {diff:.2e} {leaf}")


if __name__ == "__main__":
    main()
