"""Dataset sources: random-access sequences of examples, the form grain reads.

Small datasets (MNIST, Fashion-MNIST, CIFAR) are held in memory as arrays (`ArraySource`,
items {"image": uint8 HWC, "label"}), read from local MNIST-format IDX files or through
`tfds.data_source`. Large ones stay on disk and are decoded by the pipeline, so that decoding
runs in its worker processes: ImageNet-style tfds datasets (`RecordSource`) and image folders
(`FileSource`), items {"data": encoded bytes, "where": what to name in errors, "label"}.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import json
import os
from typing import Any

import numpy as np

from resnet_jax.data.images import IMAGE_EXTENSIONS


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline needs to know of a dataset."""

    tfds_name: str
    num_classes: int
    image_shape: tuple[int, int, int] | None  # None: variable-size images
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # default train augmentation
    class_names: tuple[str, ...] = ()
    in_memory: bool = True
    channel_order: str = "RGB"  # "BGR": channels reversed before normalising (Caffe's)


FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), (0.1307,), (0.3081,), "none",
                         tuple(str(i) for i in range(10))),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,),
                                 "crop_flip", FASHION_CLASSES),
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), "crop_flip", CIFAR10_CLASSES),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3), (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), "crop_flip"),
    "imagenette": DatasetInfo("imagenette", 10, None, IMAGENET_MEAN, IMAGENET_STD, "inception",
                              in_memory=False),
    "imagenet2012": DatasetInfo("imagenet2012", 1000, None, IMAGENET_MEAN, IMAGENET_STD,
                                "inception", in_memory=False),
    # classes from the folder's subfolder names (dataset_info)
    "image_folder": DatasetInfo("image_folder", 0, None, IMAGENET_MEAN, IMAGENET_STD,
                                "inception", in_memory=False),
}

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DATA_SOURCES = ("auto", "tfds", "idx")


@dataclasses.dataclass
class ArraySource:
    """An in-memory split: images (N, H, W, C) uint8 and labels (N,) int32."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError(
                f"expected images (N, H, W, C) and N labels, got {self.images.shape} and "
                f"{self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}

    def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]


class RecordSource:
    """A tfds data source whose images stay encoded (tfds' SkipDecoding) until the pipeline
    decodes them."""

    def __init__(self, records: Any, name: str = "tfds"):
        self.records = records
        self.name = name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.records[int(index)]
        return {"data": r["image"], "where": f"{self.name}[{int(index)}]",
                "label": np.int32(r["label"])}


@dataclasses.dataclass
class FileSource:
    """Image files with their labels, read (not decoded) on access."""

    paths: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[int(index)]
        with open(path, "rb") as f:
            data = f.read()
        return {"data": data, "where": path, "label": self.labels[int(index)]}


Source = ArraySource | RecordSource | FileSource


def subset(source: Source, n: int, seed: int = 0) -> Source:
    """`n` examples of a source chosen by `seed` (all of it when n is 0 or larger), in the
    source's order: where the labels are held (arrays, image folders), each class in its
    share of the source (largest remainders), else a uniform sample. The same (source, n,
    seed) always gives the same examples, on every process and every resume."""
    if not n or n >= len(source):
        return source
    rng = np.random.default_rng([seed, 23])
    labels = getattr(source, "labels", None)
    if labels is None:
        return take(source, np.sort(rng.choice(len(source), n, replace=False)))
    return take(source, np.sort(stratified_sample(np.asarray(labels), n, rng)))


def stratified_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `n` of `labels`, each class drawn in proportion to its count; the places
    left by rounding go to the classes with the largest remainders."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:n - quota.sum()]] += 1
    picks = [rng.choice(np.flatnonzero(labels == c), q, replace=False)
             for c, q in zip(classes, quota)]
    return np.concatenate(picks)


def take(source: Source, indices: np.ndarray) -> Source:
    """The examples of `source` at `indices`, in that order."""
    indices = np.asarray(indices, np.int64)
    if isinstance(source, ArraySource):
        return ArraySource(source.images[indices], source.labels[indices])
    if isinstance(source, FileSource):
        return FileSource([source.paths[i] for i in indices], source.labels[indices])
    return _Taken(source, indices)


def holdout(source: Source, fraction: float, seed: int, salt: int = 7
            ) -> tuple[Source, Source]:
    """(rest, held out): `fraction` of the examples, chosen by `seed`, held out; both keep
    the source's order. The same (length, fraction, seed) always holds out the same ones."""
    n = len(source)
    held = max(1, int(round(n * fraction)))
    if not 0 < fraction < 1 or held >= n:
        raise ValueError(f"holding out a fraction {fraction} of {n} examples leaves no "
                         f"training examples; expected a fraction in (0, 1)")
    order = np.random.default_rng([seed, salt]).permutation(n)
    return take(source, np.sort(order[held:])), take(source, np.sort(order[:held]))


class _Taken:
    """The items of a random-access source at given indices."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.source[int(self.indices[index])]


# --- image folders: DIR/train/CLASS/*, optionally DIR/val/CLASS/* and DIR/test/CLASS/* ---

IMAGE_FOLDER_SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"validation": "val"}


def _progress(iterable, total: int, desc: str, unit: str, show: bool):
    """`iterable` with a progress bar on stderr when `show` (a scan that takes a while)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=not show,
                mininterval=0.5)


