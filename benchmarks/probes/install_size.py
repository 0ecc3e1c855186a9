"""What a requirements file adds to the test set-up's environment: the packages it pulls in
that nothing else installed needs, and their size on disk (their RECORD files' sizes).

    .venv/bin/python -m benchmarks.probes.install_size requirements-tracking.txt requirements-export.txt

Run it in the environment `bash experiments/setup.sh test` made (requirements-test.txt,
which names both files, installed).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

OTHERS = ("requirements-core.txt", "requirements.txt", "requirements-bench.txt",
          "requirements-test.txt")


def requirement_names(path: str) -> list[str]:
    """The packages a requirements file names itself (not those of the files it includes)."""
    names = []
    for line in open(path):
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.append(Requirement(line.split(";")[0]).name)
    return names


def closure(names, installed: dict) -> set[str]:
    """`names` and every installed package they need, transitively."""
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen or name not in installed:
            continue
        seen.add(name)
        for text in installed[name].requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


def size(dist) -> int:
    return sum(os.path.getsize(p) for p in (dist.locate_file(f) for f in dist.files or [])
               if os.path.isfile(p))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    installed = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
    base = closure([n for f in OTHERS for n in requirement_names(f)], installed)
    for path in args.files:
        reach = closure(requirement_names(path), installed)
        added = sorted(reach - base)
        print(f"{path}: {len(added)} packages, {sum(size(installed[n]) for n in added) / 1e6:.0f} MB "
              f"beyond the rest of the test set-up ({sum(size(installed[n]) for n in reach) / 1e6:.0f} "
              f"MB with what it shares): {' '.join(added)}")


if __name__ == "__main__":
    main()
