"""The training configuration's schema: every field declared once, with its type, default,
allowed values and meaning, grouped by concern, and the validation that names the bad value
before any data is read or any step is compiled.

A config is a flat `ml_collections.ConfigDict` (so `--config.num_epochs=3` overrides work);
`SCHEMA` groups its fields into sections. Durations are written in the unit natural to the
recipe (`num_epochs` or `num_steps`, `warmup_epochs`, `lr_boundaries` in steps or epochs,
`eval_every_epochs`, `checkpoint_every_steps` or `checkpoint_every_epochs`);
`durations.durations()` alone turns them into steps. A run's config as JSON (its
config.json): `config_json`; config files by name: `resnet_jax.configs`.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import ml_collections

from resnet_jax.data.sources import DATA_SOURCES, DATASETS
from resnet_jax.data.autoaugment import BINS, POLICIES
from resnet_jax.data.images import INTERPOLATIONS
from resnet_jax.data.transforms import AUGMENTATIONS, CHANNEL_ORDERS
from resnet_jax.models import get_spec
from resnet_jax.training.losses import LOSSES
from resnet_jax.training.optim import OPTIMIZERS, SCHEDULES, WEIGHT_DECAY_MODES
from resnet_jax.training.parallel import STRATEGIES
from resnet_jax.training.transfer import FREEZE_CHOICES

DTYPES = ("float32", "bfloat16")
BOUNDARY_UNITS = ("steps", "epochs")
MODES = ("auto", "min", "max")
SELECTION_WEIGHTS = ("auto", "either")
EVAL_METRICS = ("loss", "accuracy", "top5_accuracy")
TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: default (its type is the field's type), meaning, allowed values."""

    default: Any
    help: str
    choices: tuple | None = None
    bounds: str = ""  # a key of _BOUNDS


_BOUNDS = {
    "> 0": (lambda v: v > 0, "must be a positive number"),
    ">= 0": (lambda v: v >= 0, "must be >= 0"),
    ">= 1": (lambda v: v >= 1, "must be >= 1"),
    "[0, 1)": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "[0, 1]": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
}

