"""Populations: members trained in one step end exactly where their separate runs end (on the
CPU, where the step runs each member's own program side by side), through a SIGKILL and a
resume too; a sweep packed into a population gives the separate sweep's summary; members on
several devices; the data shared; bad input refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from resnet_jax.training import population
from resnet_jax.training.checkpoint import Checkpointer
from resnet_jax.training.config_json import run_config
from resnet_jax.training.loop import train_and_evaluate
from resnet_jax.configs import load_config

from conftest import ROOT

# The main job's net on 512 real images with validation: 8 steps an epoch,
# 2 epochs, checkpoints every 2 steps, 200 validation and 200 test images.
TINY = {"train_subset": 512, "validation_split": 0.125, "eval_subset": 200, "batch_size": 64,
        "eval_batch_size": 100, "num_epochs": 2, "checkpoint_every_steps": 2,
        "log_every_steps": 2, "test_every_period": False, "ema_decay": 0.9,
        "progress_bar": False}
TINY_ARGS = [f"--config.{k}={v}" for k, v in TINY.items()]
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
# what differs between two runs of the same computation: the clock
TIMES = ("images_per_second", "train_data_wait", "wall_seconds", "seconds_to_first_step")


def final_state(workdir: str):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.restore_raw()
    finally:
        ckpt.close()


def latest_steps(workdir: str) -> list[int]:
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.steps()
    finally:
        ckpt.close()


def records(workdir: str, train: bool = True) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items()
                 if k not in TIMES and (train or not k.startswith("train_"))} for line in f]


def selected(workdir: str) -> dict:
    with open(os.path.join(workdir, "selected.json")) as f:
        return json.load(f)


def assert_same_run(member: str, separate: str, resumed: bool = False) -> None:
    """Bit for bit: every array of the final checkpoint (parameters, BatchNorm statistics,
    optimizer state, EMA), every record but its timings, the selection. (`resumed`: not the
    train_* means, which a resumed run, like a single one, takes over the steps since)."""
    (step_a, a), (step_b, b) = final_state(member), final_state(separate)
    assert step_a == step_b
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (key, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(x, y, err_msg=f"{member}: {jax.tree_util.keystr(key)}")
    assert records(member, not resumed) == records(separate, not resumed)
    assert selected(member) == selected(separate)
    for name in ("curves.png", "confusion_matrix.png"):
        assert os.path.getsize(os.path.join(member, "plots", name)) > 0


def sweep(workdir: str, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.sweep", "--config", "fashion_mnist", "--workdir",
         workdir, "--grid", "learning_rate=0.1,0.2", "--seeds", "3", *options, *TINY_ARGS],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def summary_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "summary.json")) as f:
        rows = json.load(f)
    assert rows
    return [{k: v for k, v in row.items() if k != "wall_seconds"} for row in rows]


def kill_after_two_checkpoints(cmd: list[str], members: list[str]) -> None:
    """Start `cmd` and SIGKILL it once every member has two checkpoints, mid-run."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while min(len(latest_dirs(m)) for m in members) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished


def latest_dirs(member: str) -> list[int]:
    latest = os.path.join(member, "checkpoints", "latest")
    return [int(n) for n in os.listdir(latest) if n.isdigit()] if os.path.isdir(latest) else []


@pytest.mark.slow  # two sweeps of 6 runs, a population of 3, a killed population resumed
def test_members_end_bit_for_bit_where_their_separate_runs_end(tmp_path):
    # the sweep without populations: 6 ordinary runs, the references. One at a time: with
    # --jobs 2 each run has one core, and oneDNN's convolutions split their sums by threads
    apart = str(tmp_path / "apart")
    done = sweep(apart)
    assert done.returncode == 0, done.stderr[-3000:]
    run = lambda lr, seed: os.path.join(apart, "runs", f"learning_rate={lr},seed={seed}")  # noqa

    # 1. three members, two learning rates, through the Python API
    configs = [load_config("fashion_mnist", seed=s, learning_rate=lr, **TINY)
               for s, lr in ((0, 0.1), (1, 0.1), (2, 0.2))]
    workdirs = [str(tmp_path / f"member{k}") for k in range(3)]
    out = population.train_population(configs, workdirs)
    assert [r["step"] for r in out] == [16, 16, 16] and all("selected" in r for r in out)
    for workdir, (seed, lr) in zip(workdirs, ((0, 0.1), (1, 0.1), (2, 0.2))):
        assert run_config(workdir).seed == seed and run_config(workdir).learning_rate == lr
        assert_same_run(workdir, run(lr, seed))
    # the two learning rates are two groups of the one step
    assert population.groups(configs) == [[0, 1], [2]]

    # 2. the same sweep packed into one population of 6: the same summary
    packed = str(tmp_path / "packed")
    done = sweep(packed, "--population", "6")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 of 6 runs to train in 1 population(s)" in done.stdout
    assert summary_rows(packed) == summary_rows(apart)
    with open(os.path.join(packed, "summary.md")) as f, open(os.path.join(apart,
                                                                         "summary.md")) as g:
        assert [line.split("|")[:-2] for line in f] == [line.split("|")[:-2] for line in g]
    for lr in (0.1, 0.2):
        for seed in range(3):
            name = f"learning_rate={lr},seed={seed}"
            assert_same_run(os.path.join(packed, "runs", name), run(lr, seed))

    # 3. the train command's population (seeds 0-2 at 0.1), SIGKILLed after a checkpoint;
    # one member's newest checkpoint removed as if the kill fell between two members' saves
    pop = str(tmp_path / "pop")
    cmd = [sys.executable, "-m", "experiments.train", "--config", "fashion_mnist", "--workdir",
           pop, "--config.population_size=3", "--config.learning_rate=0.1", *TINY_ARGS]
    members = [os.path.join(pop, f"seed={s}") for s in range(3)]
    kill_after_two_checkpoints(cmd, members)
    saved = [latest_steps(m) for m in members]
    assert all(len(steps) >= 2 for steps in saved), saved
    newest = max(saved[1])
    shutil.rmtree(os.path.join(members[1], "checkpoints", "latest", str(newest)))
    common = min(max(latest_steps(m)) for m in members)
    assert common < 16
    resumed = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {common}" in resumed.stderr
    for seed, member in enumerate(members):
        assert_same_run(member, run(0.1, seed), resumed=True)
    assert [line for line in resumed.stdout.splitlines() if line.startswith("seed=")] == [
        f"seed={s}: final: step 16 test_accuracy "
        f"{json.loads(open(run(0.1, s) + '/metrics.jsonl').readlines()[-1])['test_accuracy']:.4f}"
        for s in range(3)]
    with open(os.path.join(pop, population.POPULATION_FILE)) as f:
        assert [m["workdir"] for m in json.load(f)["members"]] == ["seed=0", "seed=1", "seed=2"]
