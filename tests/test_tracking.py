"""Experiment trackers against the real libraries: MLflow on a sqlite store read back with
MLflow's client, W&B offline files read back with wandb's own reader, a killed and resumed
run, sweeps grouped, and the one-line errors of a tracker missing or unreachable."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from test_readme import argv, command
from test_reliability import cli_args, complete_steps, logged_step, small_config, wait_for_step

from resnet_jax.training import trackers
from resnet_jax.training.config import with_overrides


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def train_command(c, workdir: str, *extra: str) -> list[str]:
    return cli_args(c, workdir) + [f"--config.trackers={','.join(c.trackers)}", *extra]


def tracked_env(tmp_path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT,
                MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The README's tracked run (TensorBoard, MLflow on a sqlite store, W&B offline) on the
    process tests' tiny recipe, with a validation split so that a model is selected on it."""
    tmp = tmp_path_factory.mktemp("tracked")
    workdir = str(tmp / "run")
    readme = argv(command(".venv/bin/python -m experiments.train --config "
                          "experiments/configs/fashion_mnist.py --workdir runs/tracked"),
                  **{"runs/tracked": workdir, "experiments/configs":
                     os.path.join(ROOT, "experiments", "configs")})  # run in tmp: mlruns/ there
    assert readme[-1] == "--config.trackers=tensorboard,mlflow,wandb"
    tiny = cli_args(small_config(num_epochs=2, log_every_steps=3), workdir)[7:]
    out = subprocess.run(readme + tiny, cwd=tmp, env=tracked_env(tmp), capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, f"sqlite:///{tmp}/mlflow.db", out.stderr


def test_the_readmes_tracker_install_is_what_the_test_set_up_installs():
    from importlib.metadata import version

    assert command(".venv/bin/pip install -r requirements-tracking.txt") == \
        ".venv/bin/pip install -r requirements-tracking.txt"
    assert "-r requirements-tracking.txt" in open(os.path.join(ROOT, "requirements-test.txt")
                                                  ).read().splitlines()
    pins = [line.split("==") for line in open(os.path.join(ROOT, "requirements-tracking.txt"))
            if "==" in line and not line.startswith("#")]
    assert [name for name, _ in pins] == ["wandb", "mlflow"]
    assert all(version(name) == pin.strip() for name, pin in pins)


def mlflow_run(workdir: str, uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = json.load(open(os.path.join(workdir, "trackers.json")))["mlflow"]["run_id"]
    return client, client.get_run(run_id)


def test_a_run_reports_to_mlflow_and_wandb_what_its_own_files_hold(tracked):
    """One test for both trackers of the shared run (xdist would build it once per worker
    for two tests)."""
    check_mlflow(*tracked[:2])
    check_wandb(tracked[0])


def check_mlflow(workdir: str, uri: str) -> None:
    """MLflow's history (its own client) is metrics.jsonl value for value, and every line
    of train_metrics.jsonl under steps/; the config as parameters; figures and plots."""
    client, run = mlflow_run(workdir, uri)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "resnet_jax"  # the project
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    keys = {k for r in records for k, v in r.items() if k != "step"
            and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {"train_loss", "test_accuracy", "train_data_wait", "images_per_second"} <= keys
    for key in sorted(keys):
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        want = [(r["step"], float(r[key])) for r in records if key in r]
        assert sorted(history) == want, key
    lines = read_jsonl(os.path.join(workdir, "train_metrics.jsonl"))
    for key in ("loss", "data_wait", "images_per_second"):
        history = client.get_metric_history(run.info.run_id, f"steps/{key}")
        assert sorted((m.step, m.value) for m in history) == [(l["step"], l[key]) for l in lines]
    # the whole config once, as parameters; the selected model's figures; the plots
    config = json.load(open(os.path.join(workdir, "config.json")))
    params = run.data.params
    assert params["model"] == config["model"] and params["seed"] == json.dumps(config["seed"])
    assert json.loads(params["learning_rate"]) == config["learning_rate"]
    selected = json.load(open(os.path.join(workdir, "selected.json")))
    assert run.data.metrics["selected/test_accuracy"] == selected["test_accuracy"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "selected.json" in artifacts
    assert plots == {"plots/curves.png", "plots/confusion_matrix.png"}


def read_wandb_offline(workdir: str) -> tuple[dict, dict, list[dict]]:
    """(the run record, the config, the history rows) of the run's offline .wandb files, read
    with wandb's own record reader and protocol buffers."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    run, config, rows = {}, {}, []
    for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "*.wandb"))):
        store = DataStore()
        store.open_for_scan(path)
        while (data := store.scan_record()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data[1])
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = {"id": record.run.run_id, "project": record.run.project,
                       "group": record.run.run_group, "name": record.run.display_name}
                config.update({i.key: json.loads(i.value_json)
                               for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in record.history.item})
    return run, config, rows


def check_wandb(workdir: str) -> None:
    """The offline files, read by wandb's reader, hold the config and the metrics."""
    run, config, rows = read_wandb_offline(workdir)
    saved = json.load(open(os.path.join(workdir, "trackers.json")))["wandb"]
    assert run == {"id": saved["id"], "project": "resnet_jax", "group": "", "name": "run"}
    wanted = json.load(open(os.path.join(workdir, "config.json")))
    assert {k: config[k] for k in ("model", "seed", "learning_rate", "batch_size")} == \
        {k: wanted[k] for k in ("model", "seed", "learning_rate", "batch_size")}
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["_step"], {}).update(row)
    for record in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        logged = by_step[record["step"]]
        for key in ("train_loss", "test_accuracy", "train_data_wait", "images_per_second"):
            assert logged[key] == pytest.approx(record[key], rel=1e-12), key
    for line in read_jsonl(os.path.join(workdir, "train_metrics.jsonl")):
        assert by_step[line["step"]]["steps/loss"] == pytest.approx(line["loss"], rel=1e-12)
    last = by_step[max(by_step)]
    assert {"plots/curves/_type", "plots/confusion_matrix/_type"} <= set(last)


@pytest.mark.slow
def test_a_killed_run_resumed_is_one_tracked_run_with_each_step_once(tmp_path):
    """SIGKILL after a checkpoint, then the same command: one MLflow run and one W&B run
    (offline: two starts' files under one id), each step in them once, none missing."""
    c = with_overrides(small_config(num_epochs=2), trackers=("mlflow", "wandb"))
    workdir, env = str(tmp_path / "killed"), tracked_env(tmp_path)
    proc = subprocess.Popen(train_command(c, workdir), cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_step(proc, workdir, 2)
        while not complete_steps(workdir):
            assert proc.poll() is None
            time.sleep(0.02)
        wait_for_step(proc, workdir, logged_step(workdir) + 3)  # past the checkpoint
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = logged_step(workdir)
    first_id = json.load(open(os.path.join(workdir, "trackers.json")))["mlflow"]["run_id"]
    out = subprocess.run(train_command(c, workdir), cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step" in out.stderr
    client, run = mlflow_run(workdir, env["MLFLOW_TRACKING_URI"])
    assert run.info.run_id == first_id and run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    lines = read_jsonl(os.path.join(workdir, "train_metrics.jsonl"))
    for key, steps in (("test_accuracy", [r["step"] for r in records]),
                       ("steps/loss", sorted({l["step"] for l in lines}))):
        history = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(history) == steps, (key, killed_at, history)  # each step once
    assert steps[-1] == 16 and killed_at < 16
    tracked, _, rows = read_wandb_offline(workdir)
    starts = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
    assert len(starts) == 2 and {p.rsplit("-", 1)[1] for p in starts} == {tracked["id"]}
    assert sorted(r["_step"] for r in rows if "test_accuracy" in r) == [
        r["step"] for r in records]
    assert sorted(r["_step"] for r in rows if "steps/loss" in r) == sorted(
        {l["step"] for l in lines})


def test_a_tracker_that_is_not_installed_is_a_one_line_error_before_training(tmp_path):
    c = with_overrides(small_config(), trackers=("tensorboard", "wandb"))
    workdir = str(tmp_path / "run")
    code = ("import sys; sys.modules['wandb'] = None; sys.argv[0] = 'train'; "
            "from resnet_jax.cli.train import main; main(sys.argv[1:])")
    out = subprocess.run([sys.executable, "-c", code, *train_command(c, workdir)[3:]],
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                         text=True)
    assert out.returncode == 2
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert errors == [
        "error: trackers=('tensorboard', 'wandb'): wandb is not installed; pip install -r "
        "requirements-tracking.txt (or pip install 'resnet_jax[tracking]'), or leave 'wandb' "
        "out of trackers"]
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_an_unreachable_mlflow_server_is_a_one_line_error_before_training(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = with_overrides(small_config(), trackers=("mlflow",))
    workdir = str(tmp_path / "run")
    started = time.monotonic()
    out = subprocess.run(train_command(c, workdir), cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT,
                                  MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"))
    assert out.returncode == 2 and time.monotonic() - started < 45
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: trackers=('mlflow',): MLflow at "
                                f"MLFLOW_TRACKING_URI=http://127.0.0.1:{port} cannot be reached")
    assert errors[0].endswith("or leave 'mlflow' out of trackers")
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_a_tracker_failing_mid_run_is_dropped_with_a_warning_and_the_others_go_on(
        tmp_path, monkeypatch, caplog):
    """A tracker that raises is warned about once and left out; the others (and the run's
    own files, written before any tracker is called) go on."""
    received = []

    class Working:
        name, durable_on_close = "mlflow", False

        def __init__(self, config, workdir, saved):
            self.saved = {"run_id": "r"}

        def log(self, step, values):
            received.append(step)

        def close(self, finished):
            received.append("closed")

    class Failing(Working):
        name = "wandb"

        def log(self, step, values):
            raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(trackers, "_KINDS", {"mlflow": Working, "wandb": Failing})
    c = with_overrides(small_config(), trackers=("mlflow", "wandb"))
    opened = trackers.open_trackers(c, str(tmp_path), chief=True)
    for step in (1, 2, 3):
        opened.log_steps(step, {"loss": 1.0 / step})
    opened.close()
    assert received == [1, 2, 3, "closed"]
    warned = [r.getMessage() for r in caplog.records if "tracker wandb failed" in r.getMessage()]
    assert len(warned) == 1 and "the tracking server went away" in warned[0]
    saved = json.load(open(tmp_path / "trackers.json"))
    assert saved["mlflow"]["last_step"] == {"steps": 3}


def test_a_sweep_groups_its_runs_under_its_name(tmp_path):
    """The W&B group and MLflow experiment of a sweep's runs: the sweep's name."""
    from resnet_jax.configs import load_config
    from resnet_jax.sweeps import _grouped

    c = load_config("fashion_mnist", trackers=("mlflow",))
    assert _grouped(c, str(tmp_path / "lr_sweep")).tracker_group == "lr_sweep"
    assert _grouped(with_overrides(c, tracker_group="mine"), "x").tracker_group == "mine"
    assert _grouped(load_config("fashion_mnist"), "x").tracker_group == ""  # TensorBoard only


def test_the_tensorboard_writer_starts_without_torch_and_leaves_it_importable(tmp_path):
    """tensorboardX imports PyTorch wherever it is installed (a second of every run's start);
    the writer keeps it out, writes its events, and `import torch` works afterwards."""
    code = (
        "import glob, sys\n"
        "from resnet_jax.training.metrics import MetricWriter\n"
        f"w = MetricWriter({str(tmp_path)!r})\n"
        "w.write({'step': 3, 'train_loss': 0.25}); w.close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        f"(events,) = glob.glob({str(tmp_path)!r} + '/tensorboard/events.out.tfevents.*')\n"
        "assert b'train_loss' in open(events, 'rb').read()\n"
        "import torch\n"
        "print(float(torch.ones(3).sum()))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "3.0"
