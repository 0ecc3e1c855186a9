"""A user's own images as they have them, through the command line with its defaults (no
image size given): the size each folder trains at, augmentations, workers, memory that stays
bounded; the pre-flight stop before a step that cannot fit; lengths that conflict; subsets
that are samples across the classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import user_folders
from experiments import sweep as sweep_cli
from resnet_jax.data import image_sizes
from resnet_jax.data.sources import ArraySource, FileSource, subset
from resnet_jax.training.config import with_overrides
from resnet_jax.configs import load_config
from resnet_jax.training.overrides import apply_overrides, unused_fields
from resnet_jax.training.run import Run

from conftest import ROOT

QUICK = ["--config.progress_bar=False"]


def train(config: str, workdir, *overrides: str, timeout: float = 600):
    """`python -m experiments.train` as a user runs it: (return code, its output, the training
    process's peak resident memory in bytes)."""
    log = open(str(workdir) + ".log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.train", "--config",
         os.path.join(ROOT, "experiments", "configs", config), "--workdir", str(workdir),
         *overrides], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONPATH=ROOT))
    # The kernel's high-water mark of the process's resident set, read until it exits (it
    # only grows; the last 50 ms may go unseen). Not getrusage: a child's ru_maxrss starts
    # from its parent's at the fork, and the parent here is a test worker with jax loaded.
    peak, deadline = 0, time.monotonic() + timeout
    while process.poll() is None:
        peak = max(peak, high_water_mark(process.pid))
        if time.monotonic() > deadline:
            process.kill()
        time.sleep(0.05)
    log.seek(0)
    return process.returncode, log.read(), peak


