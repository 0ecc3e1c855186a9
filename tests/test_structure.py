"""The shape of the code: importing the library has no side effects, packages import only
what is below them, and every config field is declared once and read."""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, xla_flags

NO_SIDE_EFFECTS = r"""
import ctypes, json, os, signal, subprocess, threading
# third-party libraries first: only resnet_jax's own import is watched
import jax, flax, optax, orbax.checkpoint, ml_collections, numpy, tqdm
calls = []
class WatchedCDLL(ctypes.CDLL):
    def __getattr__(self, name):
        calls.append(f"ctypes:{name}")
        return super().__getattr__(name)
ctypes.CDLL = WatchedCDLL
load_library = ctypes.cdll.LoadLibrary
ctypes.cdll.LoadLibrary = lambda path: calls.append(f"load:{path}") or load_library(path)
popen_init = subprocess.Popen.__init__
def watched_popen(self, args, *a, **k):
    calls.append(f"popen:{args}")
    return popen_init(self, args, *a, **k)
subprocess.Popen.__init__ = watched_popen
env = dict(os.environ)
handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
threads = threading.active_count()
import importlib, pkgutil, resnet_jax
names = [m.name for m in pkgutil.walk_packages(resnet_jax.__path__, "resnet_jax.")]
for name in names:
    importlib.import_module(name)
from jax._src import xla_bridge
print(json.dumps({
    "modules": names, "calls": calls, "backends": list(xla_bridge._backends),
    "env_changed": sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)),
    "handlers_changed": handlers != [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)],
    "new_threads": threading.active_count() - threads}))
"""


def test_importing_every_module_starts_no_compiler_and_changes_no_process_setting():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", NO_SIDE_EFFECTS], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert "resnet_jax.training.loop" in seen["modules"] and len(seen["modules"]) > 20
    assert seen["calls"] == []  # no mallopt, no library loaded, no g++ started
    assert seen["backends"] == []  # no XLA client (and so no compiler) created
    assert seen["env_changed"] == [] and not seen["handlers_changed"]
    assert seen["new_threads"] == 0


# --- the import graph -----------------------------------------------------------------------

# What each package may import (besides itself). Lazy imports inside functions count too.
ALLOWED = {
    "resnet_jax.models": set(),
    "resnet_jax.data": set(),
    "resnet_jax.ops": set(),
    "resnet_jax.export": set(),
    "resnet_jax.convert": {"resnet_jax.models"},
    "resnet_jax.training": {"resnet_jax.models", "resnet_jax.data", "resnet_jax.convert",
                            "resnet_jax.ops", "resnet_jax.export"},
    "resnet_jax.configs": {"resnet_jax.training"},
    "resnet_jax": {"resnet_jax.models", "resnet_jax.training", "resnet_jax.configs"},
    "resnet_jax.cli": {"resnet_jax"},
    "benchmarks": {"resnet_jax"},
    "experiments": {"resnet_jax", "benchmarks"},
}


def _package(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "resnet_jax" and len(parts) > 1 and parts[1] in (
            "models", "data", "ops", "convert", "export", "training", "configs", "cli"):
        return ".".join(parts[:2])
    return parts[0]


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict[str, set[str]]:
    """package -> the project packages its modules import."""
    graph: dict[str, set[str]] = {}
    for top in ("resnet_jax", "experiments", "benchmarks"):
        for root, _, files in os.walk(os.path.join(ROOT, top)):
            for name in (n for n in files if n.endswith(".py")):
                path = os.path.join(root, name)
                targets = graph.setdefault(_package(_module_name(path)), set())
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, ast.Import):
                        names = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        names = [node.module]
                    else:
                        continue
                    targets |= {_package(n) for n in names if n.split(".")[0] in TOPS}
    return graph


TOPS = ("resnet_jax", "experiments", "benchmarks")


def _allowed(package: str, target: str) -> bool:
    return target == package or any(target == a or target.startswith(a + ".")
                                    for a in ALLOWED[package])


def test_packages_import_only_what_is_below_them():
    graph = import_graph()
    assert set(graph) <= set(ALLOWED) and "resnet_jax.training" in graph
    for package, targets in graph.items():
        above = sorted(t for t in targets if not _allowed(package, t))
        assert not above, f"{package} imports {above}"


