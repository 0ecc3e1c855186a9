"""Where a run reports besides its own files: Weights & Biases and MLflow (TensorBoard is
`metrics.MetricWriter`'s). Chosen by the config's `trackers`.

Each tracker gets the whole config once (flattened, as parameters), every record of
metrics.jsonl at its step under the same names, every line of train_metrics.jsonl at its
step under `steps/` (loss, accuracy, data_wait, images_per_second...), and at the end the
selected model's figures (`selected/...`), selected.json and the plots.

`check` runs before anything is trained: a tracker that is not installed or cannot be
reached is a `TrackerError` (a ValueError: the train command's one-line error) naming the
field and the fix. Once training runs, a tracker that fails is warned about once and left
out; the run's own files are written regardless.

A resumed run reports to the same tracked run: its id is kept in WORKDIR/trackers.json with
the last step each stream reached, and what a resumed run does again up to that step (the
same losses: resuming is exact) is not sent twice. Sweeps group their runs
(`tracker_group`: the W&B group, the MLflow experiment).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import secrets
import time
import urllib.request
from typing import Any, Mapping

import ml_collections

from resnet_jax.training import config_json, metrics, rundir

log = logging.getLogger("resnet_jax")

REQUIREMENTS = "requirements-tracking.txt"
INSTALL = {"wandb": "wandb", "mlflow": "mlflow"}
STEPS_PREFIX = "steps/"
SELECTED_PREFIX = "selected/"
REACH_TIMEOUT_S = 5.0


class TrackerError(ValueError):
    """A tracker that cannot be used: not installed, or not reachable."""


def check(config: ml_collections.ConfigDict) -> None:
    """Raise TrackerError if a tracker of the config is not installed or not reachable."""
    for name in config.trackers:
        if name == "tensorboard":
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            raise TrackerError(
                f"trackers={tuple(config.trackers)!r}: {name} is not installed; "
                f"pip install -r {REQUIREMENTS} (or pip install 'resnet_jax[tracking]'), "
                f"or leave {name!r} out of trackers") from None
        if name == "mlflow":
            _check_mlflow(config)


def mlflow_uri() -> str:
    """The MLflow tracking URI: $MLFLOW_TRACKING_URI, else MLflow's own default store."""
    import mlflow

    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def _check_mlflow(config: ml_collections.ConfigDict) -> None:
    uri = mlflow_uri()
    fix = (f"start the server, point MLFLOW_TRACKING_URI at one (or at a local store such as "
           f"sqlite:///mlflow.db), or leave 'mlflow' out of trackers")
    try:
        if uri.startswith(("http://", "https://")):
            with urllib.request.urlopen(uri.rstrip("/") + "/health",
                                        timeout=REACH_TIMEOUT_S) as answer:
                answer.read()
        else:
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - whatever the cause, the same answer
        reason = getattr(err, "reason", None) or str(err).splitlines()[0][:200]
        raise TrackerError(f"trackers={tuple(config.trackers)!r}: MLflow at "
                           f"MLFLOW_TRACKING_URI={uri} cannot be reached ({reason}); {fix}"
                           ) from None


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as config.json holds it, nested fields joined with '.'."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            flat[prefix[:-1]] = value

    walk("", config_json.config_to_dict(config))
    return flat


def run_name(config: ml_collections.ConfigDict, workdir: str) -> str:
    return config.tracker_name or os.path.basename(os.path.abspath(workdir).rstrip("/"))


