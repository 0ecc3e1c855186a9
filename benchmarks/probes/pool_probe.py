"""Max-pooling forward and forward+backward at the zoo's pool shapes: autodiff of
`nn.max_pool` against `ops.max_pool` (the CPU path's), compiled with the train step's CPU
options and timed interleaved in one process.

    python -m benchmarks.probes.pool_probe [--repeats 9]

Prints milliseconds (median of the repeats) and the ratio for each shape.
"""

from __future__ import annotations

import argparse
import statistics
import time

# (where, input shape, window, strides, padding)
SHAPES = [
    ("alexnet pool1", (32, 55, 55, 64), (3, 3), (2, 2), "VALID"),
    ("alexnet pool2", (32, 27, 27, 192), (3, 3), (2, 2), "VALID"),
    ("alexnet pool5", (32, 13, 13, 256), (3, 3), (2, 2), "VALID"),
    ("resnet stem (224)", (32, 112, 112, 64), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ("mnist pre-act, stage 2", (32, 28, 28, 16), (2, 2), (2, 2), "VALID"),
    ("mnist pre-act, stage 3", (32, 14, 14, 32), (2, 2), (2, 2), "VALID"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)

    import jax
    from flax import linen as nn

    from resnet_jax.ops import cpu, cpu_conv
    from resnet_jax.ops.max_pool import max_pool

    options = cpu.jit_options("train")
    print(f"{'pool':24s} {'input':20s} {'fwd flax':>9s} {'fwd ops':>9s} "
          f"{'f+b flax':>9s} {'f+b ops':>9s} {'f+b speed-up':>12s}")
    for where, shape, window, strides, padding in SHAPES:
        x = jax.random.normal(jax.random.key(0), shape)
        fns = {}
        for name, pool in (("flax", nn.max_pool), ("ops", max_pool)):
            def forward(x, pool=pool):
                return pool(x, window, strides, padding)

            def both(x, dy, pool=pool):
                y, vjp = jax.vjp(lambda x_: pool(x_, window, strides, padding), x)
                return y, vjp(dy)[0]

            y = forward(x)
            dy = jax.random.normal(jax.random.key(1), y.shape)
            fns[name, "fwd"] = (jax.jit(forward, compiler_options=options), (x,))
            fns[name, "both"] = (jax.jit(both, compiler_options=options), (x, dy))
        times = {k: [] for k in fns}
        for fn, a in fns.values():  # compile and warm up
            jax.block_until_ready(fn(*a))
            jax.block_until_ready(fn(*a))
        for _ in range(args.repeats):
            for k, (fn, a) in fns.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(*a))
                times[k].append(time.perf_counter() - start)
        ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
        print(f"{where:24s} {'x'.join(map(str, shape)):20s} {ms['flax', 'fwd']:9.2f} "
              f"{ms['ops', 'fwd']:9.2f} {ms['flax', 'both']:9.2f} {ms['ops', 'both']:9.2f} "
              f"{ms['flax', 'both'] / ms['ops', 'both']:11.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