def test_no_import_cycle_between_packages():
    graph = {p: {t for t in ts if t != p} for p, ts in import_graph().items()}
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def _project_module(name: str) -> str | None:
    """`name` as a module file of the project (a package means its __init__), or None."""
    path = os.path.join(ROOT, *name.split("."))
    if os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py")):
        return name
    return None


def module_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports by name (lazy and TYPE_CHECKING imports too;
    `from PACKAGE import NAME` is an import of PACKAGE.NAME when that is a module)."""
    graph: dict[str, set[str]] = {}
    for top in TOPS:
        for root, _, files in os.walk(os.path.join(ROOT, top)):
            for file in (n for n in files if n.endswith(".py")):
                path = os.path.join(root, file)
                module = _module_name(path)
                package = module if file == "__init__.py" else module.rpartition(".")[0]
                targets = graph.setdefault(module, set())
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, ast.Import):
                        found = [_project_module(a.name) for a in node.names]
                    elif isinstance(node, ast.ImportFrom):
                        base = node.module or ""
                        if node.level:
                            parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                            base = ".".join(parent + ([base] if base else []))
                        found = [_project_module(f"{base}.{a.name}") or _project_module(base)
                                 for a in node.names]
                    else:
                        continue
                    targets |= {m for m in found if m and m != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that ends where it starts, or None."""
    visiting, done = [], set()

    def visit(node):
        if node in visiting:
            return visiting[visiting.index(node):] + [node]
        if node in done:
            return None
        visiting.append(node)
        for nxt in sorted(graph.get(node, ())):
            cycle = visit(nxt)
            if cycle:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_no_import_cycle_between_modules():
    graph = module_graph()
    assert "resnet_jax.training.optim" in graph["resnet_jax.training.config"]  # it sees imports
    assert "resnet_jax.models.resnet" in graph["resnet_jax.models"]  # a package's __init__
    assert {"resnet_jax.training.experiment", "resnet_jax.training.loop"} <= graph[
        "resnet_jax.training.run"] | graph["resnet_jax.cli.train"]  # from PACKAGE import MODULE
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


# The training loop reads as one story of short functions: each at most this many lines.
LOOP_FUNCTION_LINES = 30


def test_the_loop_is_one_story_of_short_functions():
    with open(os.path.join(ROOT, "resnet_jax", "training", "loop.py")) as f:
        tree = ast.parse(f.read())
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert "run" in lengths and "_end_period" in lengths  # _Loop's story is seen
    long = {name: n for name, n in lengths.items() if n > LOOP_FUNCTION_LINES}
    assert not long, f"functions of the loop over {LOOP_FUNCTION_LINES} lines: {long}"
    closures = [n.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                for n in ast.walk(f) if isinstance(n, ast.Nonlocal)]
    assert not closures, "state shared through nonlocal: keep it on the loop object"


# --- the config -------------------------------------------------------------------------------

def _sources(*tops: str) -> str:
    text = []
    for top in tops:
        for root, _, files in os.walk(os.path.join(ROOT, top)):
            text += [open(os.path.join(root, n)).read() for n in files if n.endswith(".py")]
    return "\n".join(text)


def test_every_declared_config_field_is_read():
    from resnet_jax.training.config import FIELDS

    config_py = open(os.path.join(ROOT, "resnet_jax", "training", "config.py")).read()
    schema = config_py[config_py.index("SCHEMA: dict"):config_py.index("FIELDS: dict")]
    code = _sources("resnet_jax", "experiments").replace(schema, "")  # reads, not declarations
    unread = [name for name in FIELDS
              if not re.search(rf"(config|\bc)\.{name}\b|[\"']{name}[\"']", code)]
    assert not unread, f"declared but never read: {unread}"


def test_every_config_field_has_a_section_type_and_meaning():
    from resnet_jax.training.config import FIELDS, SCHEMA, base_config, describe

    names = [n for section in SCHEMA.values() for n in section]
    assert len(names) == len(set(names)) == len(FIELDS)  # each field declared once
    assert set(base_config().keys()) == set(FIELDS)
    text = describe()
    assert all(f"[{section}]" in text for section in SCHEMA)
    assert all(f.help for f in FIELDS.values())


