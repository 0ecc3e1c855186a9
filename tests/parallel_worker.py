"""Runs a few training steps under a parallel strategy and saves the resulting state.

Used by test_parallel.py in a fresh process, so that the number of CPU devices can be set
(XLA_FLAGS) before JAX starts:

    python tests/parallel_worker.py OUT.npz STRATEGY [STRATEGY ...] [--sync-bn] [--ops-bn]
        [--steps 3]

Layouts are compared on the reference layers (nn.Conv, nn.BatchNorm: `cpu_kernels=False`),
whose numbers do not depend on which convolution algorithm a CPU's instruction set selects.
--ops-bn swaps nn.BatchNorm for resnet_jax.ops.batch_norm.BatchNorm (the CPU kernels' own
test of it under synchronised statistics).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from resnet_jax.training import experiment  # noqa: E402
from resnet_jax.training.config import base_config  # noqa: E402
from resnet_jax.training.durations import durations
from resnet_jax.training.optim import make_optimizer  # noqa: E402
from resnet_jax.training.parallel import fetch  # noqa: E402
from resnet_jax.training.state import create_train_state  # noqa: E402

BATCH = 16


def config(strategy: str, sync_bn: bool):
    c = base_config()
    c.model = "cifar_resnet20"
    c.model_overrides.stage_sizes = (1, 1, 1)
    c.parallel = strategy
    c.sync_batch_norm = sync_bn
    c.cpu_kernels = False
    c.batch_size = c.eval_batch_size = BATCH
    c.learning_rate = 0.05
    c.schedule = "constant"
    return c


def run(strategy: str, sync_bn: bool, steps: int, ops_bn: bool = False) -> dict[str, np.ndarray]:
    c = config(strategy, sync_bn)
    model = experiment.build_model(c, 10)
    if ops_bn:
        from resnet_jax.ops.batch_norm import BatchNorm

        model = model.clone(norm=BatchNorm)
    tx, schedule = make_optimizer(c, durations(c, 100))
    s = experiment.make_steps(c, model, 10, tx, schedule)
    state = s.place_state(jax.jit(create_train_state, static_argnums=(0, 1, 3))(
        model, tx, jax.random.key(0), (28, 28, 1)))
    rng = np.random.default_rng(0)
    for _ in range(steps):
        batch = {"image": rng.normal(size=(BATCH, 28, 28, 1)).astype(np.float32),
                 "label": rng.integers(0, 10, BATCH).astype(np.int32)}
        state, _ = s.train_step(state, s.put_train_batch(batch), jax.random.key(1))
    state = s.gather_state(state)
    flat = jax.tree_util.tree_flatten_with_path({"params": state.params,
                                                 "batch_stats": state.batch_stats})[0]
    return {f"{strategy}{jax.tree_util.keystr(p)}": fetch(v) for p, v in flat}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("strategies", nargs="+")
    parser.add_argument("--sync-bn", action="store_true")
    parser.add_argument("--ops-bn", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    arrays = {}
    for strategy in args.strategies:
        arrays.update(run(strategy, args.sync_bn, args.steps, args.ops_bn))
    arrays["device_count"] = np.asarray(jax.device_count())
    np.savez(args.out, **arrays)


if __name__ == "__main__":
    main()
