"""One 3x3 convolution (+ BatchNorm + ReLU) forward and backward, resnet_jax's CPU path
against PyTorch (channels-last), in one process: where a model's gap to PyTorch comes from.

    python -m benchmarks.probes.conv_probe --batch 128 --size 32 --channels 16

Prints milliseconds (median of 7 after 2 warm-up calls). Needs requirements-bench.txt.
"""

from __future__ import annotations

import argparse

import numpy as np


def median_ms(fn, repeats: int = 7) -> float:
    from benchmarks.speed_suite import _timed

    return _timed(fn, repeats, warmup=1)[1] * 1000


def torch_times(batch: int, size: int, channels: int, threads: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    cl = torch.channels_last
    x = torch.randn(batch, channels, size, size).to(memory_format=cl).requires_grad_()
    g = torch.randn(batch, channels, size, size).to(memory_format=cl)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=cl)
    bn = torch.nn.BatchNorm2d(channels)

    def forward():
        with torch.no_grad():
            conv(x)

    return {"conv forward": median_ms(forward),
            "conv forward+backward": median_ms(lambda: conv(x).backward(g)),
            "conv+BN+ReLU forward+backward": median_ms(
                lambda: torch.relu(bn(conv(x))).backward(g))}


def jax_times(batch: int, size: int, channels: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    from jax import lax

    from resnet_jax.ops import cpu, cpu_conv

    options = cpu.jit_options("train")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, channels)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=(batch, size, size, channels)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(3, 3, channels, channels)).astype(np.float32) * 0.1)
    scale, bias = jnp.ones(channels), jnp.zeros(channels)

    def conv(x, w):
        return cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME",
                                             dimension_numbers=cpu_conv.NHWC)

    def block(x, w, s, b):
        y = conv(x, w)
        mean = y.mean((0, 1, 2))
        var = (y * y).mean((0, 1, 2)) - mean * mean
        return jax.nn.relu((y - mean) * lax.rsqrt(var + 1e-5) * s + b)

    def timed(fn, *args):
        compiled = jax.jit(fn, compiler_options=options)
        return median_ms(lambda: jax.block_until_ready(compiled(*args)))

    return {"conv forward": timed(conv, x, w),
            "conv forward+backward": timed(lambda x, w, g: jax.vjp(conv, x, w)[1](g), x, w, g),
            "conv input gradient": timed(
                lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g), x, w, g),
            "conv weight gradient": timed(
                lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g), x, w, g),
            "conv+BN+ReLU forward+backward": timed(
                lambda x, w, g: jax.vjp(block, x, w, scale, bias)[1](g), x, w, g)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: all cores)")
    args = parser.parse_args()
    import os

    threads = args.threads or os.cpu_count()
    peer = torch_times(args.batch, args.size, args.channels, threads)
    ours = jax_times(args.batch, args.size, args.channels)
    print(f"batch {args.batch}, {args.size}x{args.size}, {args.channels}->{args.channels} "
          "channels, 3x3 stride 1 (ms)")
    for name in ours:
        print(f"  {name:32s} JAX {ours[name]:8.1f}   PyTorch "
              + (f"{peer[name]:8.1f}" if name in peer else "       -"))


if __name__ == "__main__":
    main()