@pytest.mark.parametrize("argument, message", [
    ("--config.num_epoch=3", "unknown config field 'num_epoch'; did you mean 'num_epochs'?"),
    ("--config.lerning_rate=0.1", "did you mean 'learning_rate'?"),
])
def test_an_unknown_field_on_the_command_line_is_a_clean_error(tmp_path, argument, message):
    out = subprocess.run([sys.executable, "-m", "experiments.train", "--config",
                          os.path.join(ROOT, "experiments", "configs", "fashion_mnist.py"),
                          "--workdir", str(tmp_path / "run"), argument],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not os.path.exists(tmp_path / "run")


FASHION = os.path.join("experiments", "configs", "fashion_mnist.py")
BAD_INPUTS = {  # name -> (arguments after the module, the message's telling part)
    "config file missing": (["--config", "experiments/configs/fashion_mnst.py"],
                            "--config: config file 'experiments/configs/fashion_mnst.py' not "
                            "found; expected a .py config file, a run's config.json or one of: "
                            "cifar10_resnet110,"),
    "config= file missing": (["--config=nowhere/fm.py"],
                             "--config: config file 'nowhere/fm.py' not found"),
    "config name unknown": (["--config", "fashion_mnst"],
                            "--config: no experiment config named 'fashion_mnst'; known: "
                            "cifar10_resnet110,"),
    "config JSON not an object": (["--config", "{file}.json"],
                                  "a_file.json: expected a JSON object of config fields"),
    "workdir is a file": (["--workdir", "{file}"],
                          "workdir {file} is a file; expected a directory for the run"),
    "workdir inside a file": (["--workdir", "{file}/run"],
                              "workdir {file}/run is inside {file}, which is a file"),
    "misspelt field": (["--config.batchsize=64"], "did you mean 'batch_size'?"),
    "bad value": (["--config.learning_rate=-0.1"], "learning_rate=-0.1 must be a positive"),
    "unknown model": (["--config.model=resnet19"], "unknown model 'resnet19'"),
    "unknown dataset": (["--config.dataset=imagenet21k"], "dataset='imagenet21k'; expected one of"),
    "missing data": (["--config.data_source=idx", "--config.data_dir={empty}"],
                     "no IDX files for 'fashion_mnist' split 'train' in '{empty}'"),
    "indivisible batch": (["--config.parallel=pmap", "--config.batch_size=33"],
                          "batch size 33 does not divide across 2 devices"),
    "missing init_from": (["--config.init_from={empty}/weights"],
                          "init_from='{empty}/weights' holds neither converted weights"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_on_the_command_line_is_one_line_naming_it(tmp_path, case):
    """Each ends before training with exit status 2 and one `error:` line that names the bad
    value and what is expected, no traceback, and no run directory made."""
    arguments, message = BAD_INPUTS[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "a_file.json").write_text("[1, 2]")
    fill = {"{file}": str(tmp_path / "a_file"), "{empty}": str(tmp_path / "empty")}
    for key, value in fill.items():
        arguments = [a.replace(key, value) for a in arguments]
        message = message.replace(key, value)
    given = {a.split("=")[0] for a in arguments}
    args = ([] if given & {"--config"} else ["--config", FASHION])
    args += ([] if "--workdir" in given else ["--workdir", str(tmp_path / "run")]) + arguments
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
    out = subprocess.run([sys.executable, "-m", "experiments.train", *args, "--config.progress_bar=False"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(errors) == 1 and message in errors[0], out.stderr[-3000:]
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_evaluate_on_a_directory_that_holds_no_run_is_one_line_naming_it(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.evaluate", "--workdir", str(tmp_path)],
                         cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(errors) == 1 and str(tmp_path) in errors[0], out.stderr[-3000:]


def test_every_declared_config_field_is_read_outside_the_schema():
    """No field is declared and then ignored: each is read (as `config.NAME` or `c.NAME`)
    by the package or an entry point, not only by the schema itself."""
    import re

    from resnet_jax.training.config import FIELDS

    files = [p for p in glob.glob(os.path.join(ROOT, "resnet_jax", "**", "*.py"), recursive=True)
             + glob.glob(os.path.join(ROOT, "experiments", "*.py"))
             if not p.endswith(os.path.join("training", "config.py"))]
    config_py = open(os.path.join(ROOT, "resnet_jax", "training", "config.py")).read()
    texts = [open(p).read() for p in files] + [config_py[config_py.index("FIELDS: dict"):]]
    unread = [name for name in FIELDS
              if not any(re.search(rf"\b(c|config|self\.config)\.{name}\b", t) for t in texts)]
    assert not unread, f"declared but never read: {unread}"
