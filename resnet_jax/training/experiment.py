"""From a validated config to the pieces of a run: data sources, model, optimizer, durations,
and the steps mapped by a strategy. Nothing is trained here."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from resnet_jax.data import image_sizes, pipeline
from resnet_jax.data.examples import crop_flip_pad
from resnet_jax.data.order import steps_per_epoch
from resnet_jax.data.on_device import DeviceInput
from resnet_jax.data.sources import (DATASETS, ArraySource, DatasetInfo, dataset_info,
                                     holdout, load_image_folder, load_source, subset)
from resnet_jax.models import get_model, get_spec
from resnet_jax.training import overrides, steps, transfer
from resnet_jax.training.config import has_validation, validate_config, with_overrides
from resnet_jax.training.durations import Durations, durations
from resnet_jax.training.losses import get_loss
from resnet_jax.training.optim import make_optimizer
from resnet_jax.training.parallel import Strategy, make_strategy, resolve_strategy

log = logging.getLogger("resnet_jax")


@dataclasses.dataclass
class Experiment:
    """Everything a run needs, built from the config (no training done yet)."""

    config: ml_collections.ConfigDict
    info: DatasetInfo
    train_source: Any
    eval_source: Any  # the test split (eval_split)
    val_source: Any  # the validation split, or None
    image_shape: tuple[int, int, int]
    num_classes: int
    model: Any
    tx: Any
    schedule: Any
    durations: Durations


def data_seed(config: ml_collections.ConfigDict) -> int:
    """The seed of the run's data: training order, the pipeline's augmentation draws, the
    held-out validation examples and subsets (`data_seed`, else `seed`)."""
    return config.data_seed if config.data_seed >= 0 else config.seed


def cpu_kernels(config: ml_collections.ConfigDict) -> bool:
    """Whether the config's switch turns on resnet_jax.ops.cpu (CPU backend only)."""
    return config.cpu_kernels and jax.default_backend() == "cpu"


def apply_process_settings(config: ml_collections.ConfigDict) -> None:
    """Process-wide settings that go with the config, for entry points to make first thing
    (before JAX starts its CPU client): the CPU kernels' malloc setting, under their switch.
    Importing resnet_jax never does this."""
    if config.cpu_kernels:
        from resnet_jax.ops import cpu

        cpu.retain_freed_memory()


def jit_options(config: ml_collections.ConfigDict) -> Callable[[str], dict | None] | None:
    """`step kind -> jax.jit compiler options` for the steps, or None."""
    if not cpu_kernels(config):
        return None
    from resnet_jax.ops import cpu

    return cpu.jit_options


def build_model(config: ml_collections.ConfigDict, num_classes: int):
    """The registry model of the config: compute dtype, overrides, synchronised BatchNorm
    and, under the `cpu_kernels` switch, the CPU backend's layers."""
    overrides = dict(config.model_overrides.to_dict())
    overrides["dtype"] = jnp.dtype(config.dtype)
    fields = {f.name for f in dataclasses.fields(get_spec(config.model).cls)}
    if config.sync_batch_norm and resolve_strategy(config.parallel) != "single":
        if "axis_name" not in fields:
            raise ValueError(f"sync_batch_norm=True but model {config.model!r} has no BatchNorm")
        overrides["axis_name"] = "data"
    if config.drop_path_rate:
        if "drop_path_rate" not in fields:
            raise ValueError(f"drop_path_rate={config.drop_path_rate} but model "
                             f"{config.model!r} has no stochastic depth (ResNet v1 models do)")
        overrides["drop_path_rate"] = config.drop_path_rate
    if cpu_kernels(config):
        from resnet_jax.ops import cpu

        layers = cpu.layers(config.cpu_conv_dtype)
        # Not with statistics synchronised over devices: there, ops.batch_norm on 2x2 devices
        # over processes disagreed with one device by 1e-3 relative in the stem BN's bias
        # after one step (nn.BatchNorm's agree to 1e-5); docs/cpu_speed_log.md sections 11, 15.
        if overrides.get("axis_name") is not None:
            layers.pop("norm", None)
        overrides = {**layers, **overrides}
    return get_model(config.model, num_classes=num_classes, **overrides)