def _scan_split(directory: str, classes: list[str] | None
                ) -> tuple[list[str], list[str], list[int]]:
    """(class names, file paths, labels) of one split directory, every file checked to be an
    image by its name. A class folder's subfolders belong to it (CLASS/part/IMAGE); hidden
    files (.DS_Store, ...) are passed over."""
    found = sorted(e.name for e in os.scandir(directory) if e.is_dir()
                   and not e.name.startswith("."))
    if not found:
        raise ValueError(f"{directory}: no class subfolders; an image folder holds "
                         f"{directory}/CLASS_NAME/IMAGE files")
    if classes is None:
        classes = found
    else:
        for name in found:
            if name not in classes:
                raise ValueError(f"{os.path.join(directory, name)}: class {name!r} is not in "
                                 f"train/ (which has {len(classes)} classes)")
    index = {name: k for k, name in enumerate(classes)}
    paths, labels = [], []
    for name in _progress(found, len(found), f"scanning {directory}", "class",
                           len(found) >= 50):
        folder = os.path.join(directory, name)
        files = _files_below(folder)
        if not files:
            raise ValueError(f"{folder}: no image files in class folder {name!r}")
        for path in files:
            if not path.lower().endswith(IMAGE_EXTENSIONS):
                raise ValueError(f"{path}: not an image file (allowed extensions: "
                                 f"{', '.join(IMAGE_EXTENSIONS)})")
            paths.append(path)
            labels.append(index[name])
    return classes, paths, labels


def _files_below(folder: str) -> list[str]:
    """The paths of the files in `folder` and its subfolders, sorted; hidden ones left out."""
    out = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(parent, f) for f in files if not f.startswith("."))
    return sorted(out)


@functools.lru_cache(maxsize=4)
def scan_image_folder(root: str, holdout_fraction: float = 0.1, seed: int = 0
                      ) -> tuple[tuple[str, ...], dict[str, FileSource]]:
    """Class names (train/'s subfolders, sorted) and a FileSource per split. Without val/,
    'val' is `holdout_fraction` of train/ chosen by `seed`, and 'train' the rest."""
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(train_dir):
        raise FileNotFoundError(
            f"{train_dir}: no such directory; an image folder holds train/CLASS/* and "
            f"optionally val/CLASS/* and test/CLASS/* (given data_dir={root!r})")
    classes, paths, labels = _scan_split(train_dir, None)
    splits = {"train": FileSource(paths, np.asarray(labels, np.int32))}
    for split in ("val", "test"):
        directory = os.path.join(root, split)
        if os.path.isdir(directory):
            _, p, l = _scan_split(directory, classes)
            splits[split] = FileSource(p, np.asarray(l, np.int32))
    if "val" not in splits and holdout_fraction > 0:
        try:
            splits["train"], splits["val"] = holdout(splits["train"], holdout_fraction, seed)
        except ValueError as err:
            raise ValueError(f"holdout_fraction={holdout_fraction} for {train_dir}: {err}") \
                from None
    return tuple(classes), splits


def dataset_info(dataset: str, data_dir: str = "", holdout_fraction: float = 0.1,
                 seed: int = 0) -> DatasetInfo:
    """The dataset's DatasetInfo; for an image folder, with its classes from the scan."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {sorted(DATASETS)}")
    info = DATASETS[dataset]
    if dataset != "image_folder":
        return info
    if not data_dir:
        raise ValueError("dataset='image_folder' needs data_dir=DIR with DIR/train/CLASS/*")
    classes, _ = scan_image_folder(os.path.abspath(data_dir), holdout_fraction, seed)
    return dataclasses.replace(info, num_classes=len(classes), class_names=classes)


def load_image_folder(data_dir: str, split: str, holdout_fraction: float = 0.1,
                      seed: int = 0) -> FileSource:
    """One split of an image folder ('train', 'val' or 'validation', 'test')."""
    _, splits = scan_image_folder(os.path.abspath(data_dir), holdout_fraction, seed)
    name = SPLIT_ALIASES.get(split, split)
    if name not in splits:
        raise ValueError(f"image folder {data_dir!r} has splits {sorted(splits)}, not "
                         f"{split!r} (val/ is held out of train/ when holdout_fraction > 0)")
    return splits[name]


def _open(path: str):
    if os.path.exists(path):
        return open(path, "rb")
    if os.path.exists(path + ".gz"):
        return gzip.open(path + ".gz", "rb")
    raise FileNotFoundError(path)


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format; `.gz` beside it is read too) into an array."""
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4]!r})")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes (truncated?)")
    return body.reshape(dims)


def load_idx(directory: str, split: str) -> ArraySource:
    """A split of an MNIST-format dataset stored as IDX files in `directory`."""
    if split not in IDX_FILES:
        raise ValueError(f"IDX datasets have splits {sorted(IDX_FILES)}, got {split!r}")
    image_file, label_file = (os.path.join(directory, f) for f in IDX_FILES[split])
    images = read_idx(image_file)
    labels = read_idx(label_file).astype(np.int32)
    if images.ndim == 3:
        images = images[..., None]
    return ArraySource(images, labels)


