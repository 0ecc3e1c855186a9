"""Where metrics go: running means of whatever a step returns, metrics.jsonl and
train_metrics.jsonl, TensorBoard, the progress bar, and the plots of a finished run.

Nothing here knows a metric's name: a key added to the train step's dict is averaged, shown
and written like the others.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np
from resnet_jax.training import rundir


class Mean:
    """Running means of named scalars (every key seen, each over the values it was given)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def result(self) -> dict[str, float]:
        return {key: total / self.counts[key] for key, total in self.sums.items()}

    def __bool__(self) -> bool:
        return bool(self.counts)


class Throughput:
    """Images per second and the share of the time spent waiting for data (`data_wait`),
    over windows of steps and over all windows since the last `period()`; time between
    `restart()` and the window before it (evaluation, start-up) not counted."""

    def __init__(self, batch_size: int, step: int):
        self.batch_size = batch_size
        self.images, self.seconds, self.waited_total = 0, 0.0, 0.0
        self.restart(step)

    def restart(self, step: int) -> None:
        self.start, self.step, self.waited = time.perf_counter(), step, 0.0

    def wait(self, seconds: float) -> None:
        """Count `seconds` the loop waited for the next batch."""
        self.waited += seconds

    def window(self, step: int) -> dict[str, float]:
        """{"images_per_second", "data_wait"} since the last window (or restart), which
        starts the next one."""
        now = time.perf_counter()
        images, seconds = (step - self.step) * self.batch_size, max(now - self.start, 1e-9)
        self.images, self.seconds = self.images + images, self.seconds + seconds
        self.waited_total += self.waited
        out = {"images_per_second": images / seconds, "data_wait": min(self.waited / seconds, 1.0)}
        self.start, self.step, self.waited = now, step, 0.0
        return out

    def period(self) -> dict[str, float]:
        """The same over the windows since the last call."""
        seconds = max(self.seconds, 1e-9)
        out = {"images_per_second": self.images / seconds,
               "data_wait": min(self.waited_total / seconds, 1.0)}
        self.images, self.seconds, self.waited_total = 0, 0.0, 0.0
        return out


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over steps, on stderr; refreshed every 30 s when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30.0,
                file=sys.stderr)


def show(bar, step: int, values: Mapping[str, float]) -> None:
    """Move `bar` to `step` and show every value in its postfix."""
    bar.set_postfix({key: f"{value:.4g}" for key, value in values.items()}, refresh=False)
    bar.update(step - bar.n)  # redraws at most every `mininterval` seconds


def summary_line(r: dict[str, Any]) -> str:
    """An evaluation record in one line: the period's train and evaluation loss and accuracy."""
    line = (f"epoch {r['epoch']:g}: train loss {r.get('train_loss', float('nan')):.4f} acc "
            f"{r.get('train_accuracy', float('nan')):.4f}")
    for split in ("val", "val_ema", "test", "test_ema"):
        if f"{split}_loss" in r:
            line += f" | {split} loss {r[f'{split}_loss']:.4f} acc {r[f'{split}_accuracy']:.4f}"
    return line + f" | {r['images_per_second']:.0f} img/s"


def append_jsonl(path: str, record: Mapping[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The plain numbers of a record (what TensorBoard and the progress bar can show)."""
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without PyTorch. tensorboardX imports torch
    wherever it is installed, only to accept its tensors (which nothing here passes): 0.8-1.3 s
    of every run's start. While `sys.modules` maps "torch" to None, `import torch` raises
    ImportError, which tensorboardX catches; the entry goes again at once, so a later
    `import torch` loads it as usual. Where torch is already imported, nothing changes."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter


class MetricWriter:
    """Appends one JSON object per evaluation to metrics.jsonl and mirrors its numbers to
    TensorBoard (when `tensorboard`)."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
        self.path = rundir.path(workdir, rundir.METRICS)
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            self._tb = _summary_writer()(rundir.path(workdir, rundir.TENSORBOARD))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, record)
        if self._tb is None:
            return
        for key, value in scalars(record).items():
            if key not in ("step", "epoch"):
                self._tb.add_scalar(key, value, record["step"])
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def rewrite_metrics(workdir: str, records: list[dict[str, Any]]) -> None:
    """Replace metrics.jsonl by `records` (atomically), e.g. after resuming from an earlier step."""
    path = rundir.path(workdir, rundir.METRICS)
    if not os.path.exists(path) and not records:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of metrics.jsonl ([] if there is none)."""
    path = rundir.path(workdir, rundir.METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize_eval(sums: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Means over the split from summed eval-step outputs (exact: every sum over the count),
    the count, the confusion matrix and the per-class accuracy."""
    count = float(sums["count"])
    confusion = np.rint(np.asarray(sums["confusion"], np.float64))  # exact integer counts
    out: dict[str, Any] = {key: float(value) / count for key, value in sums.items()
                           if key not in ("count", "confusion")}
    out["count"] = int(round(count))
    out["per_class_accuracy"] = (np.diag(confusion) / np.maximum(confusion.sum(1), 1)).tolist()
    out["confusion"] = confusion.astype(np.int64)
    return out


def plot_curves(records: Sequence[dict[str, Any]], path: str) -> None:
    """Loss and accuracy per epoch, side by side: train, and each evaluated split (val,
    val_ema, test, test_ema) where the records have it."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("loss", "accuracy")):
        for split, marker in (("train", "o-"), ("val", "s-"), ("val_ema", "^-"),
                              ("test", "D-"), ("test_ema", "v-")):
            points = [(r["epoch"], r[f"{split}_{key}"]) for r in records
                      if f"{split}_{key}" in r]
            if points:
                ax.plot(*zip(*points), marker, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    split = next((s for s in ("val", "test") if any(f"{s}_accuracy" in r for r in records)),
                 None)
    if split:
        best = max((r for r in records if f"{split}_accuracy" in r),
                   key=lambda r: r[f"{split}_accuracy"])
        axes[1].set_title(f"best {split} accuracy {best[f'{split}_accuracy']:.4f} "
                          f"(epoch {best['epoch']:g})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)


def write_json(path: str, value: Any) -> None:
    """`value` as indented JSON at `path`, atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def plot_confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], path: str) -> None:
    """Row-normalised confusion matrix (true class x predicted class) with counts."""
    from matplotlib.figure import Figure

    n = confusion.shape[0]
    names = list(class_names) if len(class_names) == n else [str(i) for i in range(n)]
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    size = max(5, 0.6 * n) if n <= 30 else 12
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        ax.set_xticks(range(n), names, rotation=45, ha="right")
        ax.set_yticks(range(n), names)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
