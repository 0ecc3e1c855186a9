"""Orbax checkpoints of the train state: the latest few and the best by test accuracy.

States are saved as host NumPy arrays (one global copy, whatever the strategy that trained
them) and restored as NumPy arrays that the caller places on its devices, so a checkpoint
written by a 4-device run resumes on 1 device or on several processes.

Each checkpoint holds the train state (step, params, batch_stats, optimizer state, which
includes the reduce-on-plateau state) and a JSON record `meta` (model, classes, seed, the
dropout key, the data position, ...). Orbax writes a step into a temporary directory and
renames it when complete, so a crash mid-write leaves the previous steps as they were. Once
a step is complete, a manifest of its files (size and SHA-256) is written beside the
managers; on restore a step whose files do not match its manifest, or that orbax cannot
read, is skipped with a warning and the one before it is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from flax.core import unfreeze

from resnet_jax.training import rundir
from resnet_jax.training.parallel import fetch
from resnet_jax.training.rundir import CheckpointError

log = logging.getLogger("resnet_jax")


def to_host(state: Any) -> Any:
    """A NumPy copy of a (replicated) state."""
    return jax.tree.map(fetch, state)




class _Damaged(Exception):
    """A step that cannot be read back as written."""


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    meta: dict[str, Any]


def file_digest(path: str) -> str:
    """SHA-256 of a file, hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def meta(identity: dict[str, Any], dropout_key: jax.Array, step: int, steps_per_epoch: int,
         pipeline: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint records beside the state: the run's identity and what is needed to
    continue exactly (`pipeline`: the input pipeline's position, {"workers", "state"})."""
    return {
        **({"pipeline": pipeline} if pipeline is not None else {}),
        **identity,
        # the dropout key of step s is fold_in(dropout_key, s): the RNG state is (key, step)
        "dropout_key": np.asarray(jax.random.key_data(dropout_key)).tolist(),
        # the data order is a function of (seed, step): the iterator resumes at `step`
        "data_position": {"step": int(step), "epoch": int(step // steps_per_epoch),
                          "batch_in_epoch": int(step % steps_per_epoch)},
    }


def check_fits(identity: dict[str, Any], meta: dict[str, Any], saved: Any, target: Any,
               where: str) -> None:
    """A ValueError naming what differs when a checkpoint (its `meta` and `saved` arrays) was
    written by another run (`identity`: model, classes, dataset, batch size, seed...) or holds
    differently shaped params or batch statistics than `target`."""
    for key, value in identity.items():
        if key in meta and meta[key] != value:
            raise ValueError(
                f"checkpoint {where} was written with {key}={meta[key]!r}, but this run has "
                f"{key}={value!r}; use another --workdir (or set {key} to match)")
    for part in ("params", "batch_stats"):
        a = _flat(saved[part] if isinstance(saved, dict) else getattr(saved, part))
        b = _flat(getattr(target, part))
        for key in sorted(set(a) | set(b)):
            name = f"{part}/{key}"
            if key not in b:
                raise ValueError(f"checkpoint {where} has {name}, which the model does not")
            if key not in a:
                raise ValueError(f"checkpoint {where} lacks {name}, which the model has")
            if tuple(np.shape(a[key])) != tuple(np.shape(b[key])):
                raise ValueError(f"checkpoint {where}: {name} has shape {tuple(np.shape(a[key]))}"
                                 f", the model's is {tuple(np.shape(b[key]))}")


def _flat(tree: Any) -> dict[str, Any]:
    return traverse_util.flatten_dict(unfreeze(tree), sep="/") if tree else {}


def directory_manifest(directory: str) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = [os.path.getsize(path), file_digest(path)]
    return out


def check_manifest(directory: str, manifest: dict[str, list]) -> str | None:
    """None if the files under `directory` match `manifest`, else what differs."""
    for rel, (size, digest) in sorted(manifest.items()):
        path = os.path.join(directory, rel)
        if not os.path.exists(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, {size} were written"
        if file_digest(path) != digest:
            return f"{rel} does not have the SHA-256 it was written with"
    return None


class Checkpointer:
    """Two orbax managers under `directory`: `latest/` (last `keep` steps) and `best/`."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manifests = os.path.join(self.directory, "manifests")
        # Distinct barrier names: both managers may save the same step at once, and on
        # several processes orbax synchronises each save with barriers keyed by step.
        self.latest = self._manager("latest", keep)
        self.best = self._manager("best", 1)

    def _manager(self, name: str, keep: int) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            os.path.join(self.directory, name),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix=name)),
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    def _pick(self, which: str) -> ocp.CheckpointManager:
        if which not in ("latest", "best"):
            raise ValueError(f"which={which!r}; expected 'latest' or 'best'")
        return self.latest if which == "latest" else self.best

    # -- saving ---------------------------------------------------------------------------

    def _save(self, which: str, state: Any, step: int, meta: dict | None) -> bool:
        manager = self._pick(which)
        if step in manager.all_steps():
            return False
        self._write_manifests()  # of the steps finished since the last save
        meta = dict(meta or {}, step=int(step))
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(to_host(state)), meta=ocp.args.JsonSave(meta)))
        return True

    def save_latest(self, state: Any, step: int, meta: dict | None = None) -> bool:
        """Save `state` as step `step` (asynchronously; `wait` blocks until written)."""
        return self._save("latest", state, step, meta)

    def save_best(self, state: Any, step: int, meta: dict | None = None) -> bool:
        return self._save("best", state, step, meta)

    def _manifest_path(self, which: str, step: int) -> str:
        return os.path.join(self.manifests, f"{which}_{step}.json")

    def _write_manifests(self) -> None:
        """Manifests of finished steps that have none yet; drop those of deleted steps."""
        if jax.process_index() != 0:
            return
        os.makedirs(self.manifests, exist_ok=True)
        for which in ("latest", "best"):
            manager = self._pick(which)
            steps = set(manager.all_steps())
            for step in steps:
                path = self._manifest_path(which, step)
                step_dir = os.path.join(manager.directory, str(step))
                if os.path.exists(path) or not os.path.isdir(step_dir):
                    continue
                if manager.is_saving_in_progress() and step == max(steps):
                    continue
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(directory_manifest(step_dir), f)
                os.replace(tmp, path)
            for name in os.listdir(self.manifests):
                if name.startswith(which + "_") and name.endswith(".json"):
                    if int(name[len(which) + 1:-5]) not in steps:
                        os.remove(os.path.join(self.manifests, name))

    # -- restoring ------------------------------------------------------------------------

    def steps(self, which: str = "latest") -> list[int]:
        return sorted(self._pick(which).all_steps())

    def damage(self, which: str, step: int) -> str | None:
        """What is wrong with the files of a step (None: nothing found, or no manifest)."""
        path = self._manifest_path(which, step)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            manifest = json.load(f)
        return check_manifest(os.path.join(self._pick(which).directory, str(step)), manifest)

    def _restore_step(self, which: str, step: int, target: Any | None, check=None) -> Restored:
        """Read one step: manifest, then meta and array metadata (handed to `check`, whose
        errors propagate), then the arrays. Failures to read raise _Damaged."""
        manager = self._pick(which)
        problem = self.damage(which, step)
        if problem:
            raise _Damaged(problem)
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = dict(meta["meta"] or {})
            tree = manager.item_metadata(step)["state"]
            tree = getattr(tree, "tree", tree)  # orbax's tree metadata wraps a plain tree
            saved = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
        except Exception as err:  # noqa: BLE001 - any failure to read means damage
            raise _Damaged(_reason(err)) from err
        if check is not None:
            check(meta, saved)
        like = saved if target is None else jax.tree.map(
            lambda x: np.empty(np.shape(x), x.dtype), target)
        try:
            out = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(like)))
        except Exception as err:  # noqa: BLE001
            raise _Damaged(_reason(err)) from err
        return Restored(step, out["state"], meta)

    def _quarantine(self, which: str, step: int) -> None:
        """Move a damaged step out of the manager's way (kept under damaged/ to look at)."""
        if jax.process_index() == 0:
            import shutil

            manager = self._pick(which)
            dest = os.path.join(self.directory, "damaged", f"{which}_{step}_{int(time.time())}")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(os.path.join(manager.directory, str(step)), dest)
            manifest = self._manifest_path(which, step)
            if os.path.exists(manifest):
                os.remove(manifest)
        self._pick(which).reload()

    def restore_checked(self, target: Any | None = None, which: str = "latest",
                        check=None) -> Restored | None:
        """The newest step that reads back intact, or None when there are no steps.

        A damaged step (files not matching its manifest, or unreadable) is skipped with a
        warning naming what is wrong, and moved to `damaged/` once an earlier step restored;
        if every step is damaged, CheckpointError. `check(meta, saved_arrays_like)` may raise
        to refuse a checkpoint that is intact but belongs to another run: that propagates.
        """
        steps = self.steps(which)
        problems, skipped = [], []
        for step in reversed(steps):
            try:
                restored = self._restore_step(which, step, target, check)
            except _Damaged as err:
                problems.append(f"step {step}: {err}")
                skipped.append(step)
                earlier = [s for s in steps if s < step]
                log.warning("checkpoint %s/%d is damaged (%s); %s", which, step, err,
                            f"falling back to step {earlier[-1]}" if earlier else "no earlier one")
                continue
            for bad in skipped:
                self._quarantine(which, bad)
            return restored
        if steps:
            raise CheckpointError(f"no usable {which} checkpoint under {self.directory}: "
                                  + "; ".join(problems))
        return None

    def restore_step(self, which: str, step: int, target: Any | None = None) -> Restored:
        """One step's state (NumPy, shaped like `target` if given) and meta."""
        return self._restore_step(which, step, target)

    def restore(self, target: Any, which: str = "latest", step: int | None = None) -> Any | None:
        """The saved state (NumPy) shaped like `target` (newest intact step by default)."""
        if step is not None:
            return self.restore_step(which, step, target).state
        restored = self.restore_checked(target, which)
        return None if restored is None else restored.state

    def restore_raw(self, which: str = "latest") -> tuple[int, Any] | None:
        """(step, saved state as nested dicts of NumPy arrays) with no target, or None."""
        restored = self.restore_checked(None, which)
        return None if restored is None else (restored.step, restored.state)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()
        self._write_manifests()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        self.best.close()


def selected_checkpoint(workdir: str) -> tuple[str, int | None]:
    """("best" or "latest", step or None) of the model the run in `workdir` hands over: the
    step selected.json names; before the run finished, its best checkpoint if it has one,
    else its latest (step None: the newest intact one)."""
    chosen = rundir.read_selected(workdir)
    if chosen:
        return ("latest" if chosen.get("by") == "last step" else "best"), int(chosen["step"])
    ckpt = Checkpointer(rundir.path(workdir, rundir.CHECKPOINTS))
    try:
        has_best = bool(ckpt.steps("best"))
    finally:
        ckpt.close()
    return ("best" if has_best else "latest"), None