def _build_command(name: str) -> str:
    return f"tfds build {name} --data_dir=DIR --file_format=array_record"


def _prepared_formats(name: str, data_dir: str | None) -> dict[str, str]:
    """{version directory: file format} of the prepared copies of `name` under data_dir."""
    import tensorflow_datasets as tfds

    root = data_dir or tfds.core.constants.DATA_DIR
    found = {}
    for info_file in sorted(glob.glob(os.path.join(root, name, "*", "*", "dataset_info.json"))
                            + glob.glob(os.path.join(root, name, "*", "dataset_info.json"))):
        with open(info_file) as f:
            fmt = json.load(f).get("fileFormat", "tfrecord")
        found[os.path.dirname(info_file)] = fmt.lower()
    return found


def _tfds_source(name: str, split: str, data_dir: str | None, encoded: bool):
    """tfds.data_source(name, split) from prepared files; never downloads. Errors tell apart
    a missing package, a dataset not prepared, and one prepared in another file format."""
    try:
        import tensorflow_datasets as tfds  # imported lazily: it is slow to import
        kwargs = {"decoders": {"image": tfds.decode.SkipDecoding()}} if encoded else {}
    except ImportError as err:
        raise ImportError(f"reading tfds dataset {name!r} needs a package that is missing: "
                          f"{err}; install the project's requirements.txt") from err
    formats = _prepared_formats(name, data_dir)
    where = data_dir or "tfds' default data_dir"
    if not formats:
        hint = (f"tfds dataset {name!r} is not prepared in {where}: prepare it where the "
                f"network is reachable with `{_build_command(name)}` (ImageNet needs the "
                f"manually downloaded archives, see the tfds catalog) and pass "
                f"--config.data_dir=DIR.")
        if name in ("fashion_mnist", "mnist"):
            hint += (" Without network: `apt-get install dataset-fashion-mnist` and "
                     "--config.data_source=idx, or `python -m resnet_jax.data.tfds_offline`.")
        raise FileNotFoundError(hint)
    if "array_record" not in formats.values():
        listed = ", ".join(f"{d} ({fmt})" for d, fmt in formats.items())
        raise ValueError(f"tfds dataset {name!r} is prepared in {listed}, but random access "
                         f"needs ArrayRecord files: rebuild with `{_build_command(name)}`")
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False, **kwargs)
    except ImportError as err:
        raise ImportError(f"reading tfds dataset {name!r} needs a package that is missing: "
                          f"{err}; install the project's requirements.txt") from err
    except ValueError as err:  # an unknown split
        raise ValueError(f"tfds dataset {name!r} in {where}: {err}") from err


def load_source(
    dataset: str, split: str, data_dir: str | None = None, data_source: str = "auto",
    holdout_fraction: float = 0.1, seed: int = 0,
) -> Source:
    """Load `split` of `dataset` from tfds, local IDX files or an image folder.

    data_source: "tfds", "idx" (MNIST-format files in data_dir, or the Debian package's
    directory for fashion_mnist), or "auto" (IDX files when present, else tfds).
    dataset "image_folder": data_dir/train/CLASS/* (see scan_image_folder).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {sorted(DATASETS)}")
    if data_source not in DATA_SOURCES:
        raise ValueError(f"data_source={data_source!r}; expected one of {DATA_SOURCES}")
    if dataset == "image_folder":
        if not data_dir:
            raise ValueError("dataset='image_folder' needs data_dir=DIR with DIR/train/CLASS/*")
        return load_image_folder(data_dir, split, holdout_fraction, seed)
    idx_dir = data_dir or (DEBIAN_FASHION_MNIST if dataset == "fashion_mnist" else None)
    has_idx = idx_dir is not None and all(
        os.path.exists(os.path.join(idx_dir, f)) or os.path.exists(os.path.join(idx_dir, f + ".gz"))
        for f in IDX_FILES.get(split, ("-",))
    )
    if data_source == "idx" or (data_source == "auto" and has_idx):
        if not has_idx:
            raise FileNotFoundError(
                f"no IDX files for {dataset!r} split {split!r} in {idx_dir!r}; expected "
                f"{IDX_FILES.get(split)} (for Fashion-MNIST: apt-get install dataset-fashion-mnist)"
            )
        return load_idx(idx_dir, split)
    info = DATASETS[dataset]
    records = _tfds_source(info.tfds_name, split, data_dir, encoded=not info.in_memory)
    if not info.in_memory:
        return RecordSource(records, f"{info.tfds_name}/{split}")
    n = len(records)
    reading = _progress(range(n), n, f"reading {dataset}/{split}", "image", n >= 20000)
    items = [records[i] for i in reading]
    images = np.stack([np.asarray(r["image"]) for r in items]).astype(np.uint8)
    labels = np.asarray([r["label"] for r in items], np.int32)
    if images.ndim == 3:
        images = images[..., None]
    return ArraySource(images, labels)