def image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(H, W, C) of the model's input: the dataset's, or the crop size, and `channels`."""
    info = DATASETS[config.dataset]
    size = config.image_size or 224
    shape = info.image_shape or (size, size, 3)
    if config.channels and config.channels != shape[-1]:
        if shape[-1] != 1 or config.channels != 3:
            raise ValueError(f"channels={config.channels}: {config.dataset} images have "
                             f"{shape[-1]} channel(s); only 1 -> 3 is supported")
        shape = (*shape[:-1], 3)
    return shape


def check_input_shape(model, name: str, shape: tuple[int, ...]) -> None:
    """Trace the model on `shape` without running it; a ValueError names a shape it cannot take."""
    try:
        jax.eval_shape(model.init, {"params": jax.random.key(0), "dropout": jax.random.key(0)},
                       jax.ShapeDtypeStruct((1, *shape), jnp.float32))
    except Exception as err:  # noqa: BLE001 - any failure here is a shape mismatch
        raise ValueError(f"model {name!r} cannot take images of shape {shape}: {err}") from err


def info_of(config: ml_collections.ConfigDict) -> DatasetInfo:
    """The config's dataset description (an image folder's classes from its scan), with the
    config's input normalisation where it sets one."""
    info = dataset_info(config.dataset, config.data_dir, config.holdout_fraction,
                        data_seed(config))
    if config.input_mean:
        info = dataclasses.replace(info, mean=tuple(config.input_mean),
                                   std=tuple(config.input_std))
    if config.input_channel_order:
        info = dataclasses.replace(info, channel_order=config.input_channel_order)
    return info


DEFAULT_CROP_PCT = 0.875  # the ImageNet evaluation crop: 224 of 256


def recorded_crop_pct(recorded: dict[str, Any]) -> float:
    """The evaluation crop's share of the shorter side that a preprocessing record gives:
    its crop_pct (timm), else crop / resize (torchvision's 224 of 256, 224 of 232, ...)."""
    if recorded.get("crop_pct"):
        return float(recorded["crop_pct"])
    if recorded.get("crop") and recorded.get("resize"):
        return float(recorded["crop"]) / float(recorded["resize"])
    return DEFAULT_CROP_PCT


