"""Every distinct convolution of a suite model, forward + both gradients, timed with XLA's
convolutions and with oneDNN's (ops.dnnl_conv), side by side in one process: which shapes
each back-end runs faster.

    python -m benchmarks.probes.model_conv_probe --model fashion_mnist_resnet50

Prints, per shape, how often the model has it, the median milliseconds of each back-end
(forward, input gradient and weight gradient in one jitted call) and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time


def conv_shapes(model_name: str) -> list[tuple[tuple, int]]:
    """(x shape, w shape, strides, pads, groups) of each convolution the model's train step
    runs, with its count, as the CPU path's hook sees them."""
    import collections
    import functools

    import jax
    from flax import linen as nn
    from jax import lax

    from benchmarks.speed_suite import SUITE
    from resnet_jax.models import get_model, get_spec

    shape, batch = {m: (s, b) for m, s, b in SUITE}[model_name]
    seen = collections.Counter()

    def hook(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, batch_group_count=1,
             precision=None, preferred_element_type=None):
        pads = (lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
                if isinstance(padding, str) else padding)
        seen[(tuple(lhs.shape), tuple(rhs.shape), tuple(window_strides),
              tuple(tuple(p) for p in pads), feature_group_count)] += 1
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count)

    spec = get_spec(model_name)
    conv = functools.partial(nn.Conv, conv_general_dilated=hook)
    model = get_model(model_name, num_classes=spec.num_classes, conv=conv)
    x = jax.ShapeDtypeStruct((batch, *shape), jax.numpy.float32)
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return list(seen.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="fashion_mnist_resnet50")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from resnet_jax.ops import cpu, cpu_conv

    options = cpu.jit_options("train")
    hooks = {"xla": cpu_conv.xla_conv_general_dilated, "onednn": cpu_conv.conv_general_dilated}
    rng = np.random.default_rng(0)
    total = {name: 0.0 for name in hooks}
    print(f"{args.model}: x shape, kernel, strides, pads, groups, count | ms xla, onednn, ratio")
    for (xs, ws, strides, pads, groups), count in conv_shapes(args.model):
        x = jax.device_put(rng.normal(size=xs).astype(np.float32))
        w = jax.device_put(rng.normal(size=ws).astype(np.float32))
        calls = {}
        for name, hook in hooks.items():
            def f(x, w, hook=hook):
                conv = lambda x, w: hook(x, w, strides, pads, dimension_numbers=cpu_conv.NHWC,
                                         feature_group_count=groups)
                y, vjp = jax.vjp(conv, x, w)
                return vjp(y)
            calls[name] = jax.jit(f, compiler_options=options).lower(x, w).compile()
        times = {name: [] for name in hooks}
        for name in hooks:
            jax.block_until_ready(calls[name](x, w))
        for _ in range(args.repeats):
            for name in hooks:
                start = time.perf_counter()
                jax.block_until_ready(calls[name](x, w))
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) * 1000 for name, t in times.items()}
        for name in hooks:
            total[name] += count * med[name]
        print(f"  {xs} {ws} s{strides} p{pads} g{groups} x{count} | {med['xla']:8.2f} "
              f"{med['onednn']:8.2f} {med['xla'] / med['onednn']:6.2f}x", flush=True)
    print(f"  sum over the model's convolutions: xla {total['xla']:.1f} ms, onednn "
          f"{total['onednn']:.1f} ms, {total['xla'] / total['onednn']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
