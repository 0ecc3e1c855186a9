"""A trained run read back from its workdir, for notebooks and scripts: its config, model,
variables and history, predictions on raw images, evaluation on a split, feature maps."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax.data.sources import DatasetInfo, Source, load_source
from resnet_jax.data.transforms import center_crop
from resnet_jax.training import experiment, metrics, selection
from resnet_jax.training.checkpoint import Checkpointer, selected_checkpoint
from resnet_jax.training.rundir import read_selected
from resnet_jax.training.config_json import run_config
from resnet_jax.training.evaluation import evaluate
from resnet_jax.training.losses import get_loss
from resnet_jax.training.state import TrainState
from resnet_jax.training.steps import eval_logits, make_eval_step
from resnet_jax.training import rundir

WHICH = ("selected", "best", "latest")


@dataclasses.dataclass
class Run:
    """What a training run left in its workdir, ready to use.

    Attributes:
      workdir: the run directory.
      config: the config it was trained with (config.json).
      model: the flax module, as the run built it.
      variables: {"params", "batch_stats"} of the checkpoint `which` (NumPy arrays): the
        trained weights, or their exponential moving average when `ema`.
      history: one record per evaluation (metrics.jsonl).
      step: the step of the checkpoint.
      which: "selected" (the model the run handed over: selected.json's), "best" (best
        validation metric) or "latest".
      ema: whether `variables` are the EMA weights.
    """

    workdir: str
    config: ml_collections.ConfigDict
    model: Any
    variables: dict[str, Any]
    history: list[dict[str, Any]]
    step: int
    which: str
    ema: bool = False

    @classmethod
    def load(cls, workdir: str, which: str = "selected", ema: bool | None = None) -> "Run":
        """The run in `workdir` at a checkpoint: "selected" (what the finished run chose:
        the best validation checkpoint, or its last step without validation; while it runs,
        the best checkpoint if there is one, else the latest), "best" or "latest".

        `ema`: True for the exponential moving average of the weights (a run with
        ema_decay > 0), False for the trained ones; None: as the run selected them."""
        if which not in WHICH:
            raise ValueError(f"which={which!r}; expected one of {WHICH}")
        config = run_config(workdir)
        info = experiment.info_of(config)
        model = experiment.build_model(config, config.num_classes or info.num_classes)
        chosen = read_selected(workdir)
        step = None
        if which == "selected":
            which, step = selected_checkpoint(workdir)
        ckpt = Checkpointer(rundir.path(workdir, rundir.CHECKPOINTS))
        try:
            restored = (ckpt.restore_step(which, step) if step is not None
                        else ckpt.restore_checked(None, which))
        finally:
            ckpt.close()
        if restored is None:
            raise FileNotFoundError(f"no {which} checkpoint under {workdir}/checkpoints")
        state, found = restored.state, restored.step
        if ema is None:  # as selected.json says, else as the best checkpoint was decided
            if chosen and step is not None:
                ema = chosen.get("weights") == "ema"
            elif which == "best":
                saved = restored.meta.get("decisions")
                ema = selection.best_weights(
                    config, saved and selection.Decisions.from_dict(saved)) == "ema"
            else:
                ema = False
        if ema and not state.get("ema"):
            raise ValueError(f"ema=True but run {workdir!r} kept no EMA weights (ema_decay=0)")
        source = state["ema"] if ema else state
        variables = {"params": source["params"], "batch_stats": source.get("batch_stats", {})}
        return cls(workdir, config, model, variables, metrics.read_metrics(workdir),
                   int(found), which, bool(ema))

    @property
    def splits(self) -> dict[str, str]:
        """The run's splits by role ("train", "validation" if it had one, "test"), each
        described; `evaluate` takes these names (or any split of the dataset)."""
        return experiment.split_names(self.config)

    @property
    def selected(self) -> dict[str, Any]:
        """What the finished run selected (selected.json): step, weights, the validation
        metric it was chosen by, and its test metrics read once; {} before it finished."""
        return read_selected(self.workdir)

    @property
    def info(self) -> DatasetInfo:
        """What the pipeline knows of the run's dataset (class names, mean, std...)."""
        return experiment.info_of(self.config)

    @property
    def class_names(self) -> tuple[str, ...]:
        n = self.config.num_classes or self.info.num_classes
        names = self.info.class_names
        return names if len(names) == n else tuple(str(i) for i in range(n))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the model's input."""
        return experiment.image_shape(self.config)

    def load_split(self, split: str = "test") -> Source:
        """A split as its source holds it: in-memory datasets as raw images (uint8, the
        dataset's shape) and labels; image folders and large tfds datasets as encoded files."""
        return load_source(self.config.dataset, split, self.config.data_dir or None,
                           self.config.data_source, self.config.holdout_fraction,
                           self.config.seed)

    def model_images(self, images: np.ndarray) -> np.ndarray:
        """Raw uint8 images (N, H, W, C) at the model's input size, still uint8:
        centre-cropped for variable-size datasets as the run's evaluation crops (size,
        crop_pct, interpolation), checked against the run's shape otherwise."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (N, H, W, C), got {images.dtype} "
                             f"{images.shape}")
        shape = self.image_shape
        if self.info.image_shape is None:
            options = experiment.eval_input(self.config, len(images))
            size = options.image_size or 224
            images = np.stack([center_crop(im, size, options.crop_pct, options.interpolation)
                               for im in images])
        elif images.shape[1:3] != shape[:2] or images.shape[-1] not in (1, shape[-1]):
            raise ValueError(f"images of shape {images.shape[1:]}; this run takes "
                             f"{self.info.image_shape}")
        return images

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """Raw uint8 images (N, H, W, C) as the model sees them (float32): cropped as
        `model_images`, channels repeated to RGB where the run did that, normalised, on the
        device as in the run's steps."""
        return np.asarray(self._device_input(self.model_images(images)))

    def predict(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Class probabilities (N, classes) for raw uint8 images of the dataset's shape
        (normalised on the device, inside the jitted prediction)."""
        return self._batched(self._probabilities, images, batch_size)

    def logits(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """The evaluation logits (N, classes) of raw uint8 images, before the softmax: what
        `export` writes for serving computes from `preprocess(images)`. With the run's
        `eval_flip` or `eval_shift`, the log of the probabilities averaged over each image's
        views (`steps.eval_logits`)."""
        return self._batched(self._logits, images, batch_size)

    def _batched(self, fn, images: np.ndarray, batch_size: int | None) -> np.ndarray:
        x = self.model_images(images)
        size = batch_size or self.config.eval_batch_size
        out = [np.asarray(fn(self.variables, x[i:i + size])) for i in range(0, len(x), size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

    def evaluate(self, split: str = "test", n: int = 0) -> dict[str, Any]:
        """Loss, accuracy, top-5 accuracy, per-class accuracy and the confusion matrix over
        every example of `split` (`n` of them, sampled across the classes, when n > 0): a
        role of `splits` ("train" is train less any held-out validation examples) or a split
        of the dataset."""
        source = experiment.load_split(self.config, split, n)
        state = TrainState(step=jnp.asarray(self.step, jnp.int32),
                           params=self.variables["params"],
                           batch_stats=self.variables["batch_stats"], opt_state={})
        return evaluate(self._eval_step, state, source, self.info,
                        experiment.eval_input(self.config, self.config.eval_batch_size))

    def preprocessing(self) -> dict[str, Any]:
        """How the run's input was made, as a weight file records it: mean and std on the
        [0, 1] scale, channel order, the evaluation crop, its share of the shorter side and
        the resize filter."""
        options = experiment.eval_input(self.config, self.config.eval_batch_size)
        info = self.info
        crop = (experiment.eval_image_size(self.config) or 224) if info.image_shape is None \
            else self.image_shape[0]
        return {"mean": tuple(info.mean), "std": tuple(info.std),
                "channel_order": info.channel_order, "crop": int(crop),
                "crop_pct": float(options.crop_pct) if info.image_shape is None else 1.0,
                "interpolation": options.interpolation}

    def export(self, path: str, format: str = "pytorch", layout: str = "timm") -> str:
        """Write the model for use outside this project; returns the file or folder written.

        format="pytorch": `path`/model.safetensors, the state_dict that timm's
        (layout="timm") or torchvision's (layout="torchvision") model of the run's name loads
        with strict=True, and `path`/config.json as timm writes it, with the preprocessing.
        format="onnx" or "stablehlo": `path`/model.onnx (opset 18) or `path`/model.stablehlo
        (`jax.export`, serialized), computing `logits` from `preprocess(images)` for any
        batch size on plain XLA operations in float32, whatever CPU kernels and compute
        dtype the run trained with, BatchNorm folded in, no dropout; beside it
        preprocessing.json (mean, std, crop, layout, the input and output tensors, the
        class names) and class_names.txt."""
        from resnet_jax.export import check_format, write_serving

        check_format(format)
        if format != "pytorch":
            return write_serving(path, format, self._serving_logits(),
                                         _float32(self.variables), self.image_shape,
                                         self._serving_description(), self.class_names)
        from safetensors.numpy import save_file

        from resnet_jax.convert import timm as timm_convert
        from resnet_jax.convert import torchvision as tv_convert

        layouts = {"timm": timm_convert, "torchvision": tv_convert}
        if layout not in layouts:
            raise ValueError(f"layout={layout!r}; expected one of {tuple(layouts)}")
        variables = jax.tree.map(np.asarray, self.variables)
        state_dict = layouts[layout].export(variables, self.config.model)
        config = timm_convert.export_config(self.config.model, variables, self.preprocessing())
        os.makedirs(path, exist_ok=True)
        save_file(state_dict, os.path.join(path, timm_convert.WEIGHTS_FILE))
        with open(os.path.join(path, timm_convert.CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
        return path

    def _serving_logits(self):
        """eval_logits of the run's model rebuilt on plain XLA operations in float32, one
        traced copy per view (no loop for the exporters)."""
        config = self.config.copy_and_resolve_references()
        with config.unlocked():
            config.cpu_kernels, config.dtype, config.sync_batch_norm = False, "float32", False
        model = experiment.build_model(config, len(self.class_names))
        flip, shift = self._views
        return lambda variables, images: eval_logits(model, variables, images, flip, shift,
                                                     unroll=True)

    def _serving_description(self) -> dict[str, Any]:
        source_channels = (self.info.image_shape or (0, 0, 3))[-1]
        return {**self.preprocessing(),
                "repeat_gray_to_rgb": bool(source_channels == 1 and self.image_shape[-1] == 3),
                "scale": "x / 255, then (x - mean) / std per channel",
                "eval_flip": self._views[0], "eval_shift": self._views[1],
                "model": self.config.model, "step": self.step, "weights":
                "ema" if self.ema else "trained", "run": os.path.abspath(self.workdir)}

    def feature_maps(self, images: np.ndarray, module: str) -> np.ndarray:
        """The output of submodule `module` (e.g. "layer2_0", "conv1") for raw images."""
        x = jnp.asarray(self.preprocess(images))
        _, state = self.model.apply(
            self.variables, x, capture_intermediates=lambda m, _: m.name == module,
            mutable=["intermediates"])
        found = state.get("intermediates", {}).get(module)
        if found is None:
            names = sorted(self.variables["params"])
            raise ValueError(f"no top-level module {module!r}; modules: {', '.join(names)}")
        return np.asarray(found["__call__"][0])

    @property
    def _views(self) -> tuple[bool, int]:
        """The config's test-time views: (eval_flip, eval_shift); runs from before
        eval_shift existed have none shifted."""
        return (bool(self.config.get("eval_flip", False)),
                int(self.config.get("eval_shift", 0)))

    @functools.cached_property
    def _logits(self):
        options = experiment.jit_options(self.config)
        flip, shift = self._views
        prepare = experiment.device_input(self.config, train=False)
        return jax.jit(lambda v, x: eval_logits(self.model, v, prepare(x), flip, shift),
                       compiler_options=options("eval") if options else None)

    @functools.cached_property
    def _probabilities(self):
        logits = self._logits
        return lambda v, x: jax.nn.softmax(logits(v, x))

    @functools.cached_property
    def _device_input(self):
        return jax.jit(experiment.device_input(self.config, train=False))

    @functools.cached_property
    def _eval_step(self):
        step = make_eval_step(self.model, len(self.class_names), get_loss(self.config.loss),
                              flip=self._views[0],
                              preprocess=experiment.device_input(self.config, train=False),
                              shift=self._views[1])
        options = experiment.jit_options(self.config)
        return jax.jit(step, compiler_options=options("eval") if options else None)



def _float32(variables):
    """The variables with every floating-point leaf in float32, as NumPy arrays."""
    return jax.tree.map(lambda a: np.asarray(a, np.float32)
                        if np.issubdtype(np.asarray(a).dtype, np.floating) else np.asarray(a),
                        variables)