SCHEMA: dict[str, dict[str, Field]] = {
    "model": {
        "model": Field("cifar_resnet20", "registry name (resnet_jax.models.list_models())"),
        "num_classes": Field(0, "0: the dataset's class count", bounds=">= 0"),
        "dtype": Field("float32", "compute dtype; parameters stay float32", DTYPES),
        "model_overrides": Field(ml_collections.ConfigDict(),
                                 "extra model fields, e.g. shortcut='projection'"),
        "drop_path_rate": Field(0.0, "stochastic depth (Huang et al. 2016) of the last "
                                     "residual block, rising linearly from 0 over the blocks "
                                     "as timm; none at evaluation; 0: off", bounds="[0, 1)"),
        "init_from": Field("", "a converted-weights dir or a run's workdir to start from"),
        "freeze": Field("", "'backbone': train only the head (fc, fc_hidden; AlexNet's fc8)",
                        FREEZE_CHOICES),
        "cpu_kernels": Field(True, "on the CPU backend: resnet_jax.ops.cpu's layers, XLA "
                                   "options and malloc setting (ignored on GPU/TPU)"),
        "cpu_conv_dtype": Field("float32", "with cpu_kernels on the CPU backend: the type "
                                           "oneDNN's convolutions multiply in; bfloat16 rounds "
                                           "their operands and accumulates in float32 (CPUs "
                                           "with AVX512-BF16 or AMX; float32 with a warning "
                                           "elsewhere)", ("float32", "bfloat16")),
    },
    "data": {
        "dataset": Field("fashion_mnist", "dataset name", tuple(DATASETS)),
        "data_source": Field("auto", "where the data comes from", DATA_SOURCES),
        "data_dir": Field("", "tfds data_dir, the directory of IDX files, or an image folder "
                              "(DIR/train/CLASS/*, optionally DIR/val/CLASS/*)"),
        "holdout_fraction": Field(0.1, "image folders without val/: the fraction of train/ "
                                       "held out as 'val' (chosen by the seed)",
                                  bounds="[0, 1)"),
        "data_workers": Field(0, "input worker processes that decode and augment (0: in the "
                                 "training process); the batches do not depend on it",
                              bounds=">= 0"),
        "skip_corrupt_images": Field(False, "an image that cannot be decoded is logged with "
                                            "its path and skipped (counted as corrupt_images) "
                                            "instead of stopping the run"),
        "eval_split": Field("test", "the test split: evaluated once at the end (and after each "
                                    "period with test_every_period), never for a decision"),
        "validation_split": Field(0.0, "fraction of train held out for validation (chosen by "
                                       "the seed); the best checkpoint, the plateau schedule and "
                                       "early stopping decide on it", bounds="[0, 1)"),
        "validation_dataset_split": Field("", "the dataset's own validation split instead (e.g. "
                                              "'validation' in tfds, 'val' of an image folder)"),
        "eval_flip": Field(False, "evaluation and predictions average the class probabilities "
                                  "of each image and its left-right mirror image"),
        "eval_shift": Field(0, "> 0: evaluation and predictions also average the views of each "
                               "image moved this many pixels up, down, left and right (edge "
                               "rows repeated; each with its mirror under eval_flip), together "
                               "weighing as much as the image itself", bounds=">= 0"),
        "test_every_period": Field(False, "also evaluate the test split after each period "
                                          "(test_* in metrics.jsonl, reported only)"),
        "image_size": Field(0, "variable-size datasets (ImageNet): crop size; 0: 224",
                            bounds=">= 0"),
        "eval_image_size": Field(0, "variable-size datasets: evaluation's crop size (FixRes: "
                                    "larger than the training crop); 0: image_size",
                                 bounds=">= 0"),
        "eval_crop_pct": Field(0.0, "variable-size datasets: evaluation's centre crop as a "
                                    "share of the shorter side (0.875: 224 of 256); 0: the "
                                    "one recorded with init_from's weights, else 0.875",
                               bounds="[0, 1]"),
        "interpolation": Field("", "resize filter of decoded images: 'bilinear' or "
                                   "'bicubic'; '': the one recorded with init_from's weights, "
                                   "else bilinear", ("",) + INTERPOLATIONS),
        "augment": Field("", "train augmentation; '': the dataset's default",
                         ("",) + AUGMENTATIONS),
        "alternate_flips": Field(False, "'flip'/'crop_flip' mirror a random half of the "
                                        "images in even epochs and the other half in odd "
                                        "ones (Jordan 2024); False: each flip drawn anew"),
        "channels": Field(0, "0: the dataset's; 3: grayscale repeated to RGB", (0, 1, 3)),
        "random_erasing": Field(0.0, "probability per training image of erasing a random "
                                     "rectangle (2-40% of the area) with random values "
                                     "(Zhong et al. 2020); 0: off", bounds="[0, 1)"),
        "input_mean": Field((), "per-channel mean on the [0, 1] scale, in input_channel_order; "
                                "(): the preprocessing recorded with init_from's weights, "
                                "else the dataset's"),
        "input_std": Field((), "per-channel std on the [0, 1] scale; (): as input_mean"),
        "input_channel_order": Field("", "'RGB' or 'BGR' (channels reversed before "
                                         "normalising); '': as input_mean, else RGB",
                                     ("",) + CHANNEL_ORDERS),
        "auto_augment": Field("", "per-image automatic augmentation after crop and flip: "
                                  "'rand_augment' (Cubuk et al. 2020) or "
                                  "'trivial_augment_wide' (Muller & Hutter 2021); '': off",
                              ("",) + POLICIES),
        "rand_augment_num_ops": Field(2, "RandAugment: operations per image", bounds=">= 1"),
        "rand_augment_magnitude": Field(9, "RandAugment: magnitude bin, 0-30", bounds=">= 0"),
        "num_repeats": Field(1, "repeated augmentation (Hoffer et al. 2020; DeiT, timm's "
                                "RepeatAugSampler): each training image this many times per "
                                "global batch, on different devices, each copy augmented "
                                "apart; an epoch keeps its steps; 1: off", bounds=">= 1"),
        "train_subset": Field(0, ">0: train on N examples only, a sample across the classes "
                                "in proportion, chosen by the seed", bounds=">= 0"),
        "eval_subset": Field(0, ">0: evaluate (validation and test) on N examples only, "
                               "sampled as train_subset", bounds=">= 0"),
    },
    "optimizer": {
        "batch_size": Field(128, "global batch, over all devices and processes", bounds="> 0"),
        "optimizer": Field("sgd", "update rule ('lamb': You et al. 2020, Adam's update and "
                                  "the decay scaled by each tensor's trust ratio)", OPTIMIZERS),
        "learning_rate": Field(0.1, "peak learning rate", bounds="> 0"),
        "momentum": Field(0.9, "SGD and LARS momentum", bounds="[0, 1)"),
        "nesterov": Field(False, "Nesterov momentum (SGD, LARS)"),
        "adam_b1": Field(0.9, "Adam's first-moment decay", bounds="[0, 1)"),
        "adam_b2": Field(0.999, "Adam's second-moment decay", bounds="[0, 1)"),
        "adam_eps": Field(1e-8, "Adam's epsilon", bounds="> 0"),
        "lars_trust_coefficient": Field(0.001, "LARS' trust coefficient (You et al. 2017)",
                                        bounds="> 0"),
        "lars_eps": Field(0.0, "LARS: added to the norms of the trust ratio", bounds=">= 0"),
        "weight_decay": Field(1e-4, "weight decay factor", bounds=">= 0"),
        "weight_decay_mode": Field("l2", "'l2': added to the gradient; 'decoupled': to the "
                                         "update (Loshchilov & Hutter 2019)", WEIGHT_DECAY_MODES),
        "weight_decay_all": Field(False, "decay biases and BatchNorm parameters too"),
        "grad_clip": Field(0.0, ">0: clip gradients to this global norm", bounds=">= 0"),
        "grad_accumulation_steps": Field(1, "split each device's batch into this many "
                                            "micro-batches run in turn, gradients averaged: "
                                            "the batch's update from less activation memory",
                                         bounds=">= 1"),
        "loss": Field("softmax_cross_entropy", "training and evaluation loss", tuple(LOSSES)),
        "label_smoothing": Field(0.0, "label smoothing of the training loss", bounds="[0, 1)"),
        "bce_target_threshold": Field(0.0, "sigmoid_cross_entropy: each target (after "
                                           "smoothing and mixing) above it becomes 1, others "
                                           "0 (timm's BinaryCrossEntropy target_threshold; "
                                           "RSB: 0.2); 0: off", bounds="[0, 1)"),
        "mixup_alpha": Field(0.0, "mixup (Zhang et al. 2018): Beta(alpha, alpha) weights of "
                                  "each image and the next in the batch; 0: off",
                             bounds=">= 0"),
        "cutmix_alpha": Field(0.0, "CutMix (Yun et al. 2019): a box of the next image, area "
                                   "1 - lam with lam ~ Beta(alpha, alpha); 0: off (with "
                                   "mixup too: one of the two per batch)", bounds=">= 0"),
    },
    "schedule": {
        "num_epochs": Field(10, "training length in epochs (unless num_steps)", bounds="> 0"),
        "num_steps": Field(0, ">0: training length in steps instead of num_epochs",
                           bounds=">= 0"),
        "schedule": Field("cosine", "learning-rate schedule", SCHEDULES),
        "warmup_epochs": Field(0.0, "linear warm-up (cosine, piecewise)", bounds=">= 0"),
        "warmup_init_fraction": Field(0.0, "the warm-up's first rate, as a fraction of the peak",
                                      bounds="[0, 1)"),
        "cosine_end_fraction": Field(0.0, "cosine: the last rate, as a fraction of the peak",
                                     bounds="[0, 1)"),
        "lr_boundaries": Field((), "piecewise: where the learning rate is multiplied"),
        "lr_boundaries_unit": Field("steps", "unit of lr_boundaries", BOUNDARY_UNITS),
        "lr_decay_factor": Field(0.1, "piecewise: the multiplier at each boundary",
                                 bounds="> 0"),
        "onecycle_pct_start": Field(0.25, "onecycle: fraction of steps rising", bounds="[0, 1)"),
        "onecycle_div_factor": Field(25.0, "onecycle: peak / initial rate", bounds="> 0"),
        "onecycle_final_div_factor": Field(1e4, "onecycle: initial / final rate",
                                           bounds="> 0"),
        "onecycle_anneal": Field("cos", "onecycle: how the rate rises and falls, 'cos' or "
                                        "'linear' (as PyTorch's OneCycleLR anneal_strategy)",
                                 ("cos", "linear")),
        "plateau_monitor": Field("val_loss", "plateau: the validation metric watched after "
                                             "each period (val_loss, val_accuracy, "
                                             "val_top5_accuracy, val_ema_*)"),
        "plateau_mode": Field("auto", "plateau: 'min' or 'max' is better; 'auto': max for "
                                      "accuracies, min otherwise (Keras)", MODES),
        "plateau_factor": Field(0.1, "plateau: the learning rate's multiplier on a plateau",
                                bounds="[0, 1)"),
        "plateau_patience": Field(5, "plateau: periods without improvement before a cut",
                                  bounds=">= 0"),
        "plateau_cooldown": Field(0, "plateau: periods after a cut before counting again",
                                  bounds=">= 0"),
        "plateau_min_delta": Field(1e-4, "plateau: the least change that counts as an "
                                         "improvement", bounds=">= 0"),
        "plateau_min_lr": Field(0.0, "plateau: the learning rate is never cut below this",
                                bounds=">= 0"),
    },
    "selection": {
        "selection_metric": Field("val_accuracy", "the validation metric that picks the best "
                                                  "checkpoint (val_* or, for the EMA weights, "
                                                  "val_ema_*)"),
        "selection_mode": Field("auto", "'min', 'max' or 'auto' (max for accuracies)", MODES),
        "selection_weights": Field("auto", "the weights selection compares: 'auto' (the EMA "
                                           "weights for a val_ema_* metric, else the trained "
                                           "ones) or 'either' (at each evaluation the trained "
                                           "and the EMA weights, on selection_metric and its "
                                           "val_ema_ twin; needs ema_decay > 0 and a val_* "
                                           "metric)", SELECTION_WEIGHTS),
        "early_stopping_patience": Field(0, ">0: stop after this many periods without "
                                            "improvement of selection_metric", bounds=">= 0"),
        "early_stopping_min_delta": Field(0.0, "early stopping: the least change that counts "
                                               "as an improvement", bounds=">= 0"),
        "ema_decay": Field(0.0, "exponential moving average of parameters and batch statistics "
                                "with this decay per step, evaluated as val_ema_*/test_ema_*; "
                                "0: off", bounds="[0, 1)"),
        "ema_warmup": Field(True, "EMA decay min(ema_decay, (1 + step) / (10 + step)), as "
                                  "tf.train.ExponentialMovingAverage with num_updates"),
    },
    "devices": {
        "parallel": Field("auto", "how the step runs on devices ('auto': 'single' on one "
                                  "device, 'sharded' on several)", STRATEGIES),
        "sync_batch_norm": Field(False, "BatchNorm statistics over all devices"),
        "distributed": Field(False, "jax.distributed.initialize() with cluster detection"),
        "coordinator_address": Field("", "explicit multi-process set-up: HOST:PORT"),
        "num_processes": Field(0, "explicit multi-process set-up: process count",
                               bounds=">= 0"),
        "process_id": Field(-1, "explicit multi-process set-up: this process (-1: from env)"),
    },
    "run": {
        "seed": Field(0, "initialisation, data order, augmentation and dropout"),
        "data_seed": Field(-1, "the data's own seed: training order, augmentation draws, "
                               "held-out validation examples and subsets (-1: seed)"),
        "population_size": Field(0, ">=1: train this many members in one step (seeds seed, "
                                    "seed + 1, ...), each an ordinary run in WORKDIR/seed=S "
                                    "(resnet_jax.training.population); 0: one run",
                                 bounds=">= 0"),
        "population_map": Field("auto", "how a population's step runs its members: 'vmap' "
                                        "(one batched program: wide kernels for accelerators), "
                                        "'unroll' (each member's own step side by side in one "
                                        "program: the single run's kernels, bit for bit); "
                                        "'auto': unroll on the CPU, vmap elsewhere",
                                ("auto", "vmap", "unroll")),
        "population_data": Field("own", "a population's data: 'own' (each member its own "
                                        "order, as separate runs) or 'shared' (every member "
                                        "the first one's data_seed: only initialisation, "
                                        "dropout and mixing draws differ)", ("own", "shared")),
        "eval_batch_size": Field(500, "global evaluation batch (rounded up to a multiple of "
                                      "the device count on several devices)", bounds="> 0"),
        "eval_every_epochs": Field(1, "evaluate (and checkpoint) every N epochs", bounds=">= 1"),
        "checkpoint_every_steps": Field(0, ">0: also checkpoint every N steps", bounds=">= 0"),
        "checkpoint_every_epochs": Field(0, ">0: also checkpoint every N epochs (in steps: "
                                            "as many as the batch size and the held-out "
                                            "split make; not with checkpoint_every_steps)",
                                         bounds=">= 0"),
        "keep_checkpoints": Field(2, "latest checkpoints kept", bounds=">= 1"),
        "log_every_steps": Field(20, "train metrics window (progress bar, "
                                     "train_metrics.jsonl)", bounds=">= 1"),
        "halt_after_steps": Field(0, ">0: save and stop at this step, as if interrupted",
                                  bounds=">= 0"),
        "skip_nonfinite_steps": Field(False, "skip a NaN/Inf step instead of stopping"),
        "progress_bar": Field(True, "show a progress bar (process 0)"),
        "profile_steps": Field((), "(first, last): a jax.profiler trace of steps first..last "
                                   "(from 1) in WORKDIR/profile, for TensorBoard or XProf; "
                                   "(): none"),
        "trackers": Field(("tensorboard",), "where the run reports besides metrics.jsonl: "
                                            "any of 'tensorboard', 'wandb' (offline unless "
                                            "$WANDB_MODE says otherwise), 'mlflow' "
                                            "($MLFLOW_TRACKING_URI, else MLflow's default)"),
        "tracker_project": Field("resnet_jax", "the W&B project; the MLflow experiment when "
                                               "tracker_group is empty"),
        "tracker_group": Field("", "the W&B group and MLflow experiment of a sweep's runs "
                                   "(sweeps set it to the sweep's name)"),
        "tracker_name": Field("", "the tracked run's name ('': the workdir's name)"),
        "compilation_cache": Field("auto", "jax's persistent compilation cache: 'auto' "
                                           "($JAX_COMPILATION_CACHE_DIR, else "
                                           "~/.cache/resnet_jax/jax), a directory, or 'off' "
                                           "(or '')"),
    },
}

