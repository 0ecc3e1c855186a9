"""Every command line of the README runs here, on tiny data, so the documentation cannot drift
from the code: the multi-GPU command on 8 forced CPU devices, the SLURM one as two processes
of 8 (16 devices) with SLURM's environment on the loopback address. Sizes are shrunk by
appending `--config.*` overrides (or a benchmark's size flags); nothing of the command itself
is dropped. The set of commands is checked too: a new README command needs a test here."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, xla_flags

README = os.path.join(ROOT, "README.md")
TINY_TRAIN = ["--config.train_subset=512", "--config.eval_subset=200", "--config.num_epochs=1",
              "--config.progress_bar=False"]
# ImageNet-layout configs on 32x32 crops, one block per stage, two steps
TINY_IMAGENET = ["--config.image_size=32", "--config.num_steps=2", "--config.train_subset=64",
                 "--config.eval_subset=16", "--config.progress_bar=False",
                 "--config.model_overrides={'stage_sizes':(1,1,1,1)}"]


def readme_commands() -> list[str]:
    """The README's shell commands: each line of a ```bash block, continuations joined."""
    text = open(README).read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        commands += [" ".join(line.split()) for line in joined.splitlines() if line.strip()]
    return commands


def command(start: str) -> str:
    """The one README command that starts with `start`."""
    found = [c for c in readme_commands() if c.startswith(start)]
    assert len(found) == 1, f"README commands starting {start!r}: {found}"
    return found[0]


def argv(cmd: str, **substitute: str) -> list[str]:
    """A command's arguments with the interpreter as this one's and placeholders filled."""
    for key, value in substitute.items():
        cmd = cmd.replace(key, value)
    args = shlex.split(cmd)
    if args[0] in (".venv/bin/python", "python"):
        args[0] = sys.executable
    return args


def run(args: list[str], cwd: str = ROOT, devices: int = 1, env: dict | None = None,
        timeout: int = 600) -> str:
    full = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
                XLA_FLAGS=xla_flags(devices), **(env or {}))
    result = subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        pytest.fail(failure_report(args, result), pytrace=False)
    return result.stdout


def failure_report(args: list[str], result: subprocess.CompletedProcess) -> str:
    """A failed command in a few lines that survive a log's tail: the command, its exit code
    and the last traceback (or the last lines) of its stderr, then the last lines of stdout."""
    err = result.stderr.splitlines()
    start = max((i for i, line in enumerate(err) if line.startswith("Traceback")), default=None)
    shown = err[start:][:40] if start is not None else err[-25:]
    return "\n".join([f"exit {result.returncode}: {shlex.join(args)}", "--- stderr ---", *shown,
                      "--- stdout (last 10 lines) ---", *result.stdout.splitlines()[-10:]])


