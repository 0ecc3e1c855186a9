"""resnet_jax: residual networks and AlexNet in JAX/Flax for image classification.

The public face, for scripts and notebooks:

    import resnet_jax
    config = resnet_jax.load_config("fashion_mnist", num_epochs=2)
    resnet_jax.train(config, "runs/fm")              # the same run as resnet-jax-train
    run = resnet_jax.Run.load("runs/fm")             # config, model, variables, history
    probabilities = run.predict(uint8_images)
    model = resnet_jax.get_model("resnet50", num_classes=10)
    resnet_jax.sweep("fashion_mnist", "runs/lr", grid={"learning_rate": [0.1, 0.2]}, seeds=3)
    resnet_jax.train_population([config_a, config_b], ["runs/a", "runs/b"])  # in one step
    results = resnet_jax.load_runs("runs/lr")       # the runs and the table of means, stds

Importing it starts no compiler, reads no data and changes no process-wide setting.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from resnet_jax.models import get_model, list_models
from resnet_jax.sweeps import compare, load_runs, sweep
from resnet_jax.configs import load_config
from resnet_jax.training.loop import train_and_evaluate
from resnet_jax.training.population import train_population, train_population_config
from resnet_jax.training.run import Run

__version__ = "0.1.0"


def train(config: ml_collections.ConfigDict | str, workdir: str
          ) -> dict[str, Any] | list[dict[str, Any]]:
    """Train `config` (a config, or a config name/path for `load_config`) into `workdir`:
    the same run as the train command, `resnet-jax-train` (resumes, locks the workdir, saves).
    Returns the last evaluation record; with `population_size` N, the N members' (each an
    ordinary run in workdir/seed=S, trained in one step: `train_population`)."""
    if isinstance(config, str):
        config = load_config(config)
    if config.population_size:
        return train_population_config(config, workdir)
    return train_and_evaluate(config, workdir)


__all__ = ["Run", "compare", "get_model", "list_models", "load_config", "load_runs", "sweep",
           "train", "train_population"]
