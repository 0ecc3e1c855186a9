"""Prepare a tfds dataset on disk without network: the registered builder of the real
dataset (its name, version, config and features) writes examples given here instead of
downloading, in ArrayRecord format, so that `tfds.data_source(name, data_dir=DIR)` reads it
as it would the downloaded one.

    python -m resnet_jax.data.tfds_offline --idx_dir /usr/share/datasets/fashion-mnist \\
        --data_dir DIR   # Fashion-MNIST from the Debian package's IDX files
"""

from __future__ import annotations

import argparse
import io
import os
from typing import Any, Callable, Iterable

import numpy as np


def _encoded(image: Any) -> Any:
    """numpy images as PIL images (tfds encodes those with PIL, without TensorFlow); bytes
    (already encoded) as they are."""
    if isinstance(image, np.ndarray):
        from PIL import Image

        return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return image


def prepare(name: str, splits: dict[str, Callable[[], Iterable[Any]]], data_dir: str) -> str:
    """Write `splits` ({split: () -> iterable of (image, label) or of feature dicts; images
    uint8 HWC arrays or encoded bytes}) as tfds dataset `name` under data_dir; returns the
    version directory."""
    import tensorflow_datasets as tfds

    base = tfds.builder_cls(name)

    class Offline(base, skip_registration=True):  # type: ignore[misc, valid-type]
        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(make) for split, make in splits.items()}

        def _generate_examples(self, make):
            for key, example in enumerate(make()):
                if isinstance(example, tuple):
                    example = {"image": example[0], "label": int(example[1])}
                yield key, {**example, "image": _encoded(example["image"])}

    Offline.name = base.name
    builder = Offline(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)


def prepare_from_idx(name: str, idx_dir: str, data_dir: str) -> str:
    """MNIST or Fashion-MNIST as tfds dataset `name` from MNIST-format IDX files."""
    from resnet_jax.data.sources import load_idx

    def split(which):
        def examples():
            source = load_idx(idx_dir, which)
            return zip(source.images, source.labels)
        return examples

    return prepare(name, {"train": split("train"), "test": split("test")}, data_dir)


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
    """uint8 HWC image as JPEG bytes."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
        out, format="JPEG", quality=quality)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="fashion_mnist", choices=("fashion_mnist", "mnist"))
    parser.add_argument("--idx_dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--data_dir", required=True)
    args = parser.parse_args(argv)
    if not os.path.isdir(args.idx_dir):
        parser.error(f"--idx_dir {args.idx_dir}: no such directory")
    print(prepare_from_idx(args.name, args.idx_dir, args.data_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