COVERED = {  # the start of each README command -> the test that runs it
    "bash experiments/setup.sh && .venv/bin/python -m experiments.train": "main_job",
    "bash experiments/setup.sh test && .venv/bin/python -m pytest": "test_command",
    ".venv/bin/python -m experiments.summary": "summary",
    ".venv/bin/python -m experiments.train --config experiments/configs/NAME.py": "train_evaluate",
    ".venv/bin/python -m experiments.evaluate": "train_evaluate",
    ".venv/bin/python -m experiments.train --config experiments/configs/cifar10_resnet20.py "
    "--workdir runs/mine": "image_folder",
    "python -m experiments.train --config experiments/configs/imagenet_resnet50.py "
    "--workdir runs/r50": "multi_gpu",
    "srun": "slurm",
    "python -m experiments.launch": "launch",
    "python -m experiments.benchmark --model": "scaling",
    ".venv/bin/python -m experiments.convert_weights --source": "transfer",
    ".venv/bin/python -m experiments.train --config experiments/configs/transfer_resnet50.py "
    "--workdir runs/transfer": "transfer",
    ".venv/bin/python -m experiments.convert_weights --from timm": "transfer",
    ".venv/bin/python -m experiments.train --config experiments/configs/transfer_resnet50.py "
    "--workdir runs/a1": "transfer",
    ".venv/bin/pip install -r requirements-bench.txt": "against_torch",
    ".venv/bin/python -m experiments.benchmark --against user": "against_user",
    "bash experiments/setup.sh tf": "input_pipeline",
    ".venv/bin/python -m experiments.train --config experiments/configs/fashion_mnist_best.py":
        "best_and_plot",
    ".venv/bin/python -m experiments.plot_runs": "best_and_plot",
    "ACCELERATOR=": "accelerator_installs",
    ".venv/bin/python -m experiments.benchmark --accelerator": "accelerator",
    # tests/test_package.py runs these (the package installed into a fresh environment)
    "pip install .": "test_package: installed",
    'pip install ".[': "test_package: extras",
    "resnet-jax-train --config": "test_package: trains",
    # tests/test_sweep.py runs these (its fixtures are built from them)
    ".venv/bin/python -m experiments.sweep --config experiments/configs/fashion_mnist.py "
    "--workdir runs/fashion_mnist_seeds": "test_sweep: slurm",
    ".venv/bin/python -m experiments.sweep --config experiments/configs/fashion_mnist.py "
    "--workdir runs/lr": "test_sweep: swept",
    ".venv/bin/python -m experiments.compare": "test_sweep: compare",
    # tests/test_population.py runs these
    ".venv/bin/python -m experiments.train --config experiments/configs/fashion_mnist.py "
    "--workdir runs/population_fm": "test_population: members",
    ".venv/bin/python -m experiments.sweep --config experiments/configs/fashion_mnist.py "
    "--workdir runs/population_lr": "test_population: members",
    # tests/test_tracking.py and tests/test_api.py run these
    ".venv/bin/pip install -r requirements-tracking.txt": "test_tracking: installed",
    ".venv/bin/python -m experiments.train --config experiments/configs/fashion_mnist.py "
    "--workdir runs/tracked": "test_tracking: tracked",
    ".venv/bin/python -m experiments.export --workdir runs/fashion_mnist --out "
    "runs/fashion_mnist/serving": "test_api: export command",
    ".venv/bin/python -m experiments.export --workdir runs/fashion_mnist --out "
    "runs/fashion_mnist/stablehlo": "test_api: export command",
}


def test_every_readme_command_is_run_by_a_test_here():
    commands = readme_commands()
    unmatched = [c for c in commands if not any(c.startswith(k) for k in COVERED)]
    assert not unmatched, f"README commands no test runs: {unmatched}"
    stale = [k for k in COVERED if not any(c.startswith(k) for c in commands)]
    assert not stale, f"tests for commands the README no longer has: {stale}"
    assert len(commands) == 39


def test_command_is_what_ci_runs():
    """The README's test command is .ci/run's (which CI runs on a fresh clone), and its
    set-up is the main job's set-up plus the test requirements."""
    cmd = command("bash experiments/setup.sh test && ")
    assert cmd in open(os.path.join(ROOT, ".ci", "run")).read()
    assert command("bash experiments/setup.sh && ").startswith("bash experiments/setup.sh && ")


@pytest.fixture(scope="module")
def main_job_run(tmp_path_factory) -> tuple[str, str]:
    """The main job's command on tiny data: its run directory and what it printed."""
    cmd = command("bash experiments/setup.sh && ").split(" && ", 1)[1]
    workdir = str(tmp_path_factory.mktemp("main_job") / "fm")
    return workdir, run(argv(cmd, **{"runs/fashion_mnist": workdir}) + TINY_TRAIN)


BEST = ".venv/bin/python -m experiments.train --config experiments/configs/fashion_mnist_best.py"


@pytest.fixture(scope="module")
def best_run(tmp_path_factory) -> str:
    """fashion_mnist_best's command on tiny data, with 5% of it held out for validation."""
    workdir = str(tmp_path_factory.mktemp("best") / "run")
    run(argv(command(BEST), **{"runs/fashion_mnist_best": workdir}) + TINY_TRAIN
        + ["--config.validation_split=0.05"])
    return workdir


