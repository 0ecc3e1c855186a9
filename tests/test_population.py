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

from conftest import ROOT, xla_flags
from test_readme import argv, command
from test_reliability import final_state

SWEEP_COMMAND = (".venv/bin/python -m experiments.sweep --config "
                 "experiments/configs/fashion_mnist.py --workdir runs/population_lr")
TRAIN_COMMAND = (".venv/bin/python -m experiments.train --config "
                 "experiments/configs/fashion_mnist.py --workdir runs/population_fm")

# The main job's net on 512 real images with validation: 8 steps an epoch,
# 2 epochs, checkpoints every 2 steps, 200 validation and 200 test images.
TINY = {"train_subset": 512, "validation_split": 0.125, "eval_subset": 200, "batch_size": 64,
        "eval_batch_size": 100, "num_epochs": 2, "checkpoint_every_steps": 2,
        "log_every_steps": 2, "test_every_period": False, "ema_decay": 0.9,
        "progress_bar": False, "eval_shift": 0}  # the shifted views: tests/test_api.py
TINY_ARGS = [f"--config.{k}={v}" for k, v in TINY.items()]
ENV = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
# what differs between two runs of the same computation: the clock
TIMES = ("images_per_second", "train_data_wait", "wall_seconds", "seconds_to_first_step")


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


def sweep(workdir: str, population: bool) -> subprocess.CompletedProcess:
    """The README's population sweep (or the same without --population) on tiny data."""
    readme = command(SWEEP_COMMAND)
    assert "--grid learning_rate=0.1,0.2 --seeds 3 --population 6" in readme
    # two seeds of each rate here, in one population of 4: the same command at 2/3 the runs
    cmd = argv(readme, **{"runs/population_lr": workdir,
                          "--seeds 3 --population 6": "--seeds 2 --population 4"}) + TINY_ARGS
    if not population:
        del cmd[cmd.index("--population"):cmd.index("--population") + 2]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


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


@pytest.mark.slow  # two sweeps of 4 runs, a killed population of 2 resumed
def test_members_end_bit_for_bit_where_their_separate_runs_end(tmp_path):
    # the sweep without populations: 4 ordinary runs, the references. One at a time: with
    # --jobs 2 each run has one core, and oneDNN's convolutions split their sums by threads
    apart = str(tmp_path / "apart")
    done = sweep(apart, population=False)
    assert done.returncode == 0, done.stderr[-3000:]
    run = lambda lr, seed: os.path.join(apart, "runs", f"learning_rate={lr},seed={seed}")  # noqa

    # 1. two learning rates are two groups of the one step (trained in 2 below)
    configs = [load_config("fashion_mnist", seed=s, learning_rate=lr, **TINY)
               for s, lr in ((0, 0.1), (1, 0.1), (2, 0.2))]
    assert population.groups(configs) == [[0, 1], [2]]

    # 2. the same sweep packed into one population of 4: the same summary
    packed = str(tmp_path / "packed")
    done = sweep(packed, population=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 of 4 runs to train in 1 population(s)" in done.stdout
    assert summary_rows(packed) == summary_rows(apart)
    with open(os.path.join(packed, "summary.md")) as f, open(os.path.join(apart,
                                                                         "summary.md")) as g:
        assert [line.split("|")[:-2] for line in f] == [line.split("|")[:-2] for line in g]
    for lr in (0.1, 0.2):
        for seed in range(2):
            name = f"learning_rate={lr},seed={seed}"
            member = run_config(os.path.join(packed, "runs", name))
            assert member.seed == seed and member.learning_rate == lr
            assert_same_run(os.path.join(packed, "runs", name), run(lr, seed))

    # 3. the README's train command, 2 members (seeds 0-1 at 0.1), SIGKILLed after a checkpoint;
    # one member's newest checkpoint removed as if the kill fell between two members' saves
    pop = str(tmp_path / "pop")
    cmd = argv(command(TRAIN_COMMAND), **{"runs/population_fm": pop,
                                           "population_size=5": "population_size=2"})
    cmd += ["--config.learning_rate=0.1", *TINY_ARGS]
    assert "--config.population_size=2" in cmd
    members = [os.path.join(pop, f"seed={s}") for s in range(2)]
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
        for s in range(2)]
    with open(os.path.join(pop, population.POPULATION_FILE)) as f:
        assert [m["workdir"] for m in json.load(f)["members"]] == ["seed=0", "seed=1"]


def tiny(**overrides):
    values = {**TINY, "train_subset": 256, "num_epochs": 1, "validation_split": 0.0,
              "ema_decay": 0.0, **overrides}
    return load_config("fashion_mnist", **values)


def test_shared_data_gives_every_member_the_first_ones_data_seed(tmp_path):
    base = tiny(population_size=2, population_data="shared", seed=3)
    configs, workdirs = population.members_of(base, str(tmp_path / "pop"))
    assert [c.seed for c in configs] == [3, 4] and [c.data_seed for c in configs] == [3, 3]
    out = population.train_population(configs, workdirs)  # the Python API
    assert [r["step"] for r in out] == [4, 4] and all("selected" in r for r in out)
    # the second member: initialised by its own seed, fed the first one's data
    alone = str(tmp_path / "alone")
    train_and_evaluate(tiny(seed=4, data_seed=3), alone)
    assert_same_run(workdirs[1], alone)
    assert run_config(workdirs[1]).data_seed == 3 and run_config(workdirs[1]).population_size == 0


