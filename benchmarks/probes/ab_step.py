"""A/B of one suite model's train step with Flax's layer and with the CPU fast path's
replacement for it (`--op batch_norm`: nn.BatchNorm vs ops.batch_norm.BatchNorm; `--op
max_pool`: nn.max_pool vs ops.max_pool.max_pool; `--op conv`: XLA's convolutions vs
oneDNN's, ops.cpu_conv.xla_conv_general_dilated vs ops.cpu_conv.conv_general_dilated;
`--op conv_dtype`: oneDNN's convolutions with float32 operands vs bfloat16 ones), the
rest of the CPU path on in both, both compiled in one process and timed interleaved, so that
the machine's noise hits both alike.
Also checks that one step from the same state gives the same loss and parameters.

    python -m benchmarks.probes.ab_step --model cifar_resnet20 [--op batch_norm] [--repeats 10]

Models of the speed suite run at its input and batch; any other registry model at its own
input and batch 128.

Prints the median step time and images/s of each, and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--op", default="batch_norm", choices=("batch_norm", "max_pool", "conv", "conv_dtype"))
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from benchmarks.speed_suite import SUITE
    from resnet_jax.models import get_spec
    from resnet_jax.ops import cpu, cpu_conv
    from resnet_jax.ops.batch_norm import BatchNorm
    from resnet_jax.ops.max_pool import max_pool
    from resnet_jax.training import experiment
    from resnet_jax.training.config import base_config
    from resnet_jax.training.durations import durations
    from resnet_jax.training.losses import get_loss
    from resnet_jax.training.optim import make_optimizer
    from resnet_jax.training.state import create_train_state
    from resnet_jax.training.steps import make_train_step

    suite = {m: (s, b) for m, s, b in SUITE}
    try:
        spec = get_spec(args.model)
    except ValueError as err:
        parser.error(str(err))
    # the speed suite's input and batch; other registry models: their input, batch 128
    shape, batch = suite.get(args.model, (spec.input_shape, 128))
    c = base_config()
    c.model, c.schedule, c.momentum = args.model, "constant", 0.9
    rng = np.random.default_rng(0)
    data = {"image": jax.device_put(rng.normal(size=(batch, *shape)).astype(np.float32)),
            "label": jax.device_put(rng.integers(0, spec.num_classes, batch).astype(np.int32))}
    key = jax.random.key(1)
    variants = {"batch_norm": (("nn.BatchNorm", nn.BatchNorm), ("ops.batch_norm", BatchNorm)),
                "max_pool": (("nn.max_pool", nn.max_pool), ("ops.max_pool", max_pool)),
                "conv": (("xla conv", functools.partial(
                             nn.Conv, conv_general_dilated=cpu_conv.xla_conv_general_dilated)),
                         ("oneDNN conv", functools.partial(
                             nn.Conv, conv_general_dilated=cpu_conv.conv_general_dilated))),
                "conv_dtype": tuple(
                    (f"{dtype} conv", functools.partial(nn.Conv, conv_general_dilated=(
                        functools.partial(cpu_conv.conv_general_dilated, operands=dtype))))
                    for dtype in ("float32", "bfloat16"))}
    field = {"batch_norm": "norm", "max_pool": "pool", "conv_dtype": "conv"}.get(args.op, args.op)
    steps, states = {}, {}
    for name, layer in variants[args.op]:
        model = experiment.build_model(c, spec.num_classes)
        if field not in {f.name for f in dataclasses.fields(model)}:
            parser.error(f"--op {args.op}: model {args.model!r} has no {field!r} field")
        model = model.clone(**{field: layer})
        tx, schedule = make_optimizer(c, durations(c, 1000))
        state = jax.jit(create_train_state, static_argnums=(0, 1, 3))(
            model, tx, jax.random.key(0), shape)
        steps[name] = jax.jit(make_train_step(model, tx, schedule, get_loss(c.loss)),
                              compiler_options=cpu.jit_options("train")).lower(
            state, data, key).compile()
        states[name] = state

    after = {name: steps[name](states[name], data, key) for name in steps}
    (sa, ma), (sb, mb) = after.values()
    diff, leaf = max(
        (float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30)), jax.tree_util.keystr(k))
        for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(sa.params),
                             jax.tree.leaves(sb.params)))
    print(f"{args.model}, batch {batch}: one step from the same state: loss "
          f"{float(ma['loss']):.6f} vs {float(mb['loss']):.6f}, params max rel diff {diff:.1e} "
          f"({leaf})")

    times = {name: [] for name in steps}
    for name in steps:  # warm-up
        for _ in range(2):
            states[name], m = steps[name](states[name], data, key)
            jax.block_until_ready(m)
    for _ in range(args.repeats):
        for name in steps:
            start = time.perf_counter()
            states[name], m = steps[name](states[name], data, key)
            jax.block_until_ready(m)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in medians.items():
        print(f"  {name:16s} {t * 1000:8.1f} ms  {batch / t:8.1f} images/s")
    a, b = medians.values()
    print(f"  speed-up {a / b:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