def test_main_job(main_job_run):
    workdir, out = main_job_run
    assert "final: step 4 test_accuracy" in out
    assert os.path.exists(os.path.join(workdir, "selected.json"))


def test_best_and_plot(tmp_path, main_job_run, best_run):
    """The two runs of the plot are the main job's and fashion_mnist_best's (the fixtures
    ran their README commands)."""
    runs = {"runs/fashion_mnist_best": best_run, "runs/fashion_mnist": main_job_run[0]}
    assert os.path.exists(os.path.join(best_run, "selected.json"))
    plot = command(".venv/bin/python -m experiments.plot_runs")
    plot = plot.replace("fashion_mnist_time.png", str(tmp_path / "time.png"))
    run(argv(plot.replace("runs/fashion_mnist_best", runs["runs/fashion_mnist_best"])
             .replace("=runs/fashion_mnist\"", "=" + runs["runs/fashion_mnist"] + "\"")))
    assert os.path.getsize(tmp_path / "time.png") > 10_000


def test_summary():
    out = run(argv(command(".venv/bin/python -m experiments.summary")))
    assert "25,557,032" in out


def test_train_evaluate(best_run):
    """The generic training command with NAME=fashion_mnist_best is fashion_mnist_best's own
    command, so its run is the one `best_run` made; every evaluate option reads it."""
    workdir = best_run
    train = command(".venv/bin/python -m experiments.train --config experiments/configs/NAME.py")
    args = argv(train.replace(" [--config.field=value ...]", ""),
                NAME="fashion_mnist_best", DIR=workdir)
    assert args == argv(command(BEST), **{"runs/fashion_mnist_best": workdir})
    evaluate = command(".venv/bin/python -m experiments.evaluate")
    base = argv(evaluate.split(" [")[0], DIR=workdir)
    options = re.findall(r"\[(--[a-z]+)(?: ([A-Za-z|]+))?\]", evaluate)
    assert [o[0] for o in options] == ["--split", "--checkpoint", "--ema", "--shift"]
    base += ["--subset", "300"]  # 300 examples of each split, sampled across the classes
    # the split and weight choices without the shifted views (five times the passes to compile)
    plain = base + ["--shift", "0"]
    for split in options[0][1].split("|"):
        assert json.loads(run(plain + ["--split", split]))["split"] == split
    with open(os.path.join(workdir, "selected.json")) as f:
        chosen = json.load(f)["weights"]  # fashion_mnist_best keeps the trained or EMA weights
    for which in options[1][1].split("|"):
        result = json.loads(run(plain + ["--checkpoint", which]))
        # the latest checkpoint is read as its trained weights
        assert result["weights"] == ("trained" if which == "latest" else chosen)
    assert json.loads(run(plain + ["--checkpoint", "latest", "--ema"]))["weights"] == "ema"
    default = json.loads(run(base))
    assert default["split_is"] == "test"
    # the same weights without the shifted test-time views that fashion_mnist_best's run has
    unmoved = json.loads(run(base + ["--shift", "0"]))
    assert (default["shift"], unmoved["shift"]) == (1, 0)
    assert unmoved["loss"] != default["loss"]


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    """imagenet2012 in tfds' ArrayRecord format, from JPEGs of real photographs."""
    from benchmarks.jpeg_folder import photographs, variant
    from resnet_jax.data.tfds_offline import jpeg_bytes, prepare

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    photos = photographs()[:4]
    rng = np.random.default_rng(0)

    def split(n):
        return [{"image": jpeg_bytes(variant(photos[k % 4], rng)), "label": k % 4,
                 "file_name": f"n{k}.JPEG"} for k in range(n)]

    data = {"train": split(96), "validation": split(24)}
    prepare("imagenet2012", {s: (lambda s=s: data[s]) for s in data}, data_dir)
    return data_dir