def resolve_input(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with its input normalisation written out: the fields it sets, else the
    preprocessing recorded with `init_from`'s weights (conversion.json, or the run it names),
    else the dataset's. The run's config.json then says what the model was fed."""
    if config.input_mean and config.input_channel_order and config.eval_crop_pct \
            and config.interpolation:
        return config
    recorded = transfer.recorded_preprocessing(config.init_from) if config.init_from else None
    info = dataset_info(config.dataset, config.data_dir, config.holdout_fraction,
                        data_seed(config))
    source = recorded or {"mean": info.mean, "std": info.std,
                          "channel_order": info.channel_order}
    mean = tuple(config.input_mean) or tuple(float(v) for v in source["mean"])
    std = tuple(config.input_std) or tuple(float(v) for v in source["std"])
    order = config.input_channel_order or source.get("channel_order", "RGB")
    crop_pct = config.eval_crop_pct or recorded_crop_pct(recorded or {})
    interpolation = config.interpolation or (recorded or {}).get("interpolation", "bilinear")
    return with_overrides(config, input_mean=mean, input_std=std, input_channel_order=order,
                          eval_crop_pct=crop_pct, interpolation=interpolation)


def resolve_image_size(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with a variable-size dataset's crop size written out (one line logged):
    `image_size` where given; for an image folder whose sampled images share one size or are
    all small (`image_sizes`), that size, its whole image at evaluation (`eval_crop_pct` 1)
    and, unless the config names one, the CIFAR recipes' pad-crop-flip; else 224."""
    if config.image_size or DATASETS[config.dataset].image_shape is not None:
        return config
    if config.dataset != "image_folder" or not config.data_dir:
        return with_overrides(config, image_size=image_sizes.PHOTO_SIZE)
    train = load_image_folder(config.data_dir, "train", config.holdout_fraction,
                              data_seed(config))
    found = image_sizes.sample_sizes(train.paths, data_seed(config))
    seen = (f"{config.data_dir}: {found.describe()} in the headers of {found.sampled:,} of "
            f"{found.total:,} training images")
    side = found.native
    if side is None:
        config = with_overrides(config, image_size=image_sizes.PHOTO_SIZE)
        log.info("%s: varied photographs, trained on %d crops (augment %s) and evaluated on "
                 "the central crop; set image_size to choose", seen, image_sizes.PHOTO_SIZE,
                 config.augment or DATASETS[config.dataset].augment)
        return config
    config = with_overrides(config, image_size=side, eval_crop_pct=config.eval_crop_pct or 1.0,
                            augment=config.augment or "crop_flip")
    pad = crop_flip_pad(side) if config.augment == "crop_flip" else 0
    log.info("%s: trained and evaluated at their own size, %dx%d (augment %s%s, whole image "
             "at evaluation); set image_size to choose", seen, side, side, config.augment,
             f", pad {pad}" if pad else "")
    return config


def test_split_note(config: ml_collections.ConfigDict) -> str:
    """Why the test split is what it is, where the run chose it itself ('' otherwise): an
    image folder without test/ is tested on val/ (or on the part of train/ held out as val)."""
    if (config.dataset != "image_folder" or config.eval_split != "val" or not config.data_dir
            or os.path.isdir(os.path.join(config.data_dir, "test"))):
        return ""
    held = "" if os.path.isdir(os.path.join(config.data_dir, "val")) else \
        f" (held out of train/: holdout_fraction {config.holdout_fraction:g})"
    return f"{config.data_dir} has no test/: val/{held} is the test split"


def resolve_splits(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config with an image folder's test split chosen: a folder with no test/ (only
    train/, or train/ and val/, torchvision's layout) evaluates val as its test split, and
    then decides on a part of train/ held out (`holdout_fraction`) when the config asks for
    validation by val/."""
    if (config.dataset != "image_folder" or config.eval_split != "test" or not config.data_dir
            or os.path.isdir(os.path.join(config.data_dir, "test"))):
        return config
    changes: dict[str, Any] = {"eval_split": "val"}
    if config.validation_dataset_split in ("val", "validation"):
        changes.update(validation_dataset_split="", validation_split=config.holdout_fraction)
    config = with_overrides(config, **changes)
    log.info("%s", test_split_note(config))
    return config


ROLES = ("train", "validation", "test")


def split_names(config: ml_collections.ConfigDict) -> dict[str, str]:
    """The run's splits by role, as evaluate.py and Run.evaluate name them, each described."""
    names = {"train": "train"}
    if config.validation_split:
        names["train"] = f"train less the held-out {config.validation_split:g}"
        names["validation"] = (f"{config.validation_split:g} of train held out (seed "
                              f"{data_seed(config)})")
    elif config.validation_dataset_split:
        names["validation"] = config.validation_dataset_split
    names["test"] = config.eval_split
    return names


def load_split(config: ml_collections.ConfigDict, split: str, n: int = 0):
    """A split of the run: `n` of its examples (all when 0), a sample across the classes
    chosen by the seed (`sources.subset`). Grayscale images stay one
    channel where `channels=3` asks for RGB: the steps repeat the channel on the device.

    `split` is a role or a dataset split: "train" (less the held-out validation examples),
    "validation" (the held-out `validation_split` of train, chosen by the seed, or the
    dataset's `validation_dataset_split`), "test" (`eval_split`); any other name is the
    dataset's split of that name."""
    if split == "validation" and "validation" not in split_names(config):
        raise ValueError("this run has no validation split (validation_split=0 and "
                         "validation_dataset_split=''); its splits: train, test "
                         f"({config.eval_split!r})")
    if split in ("train", "validation") and config.validation_split:
        train = _load(config, "train")
        rest, held = holdout(train, config.validation_split, data_seed(config), salt=11)
        source = rest if split == "train" else held
    else:
        name = {"validation": config.validation_dataset_split, "test": config.eval_split}
        source = _load(config, name.get(split) or split)
    source = subset(source, n, data_seed(config))
    shape = image_shape(config)
    if isinstance(source, ArraySource):
        channels = source.images.shape[-1]
        if source.images.shape[1:-1] != shape[:-1] or channels not in (1, shape[-1]):
            raise ValueError(f"{config.dataset} images have shape {source.images.shape[1:]}, "
                             f"expected {shape}")
    return source


def _load(config: ml_collections.ConfigDict, split: str):
    return load_source(config.dataset, split, config.data_dir or None, config.data_source,
                       config.holdout_fraction, data_seed(config))


def setup(config: ml_collections.ConfigDict, load_train: bool = True) -> Experiment:
    """Validate the config, load the data, build model and optimizer; the experiment's config
    has its input normalisation written out (`resolve_input`)."""
    validate_config(config)
    overrides.warn_unused(config)
    config = resolve_input(resolve_image_size(resolve_splits(config)))
    info = info_of(config)
    num_classes = config.num_classes or info.num_classes
    model = build_model(config, num_classes)
    shape = image_shape(config)
    check_input_shape(model, config.model, shape)  # before any data is read
    train_source = load_split(config, "train", config.train_subset) if load_train else None
    eval_source = load_split(config, "test", config.eval_subset)
    val_source = (load_split(config, "validation", config.eval_subset)
                  if has_validation(config) else None)
    n_train = len(train_source) if train_source is not None else config.batch_size
    d = durations(config, steps_per_epoch(n_train, config.batch_size))
    tx, schedule = make_optimizer(config, d)
    if config.freeze == "backbone":
        tx = transfer.freeze_backbone(tx)
    return Experiment(config, info, train_source, eval_source, val_source, shape, num_classes,
                      model, tx, schedule, d)


def train_data(exp: Experiment, start_step: int = 0, position: dict | None = None):
    """The run's training batches from `start_step`, or from a checkpoint's pipeline
    `position` ({"workers", "state"}) when it was saved with the same worker count."""
    c = exp.config
    state = None
    if position and position.get("workers") == c.data_workers and position.get("state"):
        state = position["state"]
    return pipeline.train_batches(exp.train_source, exp.info, train_input(exp), start_step,
                                  state)


def train_input(exp: Experiment) -> pipeline.TrainInput:
    """The training pipeline's options from the run's config, for this process."""
    c = exp.config
    return pipeline.TrainInput(
        c.batch_size, data_seed(c), augment=c.augment or None, image_size=c.image_size or None,
        process_index=jax.process_index(), process_count=jax.process_count(),
        workers=c.data_workers, skip_corrupt=c.skip_corrupt_images,
        channels=exp.image_shape[-1], end_step=exp.durations.total_steps,
        policy=c.auto_augment, policy_ops=c.rand_augment_num_ops,
        policy_magnitude=c.rand_augment_magnitude, interpolation=c.interpolation or "bilinear",
        repeats=c.num_repeats, alternate_flips=c.alternate_flips)


def eval_input(config: ml_collections.ConfigDict, batch_size: int) -> pipeline.EvalInput:
    """The evaluation pipeline's options from the config (its crop as `resolve_input`
    wrote it out, or the defaults), for this process's part of global batches of
    `batch_size`."""
    return pipeline.EvalInput(
        batch_size, image_size=eval_image_size(config), process_index=jax.process_index(),
        process_count=jax.process_count(), workers=config.data_workers, skip_corrupt=config.skip_corrupt_images,
        crop_pct=config.eval_crop_pct or DEFAULT_CROP_PCT,
        interpolation=config.interpolation or "bilinear")


def eval_image_size(config: ml_collections.ConfigDict) -> int | None:
    """The evaluation crop of variable-size datasets: eval_image_size, else image_size
    (None: 224)."""
    return config.eval_image_size or config.image_size or None


def eval_batch_size(config: ml_collections.ConfigDict, device_count: int | None = None) -> int:
    """The global evaluation batch: `eval_batch_size`, rounded up to a multiple of the device
    count under a multi-device strategy (the padded examples are masked out)."""
    if resolve_strategy(config.parallel) == "single":
        return config.eval_batch_size
    n = device_count or jax.device_count()
    return -(-config.eval_batch_size // n) * n


def build_strategy(exp: Experiment) -> Strategy:
    """The experiment's train and eval steps, mapped by the config's strategy."""
    return make_steps(exp.config, exp.model, exp.num_classes, exp.tx, exp.schedule)


def make_steps(c: ml_collections.ConfigDict, model, num_classes: int, tx, schedule) -> Strategy:
    """The engine's train and eval steps for `model` and optimizer `tx`, mapped by the
    config's strategy and compiled with its options."""
    return make_strategy(
        c.parallel, lambda axis: train_step(c, model, tx, schedule, axis),
        # evaluation reports the loss without label smoothing
        lambda axis: steps.make_eval_step(model, num_classes, get_loss(c.loss), axis,
                                          c.eval_flip, device_input(c, train=False),
                                          c.eval_shift),
        c.batch_size, eval_batch_size(c), jit_options(c), _state_specs(c))


def train_step(c: ml_collections.ConfigDict, model, tx, schedule, axis: str | None):
    """The engine's per-device train step for the config (unmapped)."""
    return steps.make_train_step(model, tx, schedule,
                                 get_loss(c.loss, c.label_smoothing, c.bce_target_threshold),
                                 axis, c.skip_nonfinite_steps, c.freeze == "backbone",
                                 c.grad_accumulation_steps, (c.mixup_alpha, c.cutmix_alpha),
                                 (c.ema_decay, c.ema_warmup), device_input(c))


def device_input(config: ml_collections.ConfigDict, train: bool = True) -> DeviceInput:
    """What the steps do to a uint8 batch on the device: the run's input normalisation
    (`resolve_input`), grayscale to RGB where `channels` asks for it, and in training random
    erasing with probability `random_erasing`."""
    c = resolve_input(config)
    return DeviceInput(tuple(c.input_mean), tuple(c.input_std), c.input_channel_order,
                       c.channels, c.random_erasing if train else 0.0)


def _state_specs(c: ml_collections.ConfigDict):
    """The towers strategy's state layout: AlexNet's split layers over the model axis."""
    if c.parallel != "towers":
        return None
    spec = get_spec(c.model)
    groups = {**spec.fields, **c.model_overrides.to_dict()}.get("groups", (2,))
    if spec.cls.__name__ != "AlexNet" or 2 not in tuple(groups):
        raise ValueError(f"parallel='towers' splits AlexNet's two towers over devices; "
                         f"model {c.model!r} has no towers (use 'alexnet')")
    from resnet_jax.training.model_parallel import tower_specs

    return tower_specs


def run_identity(exp: Experiment) -> dict[str, Any]:
    """The fields a checkpoint must share with the run that resumes it."""
    c = exp.config
    identity = {"model": c.model, "num_classes": int(exp.num_classes), "dataset": c.dataset,
                "image_shape": list(exp.image_shape), "batch_size": int(c.batch_size),
                "seed": int(c.seed)}
    if c.data_seed >= 0:  # absent from checkpoints of runs before the field
        identity["data_seed"] = int(c.data_seed)
    return identity
