"""Image folders as users have them, from Fashion-MNIST's images (Debian's IDX files): class
subfolders sorted by name, small PNGs (or JPEG, WebP), grey, RGB, RGBA or palette images,
padded or scaled to a size, optionally nested one folder deeper or with upper-case
extensions. Without the IDX files, each class is a stripe pattern with noise.

    python -m benchmarks.user_folders --out DIR --train 3000 --val 1000 --size 32 --mode RGB
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from resnet_jax.data.sources import DEBIAN_FASHION_MNIST, FASHION_CLASSES

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
MODES = ("L", "RGB", "RGBA", "P")


def fashion_images(n: int, split: str = "train", seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`n` 28x28 grey images (n, 28, 28) and labels: Fashion-MNIST's first n of `split`
    where its IDX files are installed, else stripes of a per-class angle with noise."""
    if os.path.isdir(DEBIAN_FASHION_MNIST):
        from resnet_jax.data.sources import load_idx

        source = load_idx(DEBIAN_FASHION_MNIST, "test" if split != "train" else "train")
        return source.images[:n, ..., 0], source.labels[:n]
    rng = np.random.default_rng([seed, len(split)])
    labels = rng.integers(0, 10, n).astype(np.int32)
    y, x = np.mgrid[0:28, 0:28]
    angles = labels[:, None, None] * np.pi / 10
    stripes = np.sin((x * np.cos(angles) + y * np.sin(angles)) / 2.0)
    images = 128 + 90 * stripes + rng.normal(0, 20, (n, 28, 28))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def to_image(grey: np.ndarray, size: int, mode: str, k: int):
    """A PIL image of `mode` and `size` x `size` from a 28x28 grey one: zero-padded up to 32,
    scaled beyond; colour modes tint it by `k`."""
    from PIL import Image

    image = grey
    if size != 28:
        pad = max(0, (min(size, 32) - 28) // 2)
        image = np.pad(grey, pad)
        if image.shape[0] != size:
            image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    if mode == "L":
        return Image.fromarray(image)
    tint = np.asarray([1.0, 0.6 + 0.4 * (k % 3 == 1), 0.6 + 0.4 * (k % 3 == 2)])
    rgb = (image[..., None] * tint).astype(np.uint8)
    if mode == "RGBA":
        alpha = np.full(image.shape, 255, np.uint8)
        return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    out = Image.fromarray(rgb, "RGB")
    return out.quantize(64) if mode == "P" else out


def write_split(directory: str, grey: np.ndarray, labels: np.ndarray, size: int,
                modes=("RGB",), fmt: str = "png", nested: bool = False,
                upper: bool = False, class_names=FASHION_CLASSES) -> None:
    """directory/CLASS/NNNNN.EXT for each image (CLASS/part/NNNNN.EXT when nested), image k in
    mode modes[k % len(modes)] and format fmt (or fmt[k % len(fmt)] for a tuple)."""
    fmts = (fmt,) if isinstance(fmt, str) else tuple(fmt)
    for k, (image, label) in enumerate(zip(grey, labels)):
        name = class_names[int(label)].replace("/", "_").replace(" ", "_")
        folder = os.path.join(directory, name, f"part{k % 2}") if nested else \
            os.path.join(directory, name)
        os.makedirs(folder, exist_ok=True)
        ext = fmts[k % len(fmts)]
        mode = modes[k % len(modes)]
        if ext == "jpg" and mode in ("RGBA", "P"):
            mode = "RGB"  # JPEG holds neither alpha nor a palette
        path = os.path.join(folder, f"{k:05d}.{ext.upper() if upper else ext}")
        to_image(image, size, mode, k).save(path, FORMATS[ext])


def write_folder(root: str, train: int, val: int = 0, test: int = 0, size: int = 32,
                 modes=("RGB",), fmt="png", nested: bool = False, upper: bool = False) -> str:
    """root/train/CLASS/* (and val/, test/ when asked) from Fashion-MNIST; returns root."""
    grey, labels = fashion_images(train + val, "train")
    write_split(os.path.join(root, "train"), grey[:train], labels[:train], size, modes, fmt,
                nested, upper)
    if val:
        write_split(os.path.join(root, "val"), grey[train:], labels[train:], size, modes, fmt,
                    nested, upper)
    if test:
        grey, labels = fashion_images(test, "test")
        write_split(os.path.join(root, "test"), grey, labels, size, modes, fmt, nested, upper)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--test", type=int, default=0)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--mode", default="RGB", choices=MODES)
    parser.add_argument("--format", default="png", choices=sorted(FORMATS))
    args = parser.parse_args()
    write_folder(args.out, args.train, args.val, args.test, args.size, (args.mode,),
                 args.format)
    print(args.out)


if __name__ == "__main__":
    main()