def test_image_folder(tmp_path):
    """The README's command on a CIFAR-style folder, as it is (no size given), one epoch."""
    from benchmarks.user_folders import write_folder

    folder = write_folder(str(tmp_path / "images"), train=256, val=64, size=32)
    cmd = command(".venv/bin/python -m experiments.train --config "
                  "experiments/configs/cifar10_resnet20.py --workdir runs/mine")
    run(argv(cmd, DIR=folder, **{"runs/mine": str(tmp_path / "mine")})
        + ["--config.num_epochs=1", "--config.batch_size=32", "--config.progress_bar=False"])
    config = json.load(open(tmp_path / "mine" / "config.json"))
    assert (config["image_size"], config["augment"], config["num_steps"]) == (32, "crop_flip", 0)
    assert json.load(open(tmp_path / "mine" / "selected.json"))["test_count"] == 64


def test_multi_gpu_on_8_devices(tmp_path, imagenet_dir):
    cmd = command("python -m experiments.train --config experiments/configs/imagenet_resnet50.py "
                  "--workdir runs/r50")
    run(argv(cmd, **{"/data/tfds": imagenet_dir, "runs/r50": str(tmp_path / "r50")})
        + TINY_IMAGENET + ["--config.batch_size=16"], devices=8)
    record = json.loads(open(tmp_path / "r50" / "metrics.jsonl").readlines()[-1])
    assert record["step"] == 2 and record["test_count"] == 16


@pytest.mark.slow
def test_slurm_on_two_processes_of_8_devices(tmp_path, imagenet_dir):
    """srun's environment for 2 tasks on 2 nodes, the node list on the loopback address;
    jax.distributed finds the cluster from it (config.distributed=True)."""
    cmd = command("srun")
    args = argv(cmd.split(" python ", 1)[1].join(["python ", ""]),
                **{"/shared/runs/r50": str(tmp_path / "r50")})
    args += TINY_IMAGENET + ["--config.batch_size=32"]
    job = str(4000 + os.getpid() % 90)  # the coordinator port derives from the job id
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TFDS_DATA_DIR=imagenet_dir,
                   XLA_FLAGS=xla_flags(8),
                   SLURM_JOB_ID=job, SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
                   SLURM_PROCID=str(rank), SLURM_LOCALID="0", SLURM_STEP_NUM_NODES="2")
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    record = json.loads(open(tmp_path / "r50" / "metrics.jsonl").readlines()[-1])
    assert record["step"] == 2 and record["test_count"] == 16


def test_launch(tmp_path):
    cmd = command("python -m experiments.launch")
    run(argv(cmd, **{"runs/mp": str(tmp_path / "mp")}) + TINY_TRAIN
        + ["--config.batch_size=64"])
    assert os.path.exists(tmp_path / "mp" / "selected.json")


def test_scaling(tmp_path):
    """The scaling benchmark, on forced CPU devices instead of GPUs."""
    cmd = command("python -m experiments.benchmark --model")
    args = argv(cmd.replace("--platform gpu", "--platform cpu"))
    out = str(tmp_path / "scaling.json")
    run(args + ["--steps", "2", "--warmup", "1", "--batch-per-device", "8", "--output", out])
    assert [r["devices"] for r in json.load(open(out))] == [1, 2, 4]