class _WandB:
    name = "wandb"
    # what wandb.log hands over is written by W&B's service process, which a SIGKILL of
    # this one can cut short: the steps count as received only once the run closed cleanly
    durable_on_close = True

    def __init__(self, config, workdir: str, saved: dict[str, Any]):
        import wandb

        self._wandb = wandb
        run_id = saved.get("id") or secrets.token_hex(4)
        mode = os.environ.get("WANDB_MODE", "offline")
        # offline, the same id is the resume: `wandb sync` joins the files of each start
        self.run = wandb.init(
            project=config.tracker_project, group=config.tracker_group or None,
            name=run_name(config, workdir), id=run_id, dir=workdir, mode=mode,
            resume=None if mode == "offline" else "allow", config=flat_config(config),
            settings=wandb.Settings(console="off", silent=True))
        self.saved = {"id": self.run.id}

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, step: int, selected: dict[str, float], files: dict[str, str]) -> None:
        self.run.summary.update(selected)
        images = {f"plots/{os.path.splitext(n)[0]}": self._wandb.Image(p)
                  for n, p in files.items() if p.endswith(".png")}
        if images:
            self.run.log(images, step=step)
        artifact = self._wandb.Artifact(f"run-{self.run.id}-files", type="run-files")
        for name, path in files.items():
            artifact.add_file(path, name=f"plots/{name}" if path.endswith(".png") else name)
        self.run.log_artifact(artifact)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class _MLflow:
    name = "mlflow"
    durable_on_close = False  # each log_batch is stored before it returns

    def __init__(self, config, workdir: str, saved: dict[str, Any]):
        from mlflow.tracking import MlflowClient

        uri = saved.get("tracking_uri") or mlflow_uri()
        self.client = MlflowClient(uri)
        run_id = saved.get("run_id")
        self.received: dict[str, int] | None = None
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            # what MLflow holds, asked rather than remembered: a kill may fall between its
            # storing a batch and trackers.json recording it
            self.received = {stream: max([m.step for m in
                                          self.client.get_metric_history(run_id, key)],
                                         default=0)
                             for stream, key in (("records", "epoch"),
                                                 ("steps", STEPS_PREFIX + "loss"))}
        else:
            experiment_id = self._experiment(config.tracker_group or config.tracker_project)
            tags = {"workdir": os.path.abspath(workdir), "model": config.model,
                    "dataset": config.dataset}
            if config.tracker_group:
                tags["sweep"] = config.tracker_group
            run_id = self.client.create_run(experiment_id, run_name=run_name(config, workdir),
                                            tags=tags).info.run_id
            self._log_params(run_id, flat_config(config))
        self.run_id = run_id
        self.saved = {"run_id": run_id, "tracking_uri": uri}

    def _experiment(self, name: str) -> str:
        """The id of experiment `name`, made if missing (a sweep's runs that start together
        may both try: the one that loses finds the other's)."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v if isinstance(v, str) else json.dumps(v))
                 for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes 100 parameters a batch
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def finish(self, step: int, selected: dict[str, float], files: dict[str, str]) -> None:
        self.log(step, selected)
        for name, path in files.items():
            folder = "plots" if path.endswith(".png") else None
            self.client.log_artifact(self.run_id, path, folder)

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


_KINDS = {"wandb": _WandB, "mlflow": _MLflow}


class Trackers:
    """The config's trackers for one run (process 0): records and step lines sent once each,
    through resumes; a tracker that fails mid-run is dropped with one warning."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.path = rundir.path(workdir, rundir.TRACKERS)
        state = _read_json(self.path)
        self.active = []
        ids = {k: v for k, v in state.items() if k in _KINDS}  # kept for a later start
        for name in config.trackers:
            if name not in _KINDS:
                continue
            try:  # `check` passed: a failure now is the tracker's, not the run's
                tracker = _KINDS[name](config, workdir, state.get(name, {}))
            except Exception as err:  # noqa: BLE001
                log.warning("tracker %s could not start (%s: %s); the run goes on without it",
                            name, type(err).__name__, err)
                continue
            self.active.append(tracker)
            ids[name] = {**tracker.saved, "last_step": state.get(name, {}).get("last_step", {})}
        self.ids = ids
        self.sent = {t.name: dict(getattr(t, "received", None) or ids[t.name]["last_step"])
                     for t in self.active}
        self.finished = False
        if self.active:
            self._save()

    def catch_up(self, records: list[dict[str, Any]], workdir: str, upto: int) -> None:
        """On a resume from step `upto`: what the run's own files hold up to it (`records`
        of metrics.jsonl, the lines of train_metrics.jsonl) and a tracker has not received,
        sent now in step order (a W&B run killed before its service wrote them)."""
        last = {}
        for line in _jsonl(rundir.path(workdir, rundir.TRAIN_METRICS)):
            if int(line["step"]) <= upto:  # a step done again after a resume: its last line
                last[int(line["step"])] = line
        for tracker in list(self.active):
            for step, line in sorted(last.items()):
                self._send_to(tracker, "steps", step, _step_values(line))
            for record in records:
                self._send_to(tracker, "records", int(record["step"]), _record_values(record))

    def log_record(self, record: Mapping[str, Any]) -> None:
        """A record of metrics.jsonl, under its own names."""
        for tracker in list(self.active):
            self._send_to(tracker, "records", int(record["step"]), _record_values(record))

    def log_steps(self, step: int, line: Mapping[str, Any]) -> None:
        """A line of train_metrics.jsonl, under steps/."""
        for tracker in list(self.active):
            self._send_to(tracker, "steps", step, _step_values(line))

    def finish(self, step: int, selected: Mapping[str, Any], files: dict[str, str]) -> None:
        """The selected model's figures (selected/...), selected.json and the plots."""
        values = {SELECTED_PREFIX + k: v for k, v in _scalars(selected).items()}
        self._each(lambda t: t.finish(step, values, files))
        self.finished = True

    def close(self) -> None:
        self._each(lambda t: t.close(self.finished))
        for tracker in self.active:  # closed cleanly: what it was sent is written
            if tracker.durable_on_close:
                self.ids[tracker.name]["last_step"] = dict(self.sent[tracker.name])
        if self.active:
            self._save()
        self.active = []

    def _send_to(self, tracker, stream: str, step: int, values: dict[str, float]) -> None:
        """`values` at `step` to one tracker, unless it received that step before (a resumed
        run does the steps after its checkpoint again, with the same losses)."""
        sent = self.sent[tracker.name]
        if tracker not in self.active or step <= sent.get(stream, 0):
            return
        self._each(lambda t: t.log(step, values), only=tracker)
        sent[stream] = step
        if not tracker.durable_on_close:
            self.ids[tracker.name]["last_step"] = dict(sent)
            self._save()

    def _each(self, call, only=None) -> None:
        for tracker in [only] if only is not None else list(self.active):
            try:
                call(tracker)
            except Exception as err:  # noqa: BLE001 - a tracker must not end the training
                log.warning("tracker %s failed (%s: %s); the run goes on without it, its own "
                            "files are complete", tracker.name, type(err).__name__, err)
                self.active.remove(tracker)

    def _save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.ids, f, indent=2)
        os.replace(tmp, self.path)


class NoTrackers:
    """What processes other than 0 (and runs without W&B or MLflow) report to: nothing."""

    def catch_up(self, records, workdir, upto) -> None:
        pass

    def log_record(self, record) -> None:
        pass

    def log_steps(self, step, line) -> None:
        pass

    def finish(self, step, selected, files) -> None:
        pass

    def close(self) -> None:
        pass


def open_trackers(config: ml_collections.ConfigDict, workdir: str, chief: bool):
    if not chief or not any(name in _KINDS for name in config.trackers):
        return NoTrackers()
    return Trackers(config, workdir)


def _record_values(record: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in _scalars(record).items() if k != "step"}


def _step_values(line: Mapping[str, Any]) -> dict[str, float]:
    return {STEPS_PREFIX + k: v for k, v in _scalars(line).items() if k != "step"}


def _scalars(record: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.scalars(record).items()}


def _jsonl(path: str) -> list[dict[str, Any]]:
    """The whole lines of a JSON-lines file (a line a kill cut short is left out)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
