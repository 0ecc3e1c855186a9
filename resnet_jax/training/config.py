"""The training configuration: every field with its default, and validation that names the
bad value before any data is read or any step is compiled."""

from __future__ import annotations

import ml_collections

from resnet_jax.data.sources import DATASETS
from resnet_jax.data.transforms import AUGMENTATIONS
from resnet_jax.models import get_spec
from resnet_jax.training.optim import OPTIMIZERS, SCHEDULES, WEIGHT_DECAY_MODES

DTYPES = ("float32", "bfloat16")


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every experiment; config files override what they need."""
    c = ml_collections.ConfigDict()
    # model
    c.model = "cifar_resnet20"
    c.num_classes = 0  # 0: the dataset's class count
    c.dtype = "float32"
    c.model_overrides = ml_collections.ConfigDict()  # extra model fields, e.g. shortcut
    c.init_from = ""  # a converted-weights dir or a run's workdir to start from
    c.freeze = ""  # "backbone": train only the head (fc, fc_hidden; AlexNet's fc8)
    c.fast_cpu_conv = True  # CPU backend: ops.cpu_conv's convolution, ops.batch_norm, XLA options
    # data
    c.dataset = "fashion_mnist"
    c.data_source = "auto"  # auto | tfds | idx
    c.data_dir = ""  # tfds data_dir, or the directory of IDX files
    c.eval_split = "test"
    c.image_size = 0  # variable-size datasets (ImageNet): crop size; 0: 224
    c.augment = ""  # "": the dataset's default
    c.channels = 0  # 0: the dataset's; 3: grayscale repeated to RGB (ImageNet-pretrained nets)
    c.train_subset = 0  # >0: train on the first N examples only (quick runs)
    c.eval_subset = 0
    # optimisation
    c.batch_size = 128  # global batch
    c.eval_batch_size = 500
    c.num_epochs = 10
    c.num_steps = 0  # >0: train this many steps instead of num_epochs epochs
    c.optimizer = "sgd"
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 1e-4
    c.weight_decay_mode = "l2"
    c.weight_decay_all = False
    c.schedule = "cosine"
    c.warmup_epochs = 0.0
    c.lr_boundaries = ()
    c.lr_boundaries_unit = "steps"
    c.lr_decay_factor = 0.1
    c.plateau_factor = 0.1
    c.plateau_patience = 5
    c.plateau_cooldown = 0
    c.plateau_accumulation = 0  # 0: one epoch of steps
    c.label_smoothing = 0.0
    c.grad_clip = 0.0
    # devices and hosts
    c.parallel = "single"  # single | pmap | sharded
    c.sync_batch_norm = False  # BatchNorm statistics over all devices (else per device)
    c.distributed = False  # jax.distributed.initialize() with cluster auto-detection
    c.coordinator_address = ""  # explicit multi-process set-up (the local launcher sets these)
    c.num_processes = 0
    c.process_id = -1
    # run
    c.seed = 0
    c.eval_every_epochs = 1
    c.checkpoint_every_steps = 0  # 0: at every evaluation only
    c.keep_checkpoints = 2
    c.log_every_steps = 20
    c.halt_after_steps = 0  # >0: save and stop at this step, as if interrupted
    c.skip_nonfinite_steps = False  # True: a NaN/Inf step is skipped (else the run stops)
    c.progress_bar = True
    return c


def total_steps(c: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """Steps of the whole run: num_steps if set, else num_epochs full epochs."""
    return c.get("num_steps", 0) or c.num_epochs * steps_per_epoch


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (tuple, list)):
        return "sequence"
    if isinstance(value, ml_collections.ConfigDict):
        return "ConfigDict"
    return type(value).__name__


def _check_fields(c: ml_collections.ConfigDict) -> None:
    """Every field is one of base_config's, with a value of its kind (ints where it has ints)."""
    base = base_config()
    for name in c.keys():
        if name not in base:
            close = __import__("difflib").get_close_matches(name, list(base.keys()), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config field {name!r}{hint}")
        want, value = base[name], c[name]
        if _kind(value) != _kind(want):
            raise ValueError(f"{name}={value!r} has type {type(value).__name__}; expected "
                             f"{_kind(want)} like the default {want!r}")
        if isinstance(want, int) and not isinstance(want, bool) and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{name}={value!r} must be an integer")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Raise a ValueError naming the first field whose value cannot work."""
    _check_fields(c)
    get_spec(c.model)  # names the known models
    _check(c.dataset in DATASETS, f"dataset={c.dataset!r} is unknown; known: {sorted(DATASETS)}")
    _check(c.dtype in DTYPES, f"dtype={c.dtype!r}; expected one of {DTYPES}")
    _check(c.optimizer in OPTIMIZERS, f"optimizer={c.optimizer!r}; expected one of {OPTIMIZERS}")
    _check(c.schedule in SCHEDULES, f"schedule={c.schedule!r}; expected one of {SCHEDULES}")
    _check(c.weight_decay_mode in WEIGHT_DECAY_MODES,
           f"weight_decay_mode={c.weight_decay_mode!r}; expected one of {WEIGHT_DECAY_MODES}")
    _check(c.augment in ("",) + AUGMENTATIONS,
           f"augment={c.augment!r}; expected '' (dataset default) or one of {AUGMENTATIONS}")
    for name in ("learning_rate", "batch_size", "eval_batch_size", "num_epochs"):
        value = c[name]
        _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
               f"{name}={value!r} must be a positive number")
    for name in ("batch_size", "eval_batch_size", "num_epochs"):
        _check(isinstance(c[name], int), f"{name}={c[name]!r} must be an integer")
    for name in ("weight_decay", "grad_clip", "warmup_epochs", "num_classes", "train_subset",
                 "eval_subset", "checkpoint_every_steps", "num_steps", "halt_after_steps", "image_size"):
        _check(c[name] >= 0, f"{name}={c[name]!r} must be >= 0")
    _check(0 <= c.momentum < 1, f"momentum={c.momentum!r} must be in [0, 1)")
    _check(0 <= c.label_smoothing < 1, f"label_smoothing={c.label_smoothing!r} must be in [0, 1)")
    _check(c.eval_every_epochs >= 1, f"eval_every_epochs={c.eval_every_epochs!r} must be >= 1")
    _check(c.parallel in ("single", "pmap", "sharded"),
           f"parallel={c.parallel!r}; expected one of ('single', 'pmap', 'sharded')")
    _check(c.freeze in ("", "backbone"), f"freeze={c.freeze!r}; expected '' or 'backbone'")
    _check(c.channels in (0, 1, 3), f"channels={c.channels!r}; expected 0 (the dataset's), 1 or 3")
    _check(c.keep_checkpoints >= 1, f"keep_checkpoints={c.keep_checkpoints!r} must be >= 1")
    if c.schedule == "piecewise":
        _check(len(c.lr_boundaries) > 0, "schedule='piecewise' needs lr_boundaries")
        _check(c.lr_boundaries_unit in ("steps", "epochs"),
               f"lr_boundaries_unit={c.lr_boundaries_unit!r}; expected 'steps' or 'epochs'")