def test_vmapped_members_agree_with_their_runs_to_float32_rounding(tmp_path):
    # vmap batches each member's convolutions and matmuls into one kernel, which sums in
    # another order: float32 rounding (2^-24 relative) per operation. Measured, the worst
    # array's difference over its largest value: 1.2e-6 after one step, 1.1e-5 after two
    # (each step's rounding is amplified by the next update), 2.9e-2 after four (a
    # BatchNorm statistic near zero, early in the one-cycle warm-up). Two steps, within 1e-4.
    configs = [tiny(seed=s, num_steps=2, population_map="vmap", cpu_conv_dtype="float32")
               for s in (0, 1)]
    workdirs = [str(tmp_path / f"m{s}") for s in (0, 1)]
    population.train_population(configs, workdirs)
    for config, workdir in zip(configs, workdirs):
        alone = str(tmp_path / f"alone{config.seed}")
        train_and_evaluate(config, alone)
        (_, a), (_, b) = final_state(workdir), final_state(alone)
        worst = max(float(np.max(np.abs(np.asarray(x, np.float64) - y)))
                    / max(float(np.max(np.abs(y))), 1e-6)
                    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        assert worst <= 1e-4
        assert [r["train_loss"] for r in records(workdir)] == pytest.approx(
            [r["train_loss"] for r in records(alone)], rel=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 32}, "population member 1 has batch_size=32 but member 0 has 64: "
                         "members share batch_size"),
    ({"model": "cifar_resnet20"}, "population member 1 has model='cifar_resnet20' but "
                                  "member 0 has 'fashion_mnist_resnet8'"),
    ({"model_overrides": {"stem_width": 16}}, "population member 1 has "
                                             "model_overrides.stem_width=16"),
])
def test_a_member_that_changes_shapes_is_refused_naming_the_field(tmp_path, change, message):
    configs = [tiny(), tiny(seed=1, **change)]
    with pytest.raises(ValueError) as err:
        population.train_population(configs, [str(tmp_path / "a"), str(tmp_path / "b")])
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "a")  # refused before anything was written
    # per-member fields are not refused
    population.check_members([tiny(), tiny(seed=1, learning_rate=0.3, label_smoothing=0.0,
                                           mixup_alpha=0.2, ema_decay=0.5)])


def one_line_error(args: list[str], devices: int = 1) -> str:
    env = dict(ENV, XLA_FLAGS=xla_flags(devices))
    out = subprocess.run([sys.executable, "-m", "experiments.train", "--config", "fashion_mnist",
                          *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    return lines[0]


def test_a_population_that_does_not_fit_the_devices_is_one_line(tmp_path):
    line = one_line_error(["--workdir", str(tmp_path / "p"), "--config.population_size=2",
                           "--config.batch_size=6", "--config.parallel=sharded"], devices=4)
    assert ("a population of 2 members on 4 devices: every member's batch_size 6 is split "
            "over the devices and does not divide by 4") in line
    line = one_line_error(["--workdir", str(tmp_path / "t"), "--config.population_size=3",
                           "--config.model=alexnet", "--config.parallel=towers"], devices=2)
    assert "parallel='towers' splits one AlexNet over two devices; a population of 3" in line
    assert not os.path.exists(tmp_path / "p" / "seed=0" / "checkpoints")


def test_a_sweep_refuses_a_population_it_cannot_pack(tmp_path, capsys):
    from experiments import sweep as sweep_cli

    for options, message in ((["--population", "-1"], "population=-1"),
                             (["--population", "2", "--slurm"], "a SLURM array runs one run "
                                                                 "per task")):
        code = sweep_cli.main(["--config", "fashion_mnist", "--workdir", str(tmp_path / "s"),
                               "--seeds", "2", *options])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


WORKER = """
import json, sys
import jax, numpy as np
from resnet_jax.configs import load_config
from resnet_jax.training.population import train_population
from resnet_jax.training.loop import train_and_evaluate
from resnet_jax.training.checkpoint import Checkpointer
root, tiny = sys.argv[1], json.loads(sys.argv[2])
out = {}
for parallel in ("sharded", "pmap"):
    configs = [load_config("fashion_mnist", seed=s, parallel=parallel, **tiny) for s in (0, 1)]
    dirs = [f"{root}/{parallel}/m{s}" for s in (0, 1)]
    train_population(configs, dirs)
    for c, d in zip(configs, dirs):
        train_and_evaluate(c, d + "_alone")
        a, b = (Checkpointer(p + "/checkpoints").restore_raw()[1] for p in (d, d + "_alone"))
        out[f"{parallel}/{c.seed}"] = max(float(np.max(np.abs(x - y)))
                                         for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow  # 2 populations and 4 runs on 2 devices
def test_members_on_two_devices_equal_their_runs_on_two_devices(tmp_path):
    values = {**TINY, "train_subset": 256, "num_epochs": 1, "validation_split": 0.0,
              "ema_decay": 0.0}
    env = dict(ENV, XLA_FLAGS=xla_flags(2))
    out = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path), json.dumps(values)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = json.loads(out.stdout.split("RESULT ")[-1])
    # members replicated on both devices, each batch split: bit for bit the runs' steps
    assert diffs == {"sharded/0": 0.0, "sharded/1": 0.0, "pmap/0": 0.0, "pmap/1": 0.0}
