"""docs/ARCHITECTURE.md matches the code: every module of the package has its row (an
experiment config excepted: resnet_jax/configs/ holds one file per experiment), and every
module a row names exists."""

from __future__ import annotations

import os
import re

from conftest import ROOT


def test_architecture_names_every_module_and_only_modules_that_exist():
    text = open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")).read()
    rows = set(re.findall(r"^\| `([a-z_/]+\.py)` \|", text, flags=re.M))
    package = os.path.join(ROOT, "resnet_jax")
    modules = set()
    for root, _, files in os.walk(package):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), package)
            if name.endswith(".py") and (name != "__init__.py" or rel.count(os.sep) == 1):
                modules.add(rel)
    experiments = {m for m in modules if m.startswith("configs" + os.sep)
                   and m not in ("configs/__init__.py", "configs/common.py")}
    modules -= experiments | {"training/__init__.py", "data/__init__.py", "ops/__init__.py",
                              "convert/__init__.py", "cli/__init__.py"}
    assert len(modules) > 60
    assert sorted(modules - rows) == [], "modules without a row in ARCHITECTURE.md"
    assert sorted(rows - modules) == [], "rows of ARCHITECTURE.md naming no module"
