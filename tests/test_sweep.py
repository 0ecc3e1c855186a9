"""Sweeps: a grid times seeds gives one ordinary run each and a summary whose figures are the
runs' own; an interrupted sweep resumes and a finished one trains nothing; bad values are
refused before any run; the SLURM script's task trains the run it names; the comparison's
interval is Welch's."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import scipy.stats

import resnet_jax
from experiments import compare as compare_cli
from experiments import sweep as sweep_cli
from resnet_jax.sweeps import local, plan as plan_lib, run_sweep, stats
from resnet_jax.training.config_json import run_config
from resnet_jax.configs import load_config

from conftest import ROOT
from test_readme import argv, command

CONFIG = os.path.join(ROOT, "experiments", "configs", "fashion_mnist.py")
# the main job's net on 128 real images: 2 steps an epoch, 3 epochs, 100 test images
TINY = {"train_subset": 128, "eval_subset": 100, "batch_size": 64, "eval_batch_size": 100,
        "num_epochs": 3, "progress_bar": False}
TINY_ARGS = [f"--config.{k}={v}" for k, v in TINY.items()]
GRID_DICT = {"learning_rate": [0.1, 0.2], "label_smoothing": [0.0, 0.1]}  # the README's
SEEDS_COMMAND = (".venv/bin/python -m experiments.sweep --config "
                 "experiments/configs/fashion_mnist.py --workdir runs/fashion_mnist_seeds")
GRID_COMMAND = (".venv/bin/python -m experiments.sweep --config "
                "experiments/configs/fashion_mnist.py --workdir runs/lr")


def finished(workdir: str) -> dict[str, float]:
    """name -> mtime of selected.json, for each finished run."""
    return {os.path.basename(os.path.dirname(p)): os.path.getmtime(p)
            for p in glob.glob(os.path.join(workdir, "runs", "*", "selected.json"))}


def training_started(workdir: str) -> list[str]:
    """Runs not finished whose log says the training loop is running (a stop saves them)."""
    started = []
    for path in glob.glob(os.path.join(workdir, "logs", "*.log")):
        name = os.path.basename(path)[:-4]
        if name not in finished(workdir) and "first step done" in open(path).read():
            started.append(name)
    return started


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The README's 2x2 grid over 2 seeds, 2 runs at a time, on tiny data: stopped by SIGTERM
    once two runs finished and another was training, then resumed by the Python API."""
    workdir = str(tmp_path_factory.mktemp("sweep") / "grid")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    cmd = argv(command(GRID_COMMAND), **{"runs/lr": workdir}) + TINY_ARGS
    assert cmd[cmd.index("--seeds") + 1] == "2" and cmd[cmd.index("--jobs") + 1] == "2"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    # two runs finished (the first pair) and one of the next in its training loop
    while not (len(finished(workdir)) >= 2 and training_started(workdir)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    before = finished(workdir)
    latest = lambda n: os.path.join(workdir, "runs", n, "checkpoints", "latest")  # noqa: E731
    checkpointed = [n for n in os.listdir(os.path.join(workdir, "runs")) if n not in before
                    and os.path.isdir(latest(n)) and os.listdir(latest(n))]
    config = load_config(CONFIG, **TINY)
    resumed = run_sweep(config, workdir, GRID_DICT, seeds=2, jobs=2, progress=False)
    return {"workdir": workdir, "stop_exit": proc.returncode, "stop_output": output,
            "before": before, "checkpointed": checkpointed, "resumed": resumed}


@pytest.mark.slow  # the shared sweep: 8 runs, stopped and resumed
def test_a_2x2_grid_over_2_seeds_gives_8_runs_and_a_4_row_summary_of_their_figures(swept):
    workdir = swept["workdir"]
    names = sorted(os.listdir(os.path.join(workdir, "runs")))
    assert len(names) == 8 and len(finished(workdir)) == 8
    assert "learning_rate=0.2,label_smoothing=0.1,seed=1" in names
    assert "learning_rate=0.1,label_smoothing=0.0,seed=0" in names  # 0 as the float it is
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert len(summary) == 4
    assert [row["overrides"] for row in summary] == [
        {"learning_rate": lr, "label_smoothing": ls} for lr in (0.1, 0.2) for ls in (0.0, 0.1)]
    for row in summary:
        assert row["runs"] == 2 and row["seeds"] == [0, 1]
        dirs = [os.path.join(workdir, "runs", plan_lib.run_name(row["overrides"], s))
                for s in (0, 1)]
        for d, seed in zip(dirs, (0, 1)):  # ordinary runs, with the point's fields and seed
            config = run_config(d)
            assert (config.learning_rate, config.label_smoothing, config.seed) == (
                row["overrides"]["learning_rate"], row["overrides"]["label_smoothing"], seed)
            assert config.train_subset == 128 and config.num_epochs == 3
        for metric in ("test_accuracy", "test_loss", "wall_seconds"):
            if metric == "wall_seconds":
                values = [[json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
                          [-1]["wall_seconds"] for d in dirs]
            else:
                values = [json.load(open(os.path.join(d, "selected.json")))[metric]
                          for d in dirs]
            got = row[metric]
            assert got["mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert got["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
            assert (got["min"], got["max"]) == (min(values), max(values))
    table = open(os.path.join(workdir, "summary.md")).read()
    assert table.count("\n| 0.") == 4 and " ± " in table
    for plot in ("plots/summary.png", "plots/curves.png"):
        assert os.path.getsize(os.path.join(workdir, plot)) > 10_000
    results = resnet_jax.load_runs(workdir)
    assert results.table == summary
    run = results.select(learning_rate=0.2, label_smoothing=0.1)[1].load()
    assert run.config.seed == 1 and run.step == 6  # Run.load reads it: 3 epochs of 2 steps


@pytest.mark.slow  # the shared sweep: 8 runs, stopped and resumed
def test_an_interrupted_sweep_resumes_and_a_second_call_trains_nothing(swept):
    workdir, resumed = swept["workdir"], swept["resumed"]
    assert swept["stop_exit"] == 0, swept["stop_output"]
    assert "run the same command again to resume" in swept["stop_output"]
    before = swept["before"]
    assert 1 <= len(before) < 8
    # the second call left the finished runs alone and trained the others to the end
    assert sorted(resumed.outcome.skipped) == sorted(before)
    assert len(resumed.outcome.trained) == 8 - len(before) and not resumed.outcome.failed
    assert all(finished(workdir)[n] == t for n, t in before.items())
    # a run stopped in its training loop saved a checkpoint and resumed from it
    assert swept["checkpointed"], "no run was stopped after its first step"
    for name in swept["checkpointed"]:
        assert "resumed from step" in open(os.path.join(workdir, "logs", f"{name}.log")).read()
    starts = len(local.read_log(workdir))
    summary_time = os.path.getmtime(os.path.join(workdir, "summary.json"))
    time.sleep(0.01)
    again = run_sweep(load_config(CONFIG, **TINY), workdir, GRID_DICT, seeds=2, jobs=2,
                      progress=False)
    assert again.outcome.trained == [] and len(again.outcome.skipped) == 8
    assert len(local.read_log(workdir)) == starts  # no process started
    assert os.path.getmtime(os.path.join(workdir, "summary.json")) > summary_time
    # the same directory with another grid is refused, naming what differs
    with pytest.raises(ValueError, match="holds another sweep.*grid"):
        run_sweep(load_config(CONFIG, **TINY), workdir, {"learning_rate": [0.05]}, seeds=2)


@pytest.mark.slow  # the shared sweep: 8 runs, stopped and resumed
def test_compare_two_grid_points_by_welch(swept, capsys):
    workdir = swept["workdir"]
    args = argv(command(".venv/bin/python -m experiments.compare"), **{"runs/lr": workdir})
    assert compare_cli.main(args[3:]) == 0  # the README's command, as it prints
    table = capsys.readouterr().out
    assert "95% CI of A - B (Welch)" in table and "| test_accuracy (%) |" in table
    assert compare_cli.main(args[3:] + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["test"] == "welch"
    results = resnet_jax.load_runs(workdir)
    a = [r.metrics["test_loss"] for r in results.select(learning_rate=0.1, label_smoothing=0.1)]
    b = [r.metrics["test_loss"] for r in results.select(learning_rate=0.2, label_smoothing=0.1)]
    got = out["metrics"]["test_loss"]
    assert got["difference"] == pytest.approx(np.mean(a) - np.mean(b))
    assert got["n_a"] == got["n_b"] == 2
    assert compare_cli.main([workdir, "--a", "learning_rate=0.1", "--b", "learning_rate=0.2"]
                            ) == 2  # each names two grid points
    assert "matches 2 grid points" in capsys.readouterr().err


def test_welch_interval_and_p_value_are_scipys():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.93, 0.002, 5), rng.normal(0.931, 0.004, 7)
    got = stats.welch(a, b)
    ref = scipy.stats.ttest_ind(a, b, equal_var=False)
    low, high = ref.confidence_interval(0.95)
    assert (got["low"], got["high"]) == (pytest.approx(low), pytest.approx(high))
    assert got["p"] == pytest.approx(ref.pvalue) and got["df"] == pytest.approx(ref.df)
    assert stats.welch([0.9], [0.8, 0.85])["low"] is None  # one run: no interval
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's precision warning lands in the note
        near = stats.welch([0.25, 0.25 + 5.6e-17, 0.25], [0.25, 0.25, 0.25 + 5.6e-17])
    assert "Precision loss" in near["note"]


@pytest.mark.parametrize("grid, message", [
    (["--grid", "learning_rate=0.1,fast"], "learning_rate='fast'"),
    (["--grid", "optimizer=sgd,adamx"], "optimizer='adamx'; expected one of"),
    (["--grid", "learnig_rate=0.1"], "did you mean 'learning_rate'"),
    (["--grid", "label_smoothing=0,1.5"], "label_smoothing=1.5"),
    (["--grid", "seed=1,2"], "--seeds N"),
    (["--grid", "learning_rate"], "expected FIELD=VALUE1,VALUE2"),
])
def test_a_bad_grid_value_is_refused_before_any_run(tmp_path, capsys, grid, message):
    workdir = str(tmp_path / "sweep")
    code = sweep_cli.main(["--config", CONFIG, "--workdir", workdir, "--grid",
                           "nesterov=True,False", *grid, "--seeds", "2", *TINY_ARGS])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(workdir)


def test_other_bad_input_is_refused_before_any_run(tmp_path, capsys):
    workdir = str(tmp_path / "sweep")
    base = ["--config", CONFIG, "--workdir", workdir, "--grid", "learning_rate=0.1,0.2"]
    assert sweep_cli.main(base + ["--seeds", "0"]) == 2
    assert "seeds=0" in capsys.readouterr().err
    assert sweep_cli.main(base + ["--jobs", "9999"]) == 2
    assert "jobs=9999" in capsys.readouterr().err
    assert sweep_cli.main(base + ["--config.num_epochs=-1"]) == 2
    assert "num_epochs" in capsys.readouterr().err
    # a value fine alone but not with the rest of its point
    assert sweep_cli.main(base[:-1] + ["schedule=constant,piecewise"]) == 2
    assert "schedule='piecewise' needs lr_boundaries" in capsys.readouterr().err
    assert not os.path.exists(workdir)


def test_the_slurm_script_task_trains_the_run_it_names(tmp_path, capsys):
    """The README's 5-seed sweep of the main job, as a SLURM job array on tiny data, each run
    of two processes: the task's command is the launch command (the multi-host path)."""
    workdir = str(tmp_path / "cluster")
    args = argv(command(SEEDS_COMMAND), **{"runs/fashion_mnist_seeds": workdir,
                                           "experiments/configs/fashion_mnist.py": CONFIG})
    extra = [*TINY_ARGS, "--config.num_epochs=1", "--config.parallel=sharded"]
    assert sweep_cli.main(args[3:] + ["--slurm", "--slurm-option=--gres=gpu:1",
                                      "--slurm-option=--time=1:00:00", "--processes-per-run",
                                      "2", *extra]) == 0
    script = os.path.join(workdir, "sweep.sbatch")
    assert f"sbatch {script}" in capsys.readouterr().out
    text = open(script).read()
    assert "#SBATCH --array=0-4\n" in text and "#SBATCH --gres=gpu:1\n" in text
    assert "#SBATCH --time=1:00:00\n" in text
    assert "-m resnet_jax.cli.launch --num-processes 2 --devices-per-process 1 -- --config" in text
    assert not os.path.exists(os.path.join(workdir, "runs"))  # nothing trained yet
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="3", JAX_PLATFORMS="cpu")
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(finished(workdir)) == ["seed=3"]
    trained = run_config(os.path.join(workdir, "runs", "seed=3"))
    assert trained.seed == 3 and trained.num_processes == 2  # two processes, as launched
    again = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "finished before" in again.stdout
    env["SLURM_ARRAY_TASK_ID"] = "5"
    wrong = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "no task 5" in wrong.stderr
    # --summarize trains nothing: the summary of a part-done sweep counts what finished and
    # names the rest
    assert sweep_cli.main(args[3:] + ["--summarize", *extra]) == 0
    assert sorted(finished(workdir)) == ["seed=3"] and not local.read_log(workdir)
    rows = json.load(open(os.path.join(workdir, "summary.json")))
    assert rows == resnet_jax.load_runs(workdir).table
    assert len(rows) == 1 and rows[0]["runs"] == 1 and rows[0]["seeds"] == [3]
    assert rows[0]["unfinished"] == ["seed=0", "seed=1", "seed=2", "seed=4"]
    assert rows[0]["test_accuracy"]["std"] is None  # one run: no spread


def test_jobs_split_the_gpus_or_the_cores():
    assert local.shares(1, gpus=["0", "1"]) == [local.Share({})]
    assert [s.env for s in local.shares(2, gpus=["0", "1", "2", "3"])] == [
        {"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    cpu = local.shares(3, gpus=[], cores=list(range(8)))
    assert [s.cores for s in cpu] == [(0, 1, 2), (3, 4), (5, 6, 7)]
    assert [s.env["OMP_NUM_THREADS"] for s in cpu] == ["3", "2", "3"]
    with pytest.raises(ValueError, match="jobs=3 but this host has 2 GPU"):
        local.shares(3, gpus=["0", "1"])
    with pytest.raises(ValueError, match="jobs=0"):
        local.shares(0)


def test_grid_values_are_read_as_their_fields_types():
    assert plan_lib.split_values("(1,2),[3, 4],'a,b'") == ["(1,2)", "[3, 4]", "'a,b'"]
    grid = plan_lib.parse_grid(["learning_rate=0.1,1e-3", "nesterov=True,false",
                                "optimizer=sgd,adamw", "input_mean=(0.5,),(0.2,)"])
    assert grid == {"learning_rate": [0.1, 1e-3], "nesterov": [True, False],
                    "optimizer": ["sgd", "adamw"], "input_mean": [(0.5,), (0.2,)]}
    assert plan_lib.run_name({"input_mean": [0.5]}, 3) == "input_mean=_0.5_,seed=3"
    for value in (0.1, 1e-3, True, (0.5,), "sgd"):
        assert plan_lib.parse_value("learning_rate" if isinstance(value, float) else
                                    {bool: "nesterov", tuple: "input_mean", str: "optimizer"}[
                                        type(value)], plan_lib.format_value(value)) == value



def test_a_run_is_pinned_to_its_cores_through_exec_not_a_fork(tmp_path):
    """The sweep starts a run as `python .../sweeps/pinned.py CORES -- COMMAND`: the
    command runs with that affinity (and the test process is never forked: conftest)."""
    cores = sorted(os.sched_getaffinity(0))[:1]
    command = local._pinned([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                            tuple(cores))
    assert command[1].endswith(os.path.join("resnet_jax", "sweeps", "pinned.py"))
    out = subprocess.run(command, env=plan_lib.run_environment(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == str(cores), out.stderr
    bad = subprocess.run([sys.executable, command[1], "x", "--", "true"],
                         env=plan_lib.run_environment(), capture_output=True, text=True)
    assert bad.returncode == 1 and "expected comma-separated core numbers" in bad.stderr
