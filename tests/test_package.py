"""resnet_jax as an installed package: the wheel built from this checkout, installed (not
editable) into a fresh virtual environment outside it, works from another directory with no
checkout on the path: a named config, a short training run, `Run.load`, a 2-run sweep (whose
runs are started through the installed package) and its summary, the console scripts."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

from conftest import ROOT

USE = textwrap.dedent("""
    import json, os, sys
    import resnet_jax
    from resnet_jax import Run, load_config, sweep

    home = os.path.dirname(resnet_jax.__file__)
    assert os.path.commonpath([home, sys.argv[1]]) == sys.argv[1], home  # the installed copy
    tiny = dict(train_subset=128, eval_subset=100, batch_size=64, eval_batch_size=100,
                num_epochs=1, progress_bar=False)
    config = load_config("fashion_mnist", **tiny)
    record = resnet_jax.train(config, "run")
    run = Run.load("run")
    swept = sweep(load_config("fashion_mnist", **tiny), "grid", {"learning_rate": [0.1, 0.2]},
                  seeds=1, progress=False)
    print(json.dumps({"configs": resnet_jax.configs.config_names(),
                      "accuracy": record["test_accuracy"], "model": run.config.model,
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
    wheels = where / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    wheel, = glob.glob(str(wheels / "resnet_jax-*.whl"))
    venv = where / "venv"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv",
                    "--without-pip", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install",
                              "--no-deps", "--no-index", wheel],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    return python, site, venv


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return dict(env, JAX_PLATFORMS="cpu")


@pytest.mark.slow  # a wheel build, a venv, a run and a 2-run sweep from the installed package
def test_the_installed_package_trains_loads_and_sweeps_from_another_directory(installed,
                                                                            tmp_path):
    python, site, _ = installed
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
    # a run's config.json starts that run again (here: a new run of the same config)
    again = subprocess.run([os.path.join(os.path.dirname(python), "resnet-jax-train"),
                            "--config", str(tmp_path / "run" / "config.json"),
                            "--workdir", str(tmp_path / "again")],
                           cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    first = json.load(open(tmp_path / "run" / "config.json"))
    assert json.load(open(tmp_path / "again" / "config.json")) == first
    with open(tmp_path / "run" / "metrics.jsonl") as a, open(tmp_path / "again" / "metrics.jsonl") as b:
        losses = [[r.get("train_loss") for r in map(json.loads, f)] for f in (a, b)]
    assert losses[0] == losses[1]  # the same run, step for step


def test_the_installed_commands_and_configs_need_no_checkout(installed, tmp_path):
    python, site, venv = installed
    scripts = sorted(os.path.basename(p) for p in glob.glob(str(venv / "bin" / "resnet-jax-*")))
    assert scripts == ["resnet-jax-compare", "resnet-jax-convert", "resnet-jax-evaluate",
                       "resnet-jax-launch", "resnet-jax-plot", "resnet-jax-summary",
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
