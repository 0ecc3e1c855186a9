"""The size an image folder trains at when the config gives none: its images' own size where
they share one or are all small (a CIFAR- or MNIST-style folder), else ImageNet's 224 crops.

Deciding reads the headers of a seeded sample of at most `SAMPLE` files (PIL opens an image
lazily: the size comes from the header, no pixel is decoded), so it costs the same on a
folder of a thousand files and of a million.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SAMPLE = 256  # files whose headers are read
SMALL = 64  # a folder whose sampled images are all at most this on each side is "small"
PHOTO_SIZE = 224  # ImageNet's crop, for folders of varied, large photographs


@dataclasses.dataclass(frozen=True)
class FolderSizes:
    """What the sampled headers of a folder say."""

    sampled: int  # files read
    total: int  # files in the split
    sizes: tuple[tuple[int, int], ...]  # (height, width) of each sampled file

    @property
    def native(self) -> int | None:
        """The side the folder trains at, or None for ImageNet's crops: the shorter side
        where every sampled image has the same size or all are small (then the largest
        shorter side: smaller images are scaled up, none down)."""
        if not self.sizes:
            return None
        if len(set(self.sizes)) == 1 or max(max(s) for s in self.sizes) <= SMALL:
            return max(min(s) for s in self.sizes)
        return None

    def describe(self) -> str:
        """The sample's sizes in a few words: '32x32' or 'from 240x180 to 500x375'."""
        if not self.sizes:
            return "no images"
        if len(set(self.sizes)) == 1:
            return f"all {self.sizes[0][0]}x{self.sizes[0][1]}"
        small = min(self.sizes, key=lambda s: s[0] * s[1])
        large = max(self.sizes, key=lambda s: s[0] * s[1])
        return f"from {small[0]}x{small[1]} to {large[0]}x{large[1]}"


def header_size(path: str) -> tuple[int, int]:
    """(height, width) of an image file from its header; ValueError naming the file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from err
    return height, width


def sample_sizes(paths: list[str], seed: int = 0, n: int = SAMPLE) -> FolderSizes:
    """The header sizes of `n` of `paths` chosen by `seed` (all of them when fewer). A file
    that cannot be read is left out here: training names it (or skips it, as configured)."""
    chosen = paths
    if len(paths) > n:
        picks = np.random.default_rng([seed, 17]).choice(len(paths), n, replace=False)
        chosen = [paths[i] for i in np.sort(picks)]
    sizes = []
    for path in chosen:
        try:
            sizes.append(header_size(path))
        except ValueError:
            continue
    return FolderSizes(len(chosen), len(paths), tuple(sizes))
