"""The work on each example, picklable so that worker processes can run it: in-memory
images gathered and augmented a whole batch at a time (vectorised), encoded images decoded
at a reduced scale and cropped one by one straight into their place in a uint8 batch.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import numpy as np

from resnet_jax.data import images, transforms
from resnet_jax.data.order import EvalPositions
from resnet_jax.data.sources import ArraySource

Batch = dict[str, np.ndarray]
log = logging.getLogger("resnet_jax")


def crop_flip_pad(side: int) -> int:
    """crop_flip's margin for images of `side` pixels: 4 from 32 on (the CIFAR recipes), else
    2 (the MNIST-sized ones)."""
    return 4 if side >= 32 else 2


@dataclasses.dataclass
class ArrayBatch:
    """In-memory images, a whole local batch per element: gathered by index, then (train)
    zero-padded by `pad`, cropped back at the drawn offsets and mirrored where drawn, all
    vectorised (or, with augment 'inception', each image's random-resized crop and flip
    resized back to its size); evaluation batches carry the mask."""

    positions: Any  # TrainPositions or EvalPositions
    source: ArraySource
    augment: str
    pad: int
    ops: transforms.ImageOps = transforms.ImageOps()  # per-image random operations (train)

    def __call__(self, step: int) -> Batch:
        if isinstance(self.positions, EvalPositions):
            indices, mask = self.positions.batch(step)
            images, labels = self.source.get_batch(indices)
            return {"image": images, "label": labels, "mask": mask}
        indices, offsets, flips, seeds = self.positions.batch(step)
        images, labels = self.source.get_batch(indices)
        if self.augment == "inception":
            images = np.stack([inception_crop(image, seed) for image, seed in zip(images, seeds)])
        elif self.augment in ("flip", "crop_flip"):
            images = transforms.pad_crop_flip(
                images, offsets, flips, self.pad if self.augment == "crop_flip" else 0)
        if self.ops:
            images = np.stack([self.ops(image, seed) for image, seed in zip(images, seeds)])
        return {"image": images, "label": labels}


def inception_crop(image: np.ndarray, seed: int) -> np.ndarray:
    """An in-memory image's Inception-style random-resized crop, mirrored with probability
    1/2, resized back to the image's size (bilinear), drawn from `seed`."""
    import cv2

    rng = np.random.default_rng([int(seed), 4])
    h, w = image.shape[:2]
    left, top, right, bottom = images.random_resized_crop_box(rng, h, w) or (0, 0, w, h)
    out = cv2.resize(image[top:bottom, left:right], (w, h), interpolation=cv2.INTER_LINEAR)
    out = out.reshape(image.shape)
    return out[:, ::-1] if rng.random() < 0.5 else out


@dataclasses.dataclass
class DecodeCrop:
    """Encoded images, decoded at a reduced scale where the crop allows. Training crops by
    `augment`: 'inception' (random-resized crop and flip), or the evaluation crop followed by
    'flip' or 'crop_flip' (zero-pad by `pad`, crop back at the drawn offset, mirror) or
    nothing ('none'). The evaluation crop is the central `crop_pct` of the shorter side
    resized to `size` (with `interpolation`, as every crop), or the whole image when it is
    `size` x `size` already (a CIFAR-style folder). A corrupt image
    stops the run with its path, or with `skip_corrupt` is replaced: in training by the next
    readable example, in evaluation by a masked-out blank."""

    source: Any
    size: int
    train: bool
    skip_corrupt: bool = False
    channels: int = 3
    ops: transforms.ImageOps = transforms.ImageOps()  # per-image random operations (train)
    augment: str = "inception"  # of training
    pad: int = 0  # crop_flip's margin
    crop_pct: float = 0.875
    interpolation: str = "bilinear"

    def _eval_box(self, height: int, width: int):
        if height == width == self.size:
            return (0, 0, width, height)
        return images.center_crop_box(height, width, self.crop_pct, self.size)

    def _load(self, index: int, draws: dict[str, Any] | None) -> tuple[np.ndarray, Any]:
        item = self.source[index]
        box, flip = self._eval_box, False
        if draws is not None and self.augment == "inception":
            rng = np.random.default_rng(draws["seed"])
            flip = bool(rng.random() < 0.5)

            def box(h, w):
                return images.random_resized_crop_box(rng, h, w) or images.center_crop_box(h, w)
        elif draws is not None and self.augment == "flip":
            flip = bool(draws["flip"])
        image = images.crop_resize(item["data"], item["where"], self.size, box, flip,
                                   self.channels, self.interpolation)
        if draws is not None and self.augment == "crop_flip":  # as in memory: pad, crop, flip
            image = transforms.pad_crop_flip(image[None], np.asarray(draws["offset"])[None],
                                             np.asarray([bool(draws["flip"])]), self.pad)[0]
        if self.ops and draws is not None:
            image = self.ops(image, draws["seed"])
        return image, item["label"]

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        index, seed = item["index"], item if self.train else None
        corrupt = 0
        for _ in range(len(self.source)):
            try:
                image, label = self._load(index, seed)
                break
            except images.CorruptImageError as err:
                if not self.skip_corrupt:
                    raise images.CorruptImageError(
                        f"{err}; set --config.skip_corrupt_images=True to skip such files "
                        f"(counted as corrupt_images in the metrics)") from err
                log.warning("skipped corrupt image: %s", err)
                corrupt += 1
                if not self.train:
                    shape = (self.size, self.size, self.channels)
                    return {"image": np.zeros(shape, np.uint8), "label": np.int32(0),
                            "mask": np.float32(0), "corrupt": np.int32(1)}
                index = (index + 1) % len(self.source)
        else:
            raise images.CorruptImageError("no readable image in the whole source")
        out = {"image": image, "label": np.int32(label), "corrupt": np.int32(corrupt)}
        if "mask" in item:
            out["mask"] = item["mask"]
        return out


@dataclasses.dataclass
class DecodeBatch:
    """Encoded images, a whole local batch per element: each example decoded and cropped
    (DecodeCrop) straight into its place in a uint8 batch. In a worker process the finished
    batch is copied into one of the worker's reused shared-memory slots (`slots`: the
    worker's time, not the training process's), which the training process reads in
    place."""

    positions: Callable[[int], dict[str, Any]]
    decode: DecodeCrop
    local_batch: int
    with_mask: bool

    def __call__(self, step: int) -> Batch:
        n, size, c = self.local_batch, self.decode.size, self.decode.channels
        image = np.empty((n, size, size, c), np.uint8)
        label, corrupt = np.empty(n, np.int32), np.zeros(n, np.int32)
        mask = np.ones(n, np.float32)
        for k in range(n):
            out = self.decode(self.positions(int(step) * n + k))
            image[k] = out["image"]
            label[k], corrupt[k] = out["label"], out["corrupt"]
            mask[k] = out.get("mask", 1.0)
        batch = {"image": image, "label": label, "corrupt": corrupt}
        if self.with_mask:
            batch["mask"] = mask
        return batch
