"""Dataset sources behind one interface: images (uint8 NHWC) and int32 labels.

Small datasets (MNIST, Fashion-MNIST, CIFAR) are held in memory as arrays (`ArraySource`),
read either from local MNIST-format IDX files or through `tfds.data_source`. Large ones
(ImageNet, Imagenette) stay on disk and are decoded record by record (`RecordSource`).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from typing import Any, Sequence

import numpy as np


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

    def get_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]


class RecordSource:
    """A tfds data source read record by record (variable-size images, decoded lazily)."""

    def __init__(self, records: Any):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def get_records(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
        out = []
        for i in indices:
            r = self.records[int(i)]
            out.append((np.asarray(r["image"]), int(r["label"])))
        return out


def subset(source: ArraySource | RecordSource, n: int) -> ArraySource | RecordSource:
    """The first `n` examples of an in-memory source (all of it when n is 0 or larger)."""
    if n and isinstance(source, ArraySource) and n < len(source):
        return ArraySource(source.images[:n], source.labels[:n])
    return source


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


def _tfds_source(name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # imported lazily: it is slow to import

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=True)
    except Exception as err:  # noqa: BLE001 - tfds raises many kinds when offline
        hint = (
            f"could not load tfds dataset {name!r} split {split!r} (data_dir={data_dir!r}): "
            f"{type(err).__name__}: {err}\n"
            f"Prepare it where the network is reachable with `tfds build {name} "
            f"--data_dir=DIR` (ImageNet needs the manually downloaded archives, see the tfds "
            f"catalog) and pass --config.data_dir=DIR."
        )
        if name in ("fashion_mnist", "mnist"):
            hint += (f" For Fashion-MNIST without network: `apt-get install dataset-fashion-mnist`"
                     f" and --config.data_source=idx.")
        raise RuntimeError(hint) from err


def load_source(
    dataset: str, split: str, data_dir: str | None = None, data_source: str = "auto",
) -> ArraySource | RecordSource:
    """Load `split` of `dataset` from tfds or local IDX files.

    data_source: "tfds", "idx" (MNIST-format files in data_dir, or the Debian package's
    directory for fashion_mnist), or "auto" (IDX files when present, else tfds).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {sorted(DATASETS)}")
    if data_source not in DATA_SOURCES:
        raise ValueError(f"data_source={data_source!r}; expected one of {DATA_SOURCES}")
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
    records = _tfds_source(DATASETS[dataset].tfds_name, split, data_dir)
    if not DATASETS[dataset].in_memory:
        return RecordSource(records)
    n = len(records)
    images = np.stack([np.asarray(records[i]["image"]) for i in range(n)]).astype(np.uint8)
    labels = np.asarray([records[i]["label"] for i in range(n)], np.int32)
    if images.ndim == 3:
        images = images[..., None]
    return ArraySource(images, labels)
