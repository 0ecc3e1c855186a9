"""resnet_jax as an installed package: the wheel built from this checkout, installed (not
editable) into a fresh virtual environment outside it, works from another directory with no
checkout on the path: a named config, a short training run, `Run.load`, a 2-run sweep (whose
runs are started through the installed package) and its summary, the console scripts."""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from conftest import ROOT
from test_readme import command, readme_commands

TINY = ["--config.train_subset=128", "--config.eval_subset=100", "--config.batch_size=64",
        "--config.eval_batch_size=100", "--config.num_epochs=1", "--config.progress_bar=False"]
USE = textwrap.dedent("""
    import json, os, sys
    import resnet_jax
    from resnet_jax import Run, load_config, sweep

    home = os.path.dirname(resnet_jax.__file__)
    assert os.path.commonpath([home, sys.argv[1]]) == sys.argv[1], home  # the installed copy
    run = Run.load("runs/fm")  # trained by the installed command
    tiny = dict(train_subset=128, eval_subset=100, batch_size=64, eval_batch_size=100,
                num_epochs=1, progress_bar=False)
    swept = sweep(load_config("fashion_mnist", **tiny), "grid", {"learning_rate": [0.1, 0.2]},
                  seeds=1, progress=False)
    print(json.dumps({"configs": resnet_jax.configs.config_names(), "model": run.config.model,
                      "accuracy": run.selected["test_accuracy"],
                      "finished": [r.name for r in swept.runs if r.selected],
                      "rows": len(swept.table)}))
""")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, site-packages) of a fresh venv holding the wheel; the dependencies are the
    test environment's, seen through a .pth line (their own .pth files, this checkout's
    editable finder among them, are not read)."""
    where = tmp_path_factory.mktemp("package")
    source = where / "source"  # a copy: the build's own files stay out of the checkout
    shutil.copytree(os.path.join(ROOT, "resnet_jax"), source / "resnet_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    venv = where / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv",
                    "--without-pip", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = subprocess.run([python, "-c", purelib], capture_output=True, text=True,
                          check=True).stdout.strip()
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    # the README's `pip install .` (built, then installed: not editable), by this pip into
    # the new environment, its dependencies being there already
    pip_install = shlex.split(command("pip install ."), comments=True)
    assert pip_install[:3] == ["pip", "install", "."]
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install",
                              *pip_install[2:], "--no-deps", "--no-build-isolation"],
                             cwd=source, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    return python, site, venv


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return dict(env, JAX_PLATFORMS="cpu")


@pytest.mark.slow  # a wheel build, a venv, a run and a 2-run sweep from the installed package
def test_the_installed_package_trains_loads_and_sweeps_from_another_directory(installed,
                                                                            tmp_path):
    python, site, venv = installed
    env = dict(_env(), PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}")
    train = subprocess.run(shlex.split(command("resnet-jax-train --config fashion_mnist"),
                                       comments=True) + TINY,
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    out = subprocess.run([python, "-c", USE, site], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert "fashion_mnist" in seen["configs"] and "common" not in seen["configs"]
    assert seen["model"] == "fashion_mnist_resnet8" and 0.0 < seen["accuracy"] <= 1.0
    assert len(seen["finished"]) == 2 and seen["rows"] == 2
    # the sweep's runs were the installed train command, given the sweep's config.json
    log = open(glob.glob(str(tmp_path / "grid" / "logs" / "*.log"))[0]).read()
    assert "-m resnet_jax.cli.train --config" in log and "grid/config.json" in log
    assert not glob.glob(str(tmp_path / "grid" / "*.py"))  # no generated Python
    # a run's config.json starts that run again: the same config, the same numbers
    again = subprocess.run(shlex.split(command("resnet-jax-train --config runs/fm/config.json"),
                                       comments=True),
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = tmp_path / "runs"
    assert json.load(open(runs / "fm_again" / "config.json")) == json.load(
        open(runs / "fm" / "config.json"))
    with open(runs / "fm" / "metrics.jsonl") as a, open(runs / "fm_again" / "metrics.jsonl") as b:
        records = [[(r["train_loss"], r["test_accuracy"]) for r in map(json.loads, f)]
                   for f in (a, b)]
    assert records[0] == records[1] and records[0]


def test_the_installed_commands_and_configs_need_no_checkout(installed, tmp_path):
    python, site, venv = installed
    scripts = sorted(os.path.basename(p) for p in glob.glob(str(venv / "bin" / "resnet-jax-*")))
    assert scripts == ["resnet-jax-compare", "resnet-jax-convert", "resnet-jax-evaluate",
                       "resnet-jax-export", "resnet-jax-launch", "resnet-jax-plot", "resnet-jax-summary",
                       "resnet-jax-sweep", "resnet-jax-train"]
    out = subprocess.run([str(venv / "bin" / "resnet-jax-train"), "--config", "fashion_mnst",
                          "--workdir", "x"], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "no experiment config named 'fashion_mnst'" in out.stderr
    files = subprocess.run([python, "-c", "import importlib.metadata as m; print('\\n'.join("
                            "str(f) for f in m.files('resnet_jax')))"], cwd=tmp_path,
                           env=_env(), capture_output=True, text=True, check=True).stdout
    assert "resnet_jax/configs/fashion_mnist.py" in files
    assert "resnet_jax/ops/native/dnnl_conv.cc" in files and ".so" not in files
    assert "tests/" not in files and "experiments/" not in files


def test_the_readme_extras_are_the_packages_with_the_pinned_jax_of_each_accelerator():
    """Each `pip install ".[EXTRA]"` of the README names an extra of pyproject.toml; an
    accelerator's extra allows the jax its pinned requirement file installs, and oneDNN's
    is requirements.txt's pin."""
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"][
        "optional-dependencies"]
    named = [re.search(r'"\.\[(\w+)\]"', c)[1] for c in readme_commands()
             if c.startswith('pip install ".[')]
    assert named == ["cuda13", "onednn", "convert", "tracking"] and set(named) <= set(extras)
    for accelerator in ("cuda12", "cuda13", "tpu"):
        (jax,) = [Requirement(r) for r in extras[accelerator]]
        path = os.path.join(ROOT, f"requirements-{accelerator}.txt")
        pinned = [Requirement(line.strip()) for line in open(path) if line.startswith("jax[")]
        assert jax.name == "jax" and jax.extras == {accelerator} == pinned[0].extras
        assert jax.specifier.contains(next(iter(pinned[0].specifier)).version)
    cpu_pins = open(os.path.join(ROOT, "requirements.txt")).read()
    assert all(r.split(";")[0] in cpu_pins for r in extras["onednn"])
    for extra in ("tracking", "export"):  # the same packages as the pinned files, which fit
        path = os.path.join(ROOT, f"requirements-{extra}.txt")
        pinned = {r.name: r for r in (Requirement(line.strip()) for line in open(path)
                                      if line.strip() and not line.startswith("#"))}
        wanted = [Requirement(r) for r in extras[extra]]
        assert sorted(r.name for r in wanted) == sorted(pinned)
        assert all(r.specifier.contains(next(iter(pinned[r.name].specifier)).version)
                   for r in wanted)