@pytest.mark.slow
@pytest.mark.torch
def test_transfer(tmp_path):
    """The README names torchvision's published ResNet-50 file, which is not here (no
    network): a randomly initialised ResNet-50 under that name is refused by its hash, as it
    must be, and converted under another name; the fine-tuning command then starts from it."""
    from resnet_jax.convert.files import KNOWN_FILES

    convert = command(".venv/bin/python -m experiments.convert_weights --source")
    pth = re.search(r"--input (\S+)", convert).group(1)
    assert pth in KNOWN_FILES
    import torch

    from resnet_jax.convert.torchvision import torchvision_models

    torch.save(torchvision_models().resnet50().state_dict(), str(tmp_path / pth))
    refused = subprocess.run(argv(convert), cwd=str(tmp_path), capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert refused.returncode == 2 and "is not the published" in refused.stderr
    os.rename(tmp_path / pth, tmp_path / "stand-in.pth")
    run(argv(convert.replace(pth, "stand-in.pth")), cwd=str(tmp_path))
    train = command(".venv/bin/python -m experiments.train --config "
                    "experiments/configs/transfer_resnet50.py --workdir runs/transfer")
    train = train.replace("experiments/configs", os.path.join(ROOT, "experiments", "configs"))
    tiny = TINY_TRAIN[:3] + ["--config.num_steps=2", "--config.batch_size=16",
                             "--config.progress_bar=False"]
    run(argv(train) + tiny, cwd=str(tmp_path))
    saved = json.load(open(tmp_path / "runs" / "transfer" / "config.json"))
    assert tuple(saved["input_mean"]) == (0.485, 0.456, 0.406)

    # timm's weights from a local Hugging Face cache: a random timm ResNet-50 saved by timm
    # under the name the README gives, with resnet50.a1_in1k's preprocessing (its mean and
    # std are torchvision's: the same compiled steps as above, from the compilation cache)
    from test_timm import hub_entry, timm_package

    model = timm_package().create_model("resnet50", pretrained=False)
    hub = str(tmp_path / "hub")
    hub_entry(hub, "timm/resnet50.a1_in1k", model, {"interpolation": "bicubic", "crop_pct": 0.95})
    env = {"HF_HUB_CACHE": hub}
    timm_train = command(".venv/bin/python -m experiments.train --config "
                         "experiments/configs/transfer_resnet50.py --workdir runs/a1")
    timm_train = timm_train.replace("experiments/configs",
                                    os.path.join(ROOT, "experiments", "configs"))
    run(argv(timm_train) + tiny, cwd=str(tmp_path), env=env)
    saved = json.load(open(tmp_path / "runs" / "a1" / "config.json"))
    assert tuple(saved["input_mean"]) == (0.485, 0.456, 0.406)
    assert saved["eval_crop_pct"] == 0.95 and saved["interpolation"] == "bicubic"
    run(argv(command(".venv/bin/python -m experiments.convert_weights --from timm")),
        cwd=str(tmp_path), env=env)
    info = json.load(open(tmp_path / "weights" / "resnet50_a1" / "conversion.json"))
    assert info["model"] == "resnet50" and info["params"] == 25_557_032
    missing = subprocess.run(argv(timm_train), cwd=str(tmp_path), capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
                                      HF_HUB_CACHE=str(tmp_path / "empty")))
    assert missing.returncode != 0
    assert "hf download timm/resnet50.a1_in1k" in missing.stderr.splitlines()[-1]


@pytest.mark.torch
def test_against_torch(tmp_path):
    *pips, bench = command(".venv/bin/pip install -r requirements-bench.txt").split(" && ")
    for pip in pips:
        run([sys.executable, "-m", "pip", *shlex.split(pip)[1:]])
    # the suite's smallest model, one round: JSON and table written, equal parameter counts,
    # ratio = resnet_jax / peer throughput
    run(argv(bench) + ["--models", "mnist_preact_resnet", "--repeats", "1", "--rounds", "1",
                       "--results-dir", str(tmp_path)])
    data = json.loads((tmp_path / "cpu_vs_torch.json").read_text())
    (row,) = data["rows"]
    assert row["jax"]["params"] == row["torch"]["params"] == row["keras"]["params"] == 182_626
    for peer in ("torch", "keras"):
        ratio = row["jax"]["train_images_per_s"] / row[peer]["train_images_per_s"]
        assert row["ratios"][peer]["train"] == pytest.approx(ratio)
        assert row["ratios"][peer]["train_rounds"] == [row["ratios"][peer]["train"]]
    assert row["train_ratio"] == row["ratios"]["torch"]["train"]
    assert data["meta"]["cpu_family"] and data["meta"]["keras_hub"]
    table = (tmp_path / "cpu_vs_torch.md").read_text()
    assert "| mnist_preact_resnet | 32 | 182,626 |" in table
    assert "ratio against torch: geometric mean" in table
    assert "ratio against Keras: geometric mean" in table


