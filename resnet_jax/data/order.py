"""The order of the examples: which example, and which random draws, fill each place of
each batch, as a pure function of (seed, step).

Epoch e is the permutation `default_rng([seed, e])` of the split, and step s takes its
slice of it; the random draws of a step's augmentation come from
`default_rng([seed, e, s_in_epoch, 1])` for the whole global batch, so they depend neither on
how the batch is split across processes nor on the number of worker processes nor on where a
run was resumed. Each process keeps only its own contiguous part of every global batch.
With `alternate_flips`, an image's mirroring is no longer drawn anew: a random half of the
split (chosen by the seed) is mirrored in even epochs and the other half in odd ones, so that
every image is seen both ways in any two epochs running (Jordan 2024, "94% on CIFAR-10 in
3.29 seconds on a single GPU", arXiv:2404.00498). Evaluation walks the split once in order;
the last batch is padded and carries a mask.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from resnet_jax.data import transforms


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full training batches per epoch (the incomplete last batch is dropped)."""
    if num_examples < global_batch:
        raise ValueError(f"batch size {global_batch} exceeds the {num_examples} training examples")
    return num_examples // global_batch


def local_batch(global_batch: int, process_count: int) -> int:
    """Each process's part of a global batch."""
    if global_batch % process_count:
        raise ValueError(
            f"batch size {global_batch} does not divide across {process_count} processes"
        )
    return global_batch // process_count


@dataclasses.dataclass
class TrainPositions:
    """Local example j of this process -> the example index and the random draws of its
    place in the global batch: {"index", "offset", "flip", "seed"}.

    With `repeats` r > 1 (repeated augmentation, Hoffer et al. 2020, as DeiT and timm train):
    each global batch holds m = ceil(B/r) images of the epoch's permutation, each r times (the
    last copies cut where r does not divide B), at places m apart, so that its copies fall
    on different devices (all of them when there are at least r), each copy with its own
    random draws. An epoch keeps its number of steps and sees about 1/r of its permutation.
    `alternate_flips`: example i is mirrored in epoch e when `first_flips[i]` differs from
    e's parity (the module's docstring); the other draws stay as they were."""

    num_examples: int
    global_batch: int
    local_batch: int
    process_index: int
    seed: int
    pad: int  # pad-and-crop margin of in-memory images (0: none)
    repeats: int = 1
    alternate_flips: bool = False
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not 1 <= self.repeats <= self.global_batch:
            raise ValueError(f"num_repeats={self.repeats}: expected 1 to the global batch "
                             f"{self.global_batch}")
        if self.alternate_flips and self.repeats > 1:
            raise ValueError(f"alternate_flips with num_repeats={self.repeats}: the copies of "
                             "an image in a batch would all be mirrored alike; use one or the "
                             "other")

    @functools.cached_property
    def first_flips(self) -> np.ndarray:
        """Which examples alternating flips mirror in even epochs."""
        return np.random.default_rng([self.seed, 2]).random(self.num_examples) < 0.5

    def _flips(self, epoch: int, indices: np.ndarray, drawn: np.ndarray) -> np.ndarray:
        if not self.alternate_flips:
            return drawn
        return self.first_flips[indices] != bool(epoch % 2)

    def _epoch(self, epoch: int) -> np.ndarray:
        key = ("perm", epoch)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "perm"}
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            if self.repeats > 1:
                b, m = self.global_batch, -(-self.global_batch // self.repeats)
                steps = self.num_examples // b
                order = np.tile(order[:steps * m].reshape(steps, 1, m),
                                (1, self.repeats, 1)).reshape(steps, -1)[:, :b].reshape(-1)
            self._cache[key] = order
        return self._cache[key]

    def _draws(self, epoch: int, batch: int):
        key = ("draws", epoch, batch)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[0] != "draws"}
            rng = np.random.default_rng([self.seed, epoch, batch, 1])
            n = self.global_batch
            offsets, flips = transforms.crop_flip_params(rng, n, self.pad, True)
            seeds = rng.integers(0, 2**31, size=n)
            self._cache[key] = (offsets, flips, seeds)
        return self._cache[key]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(example indices, crop offsets, flips, per-example seeds) of this process's part
        of step `step`."""
        epoch, batch = divmod(int(step), self.num_examples // self.global_batch)
        place = slice(self.process_index * self.local_batch,
                      (self.process_index + 1) * self.local_batch)
        offsets, flips, seeds = self._draws(epoch, batch)
        order = self._epoch(epoch)[batch * self.global_batch:(batch + 1) * self.global_batch]
        return (order[place], offsets[place], self._flips(epoch, order[place], flips[place]),
                seeds[place])

    def __call__(self, j: int) -> dict[str, Any]:
        spe = self.num_examples // self.global_batch
        step, k = divmod(int(j), self.local_batch)
        epoch, batch = divmod(step, spe)
        place = self.process_index * self.local_batch + k
        offsets, flips, seeds = self._draws(epoch, batch)
        index = self._epoch(epoch)[batch * self.global_batch + place]
        return {"index": int(index), "offset": offsets[place],
                "flip": bool(self._flips(epoch, index, flips[place])), "seed": int(seeds[place])}


@dataclasses.dataclass
class EvalPositions:
    """Local example j -> the example at its place of the padded split, and its mask."""

    num_examples: int
    global_batch: int
    local_batch: int
    process_index: int

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(example indices, mask) of this process's part of batch `step`."""
        start = int(step) * self.global_batch + self.process_index * self.local_batch
        places = np.arange(start, start + self.local_batch)
        valid = places < self.num_examples
        return np.where(valid, places, 0), valid.astype(np.float32)

    def __call__(self, j: int) -> dict[str, Any]:
        step, k = divmod(int(j), self.local_batch)
        place = step * self.global_batch + self.process_index * self.local_batch + k
        valid = place < self.num_examples
        return {"index": place if valid else 0, "mask": np.float32(valid)}