FIELDS: dict[str, Field] = {name: f for section in SCHEMA.values() for name, f in section.items()}


def base_config() -> ml_collections.ConfigDict:
    """Every field at its default; experiment configs override what they need."""
    return ml_collections.ConfigDict(
        {name: (ml_collections.ConfigDict() if isinstance(f.default, ml_collections.ConfigDict)
                else f.default) for name, f in FIELDS.items()})


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (tuple, list)):
        return "sequence"
    if isinstance(value, (dict, ml_collections.ConfigDict)):
        return "mapping"
    return type(value).__name__


def unknown_field_error(name: str) -> ValueError:
    """The error for a field the schema does not declare, with the closest declared name."""
    close = difflib.get_close_matches(name, list(FIELDS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown config field {name!r}{hint}")


def _integer_field(name: str) -> bool:
    default = FIELDS[name].default
    return isinstance(default, int) and not isinstance(default, bool)


def _check_field(name: str, value: Any) -> None:
    f = FIELDS[name]
    if _kind(value) != _kind(f.default):
        raise ValueError(f"{name}={value!r} has type {type(value).__name__}; expected "
                         f"{_kind(f.default)} like the default {f.default!r}")
    if _integer_field(name) and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name}={value!r} must be an integer")
    if f.choices is not None and value not in f.choices:
        raise ValueError(f"{name}={value!r}; expected one of {f.choices}")
    if f.bounds:
        ok, message = _BOUNDS[f.bounds]
        if not ok(value):
            raise ValueError(f"{name}={value!r} {message}")


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Raise a ValueError naming the first field whose value cannot work."""
    for name in c.keys():
        if name not in FIELDS:
            raise unknown_field_error(name)
        _check_field(name, c[name])
    missing = sorted(set(FIELDS) - set(c.keys()))
    if missing:
        raise ValueError(f"config lacks field(s) {missing}; start from base_config()")
    get_spec(c.model)  # names the known models
    if c.checkpoint_every_steps and c.checkpoint_every_epochs:
        raise ValueError(f"checkpoint_every_steps={c.checkpoint_every_steps} and "
                         f"checkpoint_every_epochs={c.checkpoint_every_epochs}: set one of "
                         "them and the other to 0")
    if c.schedule == "piecewise" and not len(c.lr_boundaries):
        raise ValueError("schedule='piecewise' needs lr_boundaries")
    if len(c.input_mean) != len(c.input_std) or any(s <= 0 for s in c.input_std):
        raise ValueError(f"input_mean={tuple(c.input_mean)} and input_std={tuple(c.input_std)}: "
                         f"expected as many means as positive stds (one, or one per channel)")
    if c.rand_augment_magnitude >= BINS:
        raise ValueError(f"rand_augment_magnitude={c.rand_augment_magnitude}; expected "
                         f"0..{BINS - 1}")
    if any(t not in TRACKERS for t in c.trackers) or len(set(c.trackers)) != len(c.trackers):
        raise ValueError(f"trackers={tuple(c.trackers)!r}; expected distinct names among "
                         f"{TRACKERS}")
    if len(c.profile_steps) not in (0, 2) or (
            len(c.profile_steps) and not 1 <= c.profile_steps[0] <= c.profile_steps[1]):
        raise ValueError(f"profile_steps={tuple(c.profile_steps)}; expected (first, last) with "
                         f"1 <= first <= last, or () for no profile")
    if c.num_repeats > c.batch_size:
        raise ValueError(f"num_repeats={c.num_repeats} is more than batch_size="
                         f"{c.batch_size}: each global batch holds batch_size / num_repeats "
                         "images, each num_repeats times")
    if c.bce_target_threshold and c.loss != "sigmoid_cross_entropy":
        raise ValueError(f"bce_target_threshold={c.bce_target_threshold} is for "
                         f"loss='sigmoid_cross_entropy', not {c.loss!r}")
    _check_validation(c)


def has_validation(c: ml_collections.ConfigDict) -> bool:
    """Whether the run evaluates a validation split after each period."""
    return bool(c.validation_split or c.validation_dataset_split)


def _check_validation(c: ml_collections.ConfigDict) -> None:
    if c.validation_split and c.validation_dataset_split:
        raise ValueError(f"validation_split={c.validation_split} and validation_dataset_split="
                         f"{c.validation_dataset_split!r}: set one of the two")
    if c.validation_dataset_split and c.validation_dataset_split == c.eval_split:
        raise ValueError(f"validation_dataset_split={c.validation_dataset_split!r} is also the "
                         f"test split (eval_split): decisions would be taken on the test split")
    needs = [f"schedule='plateau'"] if c.schedule == "plateau" else []
    if c.early_stopping_patience:
        needs.append(f"early_stopping_patience={c.early_stopping_patience}")
    if c.selection_weights == "either":
        needs.append("selection_weights='either'")
    if needs and not has_validation(c):
        raise ValueError(f"{' and '.join(needs)} decide on a validation split: set "
                         f"validation_split (e.g. 0.1) or validation_dataset_split")
    if c.selection_weights == "either":
        if not c.ema_decay:
            raise ValueError("selection_weights='either' compares the trained and the EMA "
                             "weights: set ema_decay > 0")
        if c.selection_metric.startswith("val_ema_"):
            raise ValueError(f"selection_weights='either' with selection_metric="
                             f"{c.selection_metric!r}: name the trained weights' metric "
                             f"({'val_' + c.selection_metric[len('val_ema_'):]!r}); its "
                             f"val_ema_ twin is compared too")
    for name in ("selection_metric", "plateau_monitor"):
        value = c[name]
        allowed = [f"val_{m}" for m in EVAL_METRICS]
        allowed += [f"val_ema_{m}" for m in EVAL_METRICS] if c.ema_decay else []
        if value not in allowed:
            hint = " (val_ema_* needs ema_decay > 0)" if value.startswith("val_ema_") else ""
            raise ValueError(f"{name}={value!r}; expected one of {allowed}{hint}")


def with_overrides(c: ml_collections.ConfigDict, **overrides: Any) -> ml_collections.ConfigDict:
    """A validated copy of `c` with fields replaced; unknown names are an error."""
    for name in overrides:
        if name not in FIELDS:
            raise unknown_field_error(name)
    out = ml_collections.ConfigDict(c.to_dict())
    for name, value in overrides.items():
        if isinstance(value, dict):
            value = ml_collections.ConfigDict(value)
        _check_field(name, value)  # before ConfigDict's own type check, to name the field
        out[name] = int(value) if _integer_field(name) and isinstance(value, float) else value
    validate_config(out)
    return out


def describe() -> str:
    """The schema as text: one section a block, one field a line."""
    lines = []
    for section, fields in SCHEMA.items():
        lines.append(f"[{section}]")
        for name, f in fields.items():
            allowed = f" {f.choices}" if f.choices else (f" ({f.bounds})" if f.bounds else "")
            lines.append(f"  {name} = {f.default!r}{allowed}: {f.help}")
    return "\n".join(lines)

