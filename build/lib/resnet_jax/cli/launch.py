"""Start a multi-process (multi-host) training run on this machine, for trying and testing
the multi-host code path on one CPU box.

    python -m experiments.launch --num-processes 2 --devices-per-process 2 -- \
        --config experiments/configs/fashion_mnist.py --workdir DIR --config.parallel=sharded

Each process is the train command (`python -m resnet_jax.cli.train <arguments>`) with JAX's CPU backend forced to
M devices, gloo collectives, and `jax.distributed` pointed at a coordinator on 127.0.0.1.
On a real cluster, start one train command (`resnet-jax-train`) per host instead (see README).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(num_processes: int, devices_per_process: int, train_args: list[str],
           module: str = "resnet_jax.cli.train", timeout: float | None = None) -> int:
    """Run `num_processes` copies of `module`; the exit code is the first non-zero one."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"--num-processes ({num_processes}) and --devices-per-process "
                         f"({devices_per_process}) must be >= 1")
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices_per_process}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    procs = []
    for pid in range(num_processes):
        args = [sys.executable, "-m", module, *train_args,
                f"--config.coordinator_address={address}",
                f"--config.num_processes={num_processes}", f"--config.process_id={pid}"]
        procs.append(subprocess.Popen(args, env=env))
    deadline = None if timeout is None else time.monotonic() + timeout
    codes: list[int | None] = [None] * num_processes
    while any(c is None for c in codes):
        for i, p in enumerate(procs):
            if codes[i] is None:
                codes[i] = p.poll()
        failed = [c for c in codes if c not in (None, 0)]
        if failed or (deadline is not None and time.monotonic() > deadline):
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait()
            return failed[0] if failed else 124
        time.sleep(0.2)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python -m experiments.launch --num-processes N --devices-per-process M "
              "-- <train command arguments>", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=None, help="seconds before giving up")
    args = parser.parse_args(argv[:split])
    return launch(args.num_processes, args.devices_per_process, argv[split + 1:],
                  timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
