"""Run a command pinned to some CPU cores: `python resnet_jax/sweeps/pinned.py 0,1 -- CMD ...`
sets this process's CPU affinity and replaces it with CMD (exec keeps the affinity, and so do
CMD's threads and children). A sweep starts its runs through it instead of forking a process
that has imported JAX to pin the child there."""

from __future__ import annotations

import os
import sys


def command(cores: tuple[int, ...], argv: list[str], python: str = sys.executable) -> list[str]:
    """`argv` run pinned to `cores` (this file run as a script: no package import before
    the exec)."""
    return [python, os.path.abspath(__file__), ",".join(map(str, cores)), "--", *argv]


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python pinned.py CORE,CORE,... -- COMMAND ...")
    try:
        cores = {int(c) for c in argv[0].split(",")}
    except ValueError:
        sys.exit(f"cores {argv[0]!r}: expected comma-separated core numbers, e.g. 0,1")
    os.sched_setaffinity(0, cores)
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