def test_against_user(tmp_path):
    """A train step written outside the library (`ops.cpu.layers()`, `jit_options()`) against
    the engine's: both sides written, side by side, with their ratio."""
    run(argv(command(".venv/bin/python -m experiments.benchmark --against user"))
        + ["--models", "cifar_resnet20", "--repeats", "1", "--rounds", "1", "--results-dir",
           str(tmp_path)])
    data = json.loads((tmp_path / "user_vs_engine.json").read_text())
    (row,) = data["rows"]
    assert row["user"]["params"] == row["jax"]["params"] == 269_722
    ratio = row["user"]["train_images_per_s"] / row["jax"]["train_images_per_s"]
    assert row["train_ratio"] == pytest.approx(ratio)
    table = (tmp_path / "user_vs_engine.md").read_text()
    assert "| cifar_resnet20 | 128 | 269,722 |" in table and "ratio = user / engine" in table


@pytest.mark.slow
def test_input_pipeline(tmp_path):
    """TensorFlow in .venv-tf (the set-up installs it when missing), then the benchmark on a
    small folder."""
    setup, bench = command("bash experiments/setup.sh tf").split(" && ")
    subprocess.run(shlex.split(setup), cwd=ROOT, check=True, capture_output=True, timeout=1200)
    out = run(argv(bench) + ["--images", "300", "--batches", "1", "--workers", "1",
                             "--folder", str(tmp_path / "jpegs"), "--rounds", "1",
                             "--results-dir", str(tmp_path / "results")])
    assert "tf.data" in out
    rows = json.load(open(tmp_path / "results" / "input_pipeline.json"))
    assert {r["transform"] for r in rows} == {"train", "eval", "feeder"}
    assert all(r["resnet_jax_img_s"] > 0 for r in rows)


def _pins(path: str) -> list[str]:
    return [l.strip() for l in open(path) if l.strip() and not l.startswith("#")]


# CPython 3.12 on an x86-64 Linux of glibc 2.35 (Ubuntu 22.04, as on Cloud TPU VMs and
# common GPU hosts): any manylinux tag up to 2.35 installs there.
TARGET_312 = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
              "--platform", "manylinux2014_x86_64"] + [
    arg for minor in range(17, 36) for arg in ("--platform", f"manylinux_2_{minor}_x86_64")]


def _released_versions(name: str) -> list[str]:
    """The versions of `name` on the package index with a wheel for CPython 3.12 on x86-64
    Linux (`pip index versions`: the index page, nothing downloaded)."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name, *TARGET_312],
                         capture_output=True, text=True, timeout=300)
    line = [l for l in out.stdout.splitlines() if l.startswith("Available versions:")]
    assert line, (name, out.stdout[-500:], out.stderr[-1500:])
    return [v.strip() for v in line[0].split(":", 1)[1].split(",")]


def test_accelerator_installs(tmp_path):
    """The README's GPU and TPU set-ups: each names a requirements file holding the shared
    requirements and jax with the accelerator's extra, at the version CI tests the code on
    (requirements-newest.txt), and nothing of requirements.txt's CPU pins; and each extra
    installs for Python 3.12 on x86-64 Linux: jax's own metadata (its wheel, downloaded
    alone) names what the extra pulls in, and the package index has a wheel of each at a
    version it allows (the CUDA plugins' PJRT wheels too)."""
    import zipfile

    from packaging.requirements import Requirement

    newest = _pins(os.path.join(ROOT, "requirements-newest.txt"))
    assert newest[0] == "-r requirements-core.txt" and newest[1].startswith("jax==")
    version = newest[1].split("==")[1]
    assert newest[2] == f"jaxlib=={version}"
    assert "jax==0.10.2" in _pins(os.path.join(ROOT, "requirements.txt"))  # the CPU default
    commands = [c for c in readme_commands() if c.startswith("ACCELERATOR=")]
    assert sorted(c.split()[0] for c in commands) == [
        "ACCELERATOR=cuda12", "ACCELERATOR=cuda13", "ACCELERATOR=tpu"]
    out = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                          "--only-binary=:all:", *TARGET_312, "-d", str(tmp_path),
                          f"jax=={version}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA")))
    requires = [Requirement(l.split(":", 1)[1].strip()) for l in metadata.decode().splitlines()
                if l.startswith("Requires-Dist:")]
    for cmd in commands:
        name = cmd.split()[0].split("=")[1]
        assert cmd.split(" ", 1)[1] == "bash experiments/setup.sh"
        path = os.path.join(ROOT, f"requirements-{name}.txt")
        assert _pins(path) == ["-r requirements-core.txt", f"jax[{name}]=={version}"]
        pulled = [r for r in requires if r.marker and r.marker.evaluate({"extra": name})]
        assert "jaxlib" in {r.name for r in pulled}, (name, pulled)
        if name.startswith("cuda"):  # the plugin pins its PJRT wheel to its own version
            pulled.append(Requirement(f"jax-{name}-pjrt=={version}"))
        for requirement in pulled:
            if requirement.name == "requests":
                continue
            released = _released_versions(requirement.name)
            assert any(requirement.specifier.contains(v, prereleases=False) for v in released), \
                (name, str(requirement), released[:5])


