"""Where metrics go: metrics.jsonl, TensorBoard, and the plots of a finished run."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np


class MetricWriter:
    """Appends one JSON object per evaluation to metrics.jsonl and mirrors it to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, record["step"])
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def rewrite_metrics(workdir: str, records: list[dict[str, Any]]) -> None:
    """Replace metrics.jsonl by `records` (atomically), e.g. after resuming from an earlier step."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path) and not records:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of metrics.jsonl ([] if there is none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize_eval(sums: dict[str, np.ndarray]) -> dict[str, Any]:
    """Accuracy and loss from summed eval-step outputs (exact over the split)."""
    count = float(sums["count"])
    confusion = np.rint(np.asarray(sums["confusion"], np.float64))  # exact integer counts
    per_class = np.diag(confusion) / np.maximum(confusion.sum(1), 1)
    return {
        "loss": float(sums["loss"]) / count,
        "top1": float(sums["top1"]) / count,
        "top5": float(sums["top5"]) / count,
        "count": int(round(count)),
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion.astype(np.int64),
    }


def plot_curves(records: Sequence[dict[str, Any]], path: str) -> None:
    """Loss and accuracy per epoch, train and test, side by side."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in records], "o-", label="train")
        ax.plot(epochs, [r[f"test_{key}"] for r in records], "s-", label="test")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    best = max(records, key=lambda r: r["test_accuracy"])
    axes[1].set_title(f"best test accuracy {best['test_accuracy']:.4f} (epoch {best['epoch']:g})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)


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
