"""How oneDNN's calls inside a train step compare with the same calls at their best, and what
cold operands cost one call: where the in-step stretch of docs/cpu_speed_log.md comes from.

    python -m benchmarks.probes.in_step_calls --model cifar_resnet56
    python -m benchmarks.probes.in_step_calls --cold --batch 128 --size 32 --channels 16

`--model`: the speed suite's JAX train and eval steps in a fresh process with
`ONEDNN_VERBOSE=1`; per primitive and shape, the calls and their milliseconds per train step
and eval step together ("per step" below), the fastest and the median call, and the excess
of all calls over the fastest one (ms per step).
`--cold`: one 3x3 convolution forward, resnet_jax's (oneDNN through XLA) and PyTorch's
(channels-last), with operands that stay in cache ("hot") against 24 inputs in turn
("cold_in"), 24 outputs kept alive ("cold_out") or both; median ms. The cold-output side of
PyTorch allocates each output anew (its CPU allocator keeps no cache), so it pays page faults
that XLA's retained heap does not.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

MODES = ("hot", "cold_out", "cold_in", "cold_both")


def parse(lines) -> dict[tuple[str, str, str, str], list[float]]:
    """ONEDNN_VERBOSE's exec lines -> {(primitive, implementation, propagation, shape): ms}."""
    calls = collections.defaultdict(list)
    for line in lines:
        if line.startswith("onednn_verbose,") and ",exec,cpu," in line:
            f = line.strip().split(",")
            calls[(f[3], f[4], f[5], f[-2])].append(float(f[-1]))
    return dict(calls)


def table(calls, steps: int) -> list[dict]:
    """Rows per primitive and shape, ms per step, the largest share first."""
    rows = [{"primitive": k[0], "implementation": k[1], "propagation": k[2], "shape": k[3],
             "calls_per_step": len(v) / steps, "ms_per_step": sum(v) / steps,
             "fastest_ms": min(v), "median_ms": statistics.median(v),
             "excess_ms_per_step": (sum(v) - min(v) * len(v)) / steps}
            for k, v in calls.items()]
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def verbose_run(model: str, repeats: int, warmup: int) -> list[str]:
    """The lines the speed suite's JAX worker prints for `model` under ONEDNN_VERBOSE=1."""
    from benchmarks.speed_suite import worker_output

    return worker_output("jax", model, repeats, warmup, os.cpu_count(),
                         {"ONEDNN_VERBOSE": "1"}).splitlines()


def _median_ms(call, operands, keep: bool, n: int = 48) -> float:
    kept, times = [], []
    for i in range(n):
        start = time.perf_counter()
        y = call(operands[i % len(operands)])
        times.append(time.perf_counter() - start)
        if keep:
            kept = (kept + [y])[-24:]
    return statistics.median(times[4:]) * 1e3


def cold_operands(batch: int, size: int, channels: int) -> dict[str, dict[str, float]]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from resnet_jax.ops import dnnl_conv

    if not dnnl_conv.available():
        raise SystemExit("oneDNN's FFI library is not available here")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, channels)).astype(np.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, channels, channels)).astype(np.float32))
    conv = jax.jit(lambda x: dnnl_conv.conv(x, w, (1, 1), ((1, 1), (1, 1))))
    xs = [jnp.asarray(x + i) for i in range(24)]
    jax_call = lambda x: conv(x).block_until_ready()  # noqa: E731
    torch.set_num_threads(os.cpu_count())
    cl = torch.channels_last
    tconv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=cl)
    ts = [torch.from_numpy(x + i).permute(0, 3, 1, 2) for i in range(24)]  # NHWC in memory

    def torch_call(x):
        with torch.no_grad():
            return tconv(x)

    out = {}
    for side, call, many in (("resnet_jax", jax_call, xs), ("torch", torch_call, ts)):
        call(many[0])
        out[side] = {mode: _median_ms(call, many if mode in ("cold_in", "cold_both")
                                      else many[:1], keep=mode in ("cold_out", "cold_both"))
                     for mode in MODES}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a speed-suite model: its step's oneDNN calls")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--cold", action="store_true", help="one convolution, cold operands")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.model and not args.cold:
        parser.error("give --model MODEL, --cold or both")
    if args.model:
        # the first, the warm-up and the timed train steps, then as many eval steps: "a step"
        # is one of each
        steps = 1 + args.warmup + args.repeats
        rows = table(parse(verbose_run(args.model, args.repeats, args.warmup)), steps)
        total = sum(r["ms_per_step"] for r in rows)
        excess = sum(r["excess_ms_per_step"] for r in rows)
        print(f"{args.model}: {total:.1f} ms of oneDNN calls per train step and eval step "
              f"together, {excess:.1f} of them above each call's fastest")
        print("| primitive | propagation | shape | calls/step | ms/step | fastest | median | "
              "excess ms/step |\n|---|---|---|---|---|---|---|---|")
        for r in rows[:args.top]:
            print(f"| {r['primitive']} ({r['implementation']}) | {r['propagation']} | "
                  f"{r['shape']} | {r['calls_per_step']:g} | {r['ms_per_step']:.2f} | "
                  f"{r['fastest_ms']:.3f} | {r['median_ms']:.3f} | "
                  f"{r['excess_ms_per_step']:.2f} |")
    if args.cold:
        from resnet_jax.ops import heap

        heap.retain_freed_memory()  # as the entry points do, before jax's CPU client starts
        for r in range(args.rounds):
            print(f"round {r}:", {side: {m: round(v, 3) for m, v in modes.items()} for side, modes
                                  in cold_operands(args.batch, args.size, args.channels).items()},
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