def high_water_mark(pid: int) -> int:
    """VmHWM of a process in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def config_of(workdir) -> dict:
    return json.loads((workdir / "config.json").read_text())


def last_record(workdir) -> dict:
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")][-1]


GIB = 2**30

# The data matrix: every case through the CLI with no image size given. Each folder mixes
# several of what users have (layouts, sizes, colour modes, formats, augmentations, workers).
MATRIX = {
    # CIFAR-style: train/+val/, 32x32 RGB PNGs, the CIFAR recipe (its crop_flip), no workers
    "cifar_rgb_png": dict(
        folder=dict(train=256, val=64, size=32), config="cifar10_resnet20.py",
        args=["--config.batch_size=64", "--config.eval_batch_size=64", "--config.num_steps=3"],
        expect=dict(image_size=32, augment="crop_flip")),
    # MNIST-style: train/ only (validation held out), 28x28 grey and palette PNGs with
    # upper-case extensions in nested class folders, pad-2 crop and flip, two worker processes
    "mnist_grey_palette_nested_upper": dict(
        folder=dict(train=300, size=28, modes=("L", "P"), nested=True, upper=True),
        config="fashion_mnist.py",
        args=["--config.batch_size=32", "--config.eval_batch_size=50", "--config.num_steps=3",
              "--config.data_workers=2", "--config.augment=crop_flip"],
        expect=dict(image_size=28, augment="crop_flip")),
    # train/+val/+test/, 64x64 RGB and RGBA as JPEG, PNG and WebP, flip with RandAugment
    "rgba_jpeg_png_webp_64": dict(
        folder=dict(train=192, val=32, test=32, size=64, modes=("RGB", "RGBA"),
                    fmt=("jpg", "png", "webp")),
        config="cifar10_resnet20.py",
        args=["--config.batch_size=32", "--config.eval_batch_size=32", "--config.num_steps=2",
              "--config.augment=flip", "--config.auto_augment=rand_augment",
              "--config.model=fashion_mnist_resnet8"],
        expect=dict(image_size=64, augment="flip")),
}


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_a_users_folder_trains_at_its_own_size_through_the_cli(case, tmp_path):
    spec = MATRIX[case]
    folder = user_folders.write_folder(str(tmp_path / "images"), **spec["folder"])
    workdir = tmp_path / "run"
    code, out, peak = train(spec["config"], workdir, "--config.dataset=image_folder",
                            f"--config.data_dir={folder}", *spec["args"], *QUICK)
    assert code == 0, out[-3000:]
    config = config_of(workdir)
    for field, value in spec["expect"].items():
        assert config[field] == value, (field, config[field])
    size = spec["expect"]["image_size"]
    assert f"trained and evaluated at their own size, {size}x{size}" in out
    assert f"input {config['batch_size']}x{size}x{size}x3 uint8" in out  # the start-up line
    record = last_record(workdir)
    assert record["step"] == config["num_steps"] and record["test_count"] > 0
    assert np.isfinite(record["test_loss"])
    assert peak < 2.5 * GIB, f"peak resident memory {peak / GIB:.2f} GiB"


def test_varied_photographs_keep_the_imagenet_crops(tmp_path):
    from benchmarks.jpeg_folder import write_folder

    folder = write_folder(str(tmp_path / "photos"), train=24, val=8, classes=2)
    workdir = tmp_path / "run"
    code, out, peak = train("cifar10_resnet20.py", workdir, "--config.dataset=image_folder",
                            f"--config.data_dir={folder}", "--config.model=fashion_mnist_resnet8",
                            "--config.batch_size=8", "--config.eval_batch_size=8",
                            "--config.num_steps=2", "--config.augment=",
                            "--config.auto_augment=trivial_augment_wide", *QUICK)
    assert code == 0, out[-3000:]
    config = config_of(workdir)
    assert config["image_size"] == 224 and config["eval_crop_pct"] == 0.875
    assert "varied photographs, trained on 224 crops (augment inception)" in out
    assert peak < 4 * GIB, f"peak resident memory {peak / GIB:.2f} GiB"


def test_a_step_that_cannot_fit_stops_before_training_with_one_line(tmp_path):
    """imagenet_resnet50's recipe at batch 1024 on 224x224 needs far more than this machine's
    memory, even with one bottleneck block per stage (65.5 GiB by XLA's analysis, where the
    full ResNet-50's compilation took 20 of this test's 26 s)."""
    folder = user_folders.write_folder(str(tmp_path / "images"), train=1300, size=28)
    workdir = tmp_path / "run"
    code, out, peak = train("imagenet_resnet50.py", workdir, "--config.dataset=image_folder",
                            f"--config.data_dir={folder}", "--config.batch_size=1024",
                            "--config.model_overrides={'stage_sizes':(1,1,1,1)}", *QUICK)
    assert code == 2, out[-3000:]
    error = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, out[-3000:]
    assert "a training step needs" in error[0] and "GiB available" in error[0]
    for field in ("batch_size (now 1024)", "image_size (now 224)", "grad_accumulation_steps",
                  "data_workers"):
        assert field in error[0]
    assert peak < 3 * GIB  # it stopped before allocating the step
    assert not (workdir / "metrics.jsonl").exists()


def test_the_header_sample_decides_the_size():
    same = image_sizes.FolderSizes(3, 3, ((32, 32),) * 3)
    small = image_sizes.FolderSizes(3, 3, ((28, 28), (32, 32), (30, 40)))
    large = image_sizes.FolderSizes(2, 2, ((32, 32), (375, 500)))
    one_large = image_sizes.FolderSizes(2, 2, ((300, 300), (300, 300)))
    assert (same.native, small.native, large.native, one_large.native) == (32, 32, None, 300)
    assert large.describe() == "from 32x32 to 375x500"


def test_the_header_sample_reads_at_most_256_files(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(image_sizes, "header_size", lambda p: calls.append(p) or (8, 8))
    found = image_sizes.sample_sizes([f"f{i}.png" for i in range(100_000)], seed=1)
    assert len(calls) == image_sizes.SAMPLE == found.sampled and found.total == 100_000
    again = image_sizes.sample_sizes([f"f{i}.png" for i in range(100_000)], seed=1)
    assert calls[:256] == calls[256:] and again.native == 8  # the same sample every time


# --- lengths and other fields that one setting silently overrides -------------------------

def test_num_epochs_given_on_a_config_with_num_steps_wins_and_says_so():
    config = load_config("cifar10_resnet20")  # num_steps=64,000
    assert config.num_steps == 64_000
    config, lines = apply_overrides(with_overrides(config, num_epochs=1), ["num_epochs"])
    assert config.num_steps == 0 and config.num_epochs == 1
    assert lines == ["num_epochs=1 given: the run counts 1 epochs; the config's "
                     "num_steps=64000 is now 0"]
    assert load_config("cifar10_resnet20", num_epochs=2).num_steps == 0  # the Python API too


def test_of_both_lengths_the_later_wins_and_a_line_says_so(tmp_path):
    steps_last = load_config("fashion_mnist", num_epochs=1, num_steps=5)
    assert (steps_last.num_epochs, steps_last.num_steps) == (1, 5)
    epochs_last = load_config("fashion_mnist", num_steps=5, num_epochs=1)
    assert (epochs_last.num_epochs, epochs_last.num_steps) == (1, 0)
    folder = user_folders.write_folder(str(tmp_path / "images"), train=128, size=28)
    workdir = tmp_path / "run"
    code, out, _ = train("cifar10_resnet20.py", workdir, "--config.dataset=image_folder",
                         f"--config.data_dir={folder}", "--config.model=fashion_mnist_resnet8",
                         "--config.batch_size=32", "--config.num_steps=5",
                         "--config.num_epochs=1", *QUICK)
    assert code == 0, out[-3000:]
    assert ("num_epochs=1 given: the run counts 1 epochs; given before it num_steps=5 is "
            "now 0") in out
    # 128 images less 10% held out as val/ and 10% of the rest for validation: 3 steps
    assert last_record(workdir)["step"] == 3 and config_of(workdir)["num_steps"] == 0


def test_a_field_given_that_the_config_ignores_stops_naming_both(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"image_size=64 is given but has no effect: "
                                         r"dataset='fashion_mnist' has fixed-size images"):
        load_config("fashion_mnist", image_size=64)
    with pytest.raises(ValueError, match="lr_boundaries=.* schedule='onecycle'"):
        load_config("fashion_mnist", lr_boundaries=(100,))
    code, out, _ = train("fashion_mnist.py", tmp_path / "run", "--config.warmup_epochs=2")
    assert code == 2
    assert ("error: warmup_epochs=2.0 is given but has no effect: schedule='onecycle' has no "
            "warm-up") in out
    # a sweep's grid is checked before any run starts
    assert sweep_cli.main(["--config", os.path.join(ROOT, "experiments", "configs",
                                                    "fashion_mnist.py"),
                           "--workdir", str(tmp_path / "sweep"), "--grid", "warmup_epochs=1,2",
                           "--summarize"]) == 2
    assert "grid point warmup_epochs=1.0: warmup_epochs=1.0 is given but has no effect" in \
        capsys.readouterr().err


def test_no_experiment_config_sets_a_field_it_ignores():
    from resnet_jax.configs import config_names

    assert {name: unused_fields(load_config(name)) for name in config_names()} == \
        {name: {} for name in config_names()}


# --- subsets -------------------------------------------------------------------------------

def test_a_subset_of_a_class_sorted_folder_has_every_class_in_proportion():
    labels = np.repeat(np.arange(10), [50, 50, 50, 50, 50, 100, 100, 100, 200, 250])
    files = FileSource([f"{i}.png" for i in range(len(labels))], labels.astype(np.int32))
    part = subset(files, 100, seed=3)
    counts = np.bincount(part.labels, minlength=10)
    assert counts.tolist() == [5, 5, 5, 5, 5, 10, 10, 10, 20, 25]
    assert part.paths == sorted(part.paths, key=lambda p: int(p[:-4]))  # the source's order
    again = subset(files, 100, seed=3)
    assert again.paths == part.paths  # every process, every resume
    assert subset(files, 100, seed=4).paths != part.paths
    arrays = ArraySource(np.zeros((len(labels), 2, 2, 1), np.uint8), labels.astype(np.int32))
    assert np.bincount(subset(arrays, 37, seed=0).labels).sum() == 37


def test_eval_subset_of_a_class_sorted_folder_through_the_cli(tmp_path):
    """The first 64 of val/'s 200 files, sorted by class, hold three of the ten classes; the
    subset of 64 holds all ten, each about a tenth."""
    folder = user_folders.write_folder(str(tmp_path / "images"), train=128, val=200, size=28)
    workdir = tmp_path / "run"
    code, out, _ = train("fashion_mnist.py", workdir, "--config.dataset=image_folder",
                         f"--config.data_dir={folder}", "--config.model=fashion_mnist_resnet8",
                         "--config.batch_size=32", "--config.num_steps=1",
                         "--config.eval_subset=64", "--config.eval_batch_size=64",
                         "--config.augment=none", *QUICK)
    assert code == 0, out[-3000:]
    assert json.loads((workdir / "selected.json").read_text())["test_count"] == 64
    result = Run.load(str(workdir)).evaluate("test", 64)
    per_class = np.asarray(result["confusion"]).sum(axis=1)
    assert per_class.shape == (10,) and (per_class > 0).all(), per_class