@pytest.mark.slow  # PyTorch's side compiles its steps with torch.compile (most of its time)
@pytest.mark.torch
def test_accelerator(tmp_path):
    """The accelerator benchmark at CPU sizes: both sides measured, the ratio, the step's FLOPs
    from XLA's cost analysis and the MFU they give against a stated peak."""
    bench = command(".venv/bin/python -m experiments.benchmark --accelerator")
    # bfloat16 only, the dtype of the accelerator runs: each dtype is three processes, one of
    # them torch.compile's (149 s for both dtypes on a 2-core family-25 EPYC in CI); the
    # dtypes' peaks are checked in tests/test_training.py
    run(argv(bench) + ["--sizes", "tiny", "--models", "cifar_resnet20", "--dtypes", "bfloat16",
                       "--steps", "2", "--warmup", "1", "--repeats", "1", "--data-workers", "1",
                       "--peak-tflops", "1", "--results-dir", str(tmp_path)])
    table = json.load(open(tmp_path / "accelerator_cpu_tiny.json"))
    rows = table["rows"]
    assert [(r["model"], r["dtype"], r["batch"]) for r in rows] == [
        ("cifar_resnet20", "bfloat16", 16)]
    for r in rows:
        assert r["jax_img_s"] > 0 and r["torch_img_s"] > 0 and r["fed_img_s"] > 0
        # the ratio is written to 3 decimals (up to 5e-4 off) from unrounded rates, which are
        # written to 2 decimals (each up to 0.005 off): the two roundings add up, so the bound
        # is their sum (a tolerance of either alone failed: 0.249 against 0.24849, and 0.32
        # against 0.3194998 from rates of tens of images/s)
        recomputed = r["jax_img_s"] / r["torch_img_s"]
        bound = 5e-4 + recomputed * (0.005 / r["jax_img_s"] + 0.005 / r["torch_img_s"])
        assert abs(r["ratio"] - recomputed) <= bound * (1 + 1e-9)
        # ResNet-20 (He et al. 2016) takes 41M multiply-adds a 32x32 image forward: 82 MFLOPs;
        # a train step is about 3 forwards (forward, input and weight gradients) plus the
        # BatchNorm, ReLU, loss and optimizer element-wise work.
        assert 0.22 < r["gflops_per_image"] < 0.32, r["gflops_per_image"]
        assert r["mfu"] == pytest.approx(r["gflops_per_image"] * 1e9 * r["jax_img_s"] / 1e12,
                                         rel=1e-2)
        assert isinstance(r["input_bound"], bool)
    assert table["meta"]["torch_compiled"] is True
    assert "| cifar_resnet20 | 32 | 16 | bfloat16 |" in open(
        tmp_path / "accelerator_cpu_tiny.md").read()
