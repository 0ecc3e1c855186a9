"""Where a run's time goes: the share spent waiting for data, a profile of a window of
steps, and the persistent compilation cache."""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import time

import numpy as np
import pytest

from resnet_jax.training import compilation_cache, experiment, loop
from resnet_jax.training.config import base_config, validate_config

SLOW_BATCH_S = 0.6  # what the slow source takes per batch; a step here takes 20-150 ms


def tiny_config(**overrides):
    c = base_config()
    c.update(dict(model="fashion_mnist_resnet8", dataset="fashion_mnist", train_subset=256,
                  eval_subset=100, batch_size=32, eval_batch_size=100, num_epochs=2,
                  log_every_steps=8, progress_bar=False, augment="flip"))
    c.update(overrides)
    return c


class Slow:
    """A training iterator that takes SLOW_BATCH_S for each batch (a starved accelerator)."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(SLOW_BATCH_S)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def close(self):
        getattr(self.inner, "close", lambda: None)()


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory):
    """One run of 16 steps of 16 images fed by a slow source, steps 3-5 profiled, compiled programs cached
    in its own directory; (workdir, warnings logged, cache directory)."""
    workdir = str(tmp_path_factory.mktemp("slow") / "run")
    cache = str(tmp_path_factory.mktemp("xla"))
    original = experiment.train_data
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("resnet_jax")
    logger.addHandler(handler)
    experiment.train_data = lambda *a, **k: Slow(original(*a, **k))
    try:
        loop.train_and_evaluate(tiny_config(profile_steps=(3, 5), compilation_cache=cache,
                                            batch_size=16, train_subset=128),
                                workdir)
    finally:
        experiment.train_data = original
        logger.removeHandler(handler)
        compilation_cache.configure("auto")  # the session's cache again for later tests
    return workdir, [r.getMessage() for r in records], cache


def test_a_slow_source_shows_in_data_wait_and_warns_once(slow_run):
    workdir, warnings, _ = slow_run
    lines = [json.loads(x) for x in open(os.path.join(workdir, "train_metrics.jsonl"))]
    assert [x["step"] for x in lines] == [8, 16]
    # the first window less so: three batches were ready when the compiled first step was
    assert all(x["data_wait"] > 0.5 for x in lines), lines
    records = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert all(r["train_data_wait"] > 0.5 for r in records), records
    # start-up and compilation (seconds) are not training: the throughput counts from the
    # first step: steps 2-8 (112 images) in about 4 x 0.6 s (three batches were prefetched
    # meanwhile), about 45 images/s; counted from the start (compilation: several seconds)
    # it would be below 15
    assert 20 < records[0]["images_per_second"] < 60, records[0]
    assert records[0]["seconds_to_first_step"] > 0  # reported once per start
    assert "seconds_to_first_step" not in records[1]
    about = [w for w in warnings if w.startswith("data_wait")]
    assert len(about) == 1, warnings  # once, not every period
    assert "data_workers" in about[0] and "--input-pipeline" in about[0]


def test_the_profile_window_is_on_disk_with_the_train_step_and_the_wait(slow_run):
    workdir, _, _ = slow_run
    traces = glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*",
                                    "*.trace.json.gz"))
    assert len(traces) == 1, traces
    assert glob.glob(os.path.join(os.path.dirname(traces[0]), "*.xplane.pb"))  # XProf's
    with gzip.open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    steps = {e.get("args", {}).get("step_num") for e in events if e.get("name") == "train"}
    assert {"3", "4", "5"} <= {str(s) for s in steps}, steps  # the window's steps, annotated
    assert any(e.get("name") == "data_wait" for e in events)
    assert any("train_step" in str(e.get("name")) for e in events)  # the compiled step ran


def test_the_compiled_steps_are_cached_where_the_config_says(slow_run):
    _, _, cache = slow_run
    assert len(os.listdir(cache)) >= 2  # the train and eval steps at least
    assert compilation_cache.resolve("") == compilation_cache.resolve("off") == ""
    assert compilation_cache.resolve("./off") == os.path.abspath("off")
    assert compilation_cache.resolve("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert compilation_cache.resolve("auto") == os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.mark.parametrize("steps", [(0, 3), (5, 2), (3,)])
def test_a_bad_profile_window_is_refused_naming_it(steps):
    with pytest.raises(ValueError, match=r"profile_steps=\("):
        validate_config(tiny_config(profile_steps=steps))


# --- every augmentation on every source --------------------------------------------------

def cifar_style_folder(root, per_class=(16, 4), classes=3, seed=0):
    """DIR/train/CLASS/*.png and DIR/val/CLASS/*.png of 32x32 images (no test/): each class a
    colour, with noise; and the same images in memory, in the folder's order."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val"), per_class):
        images, labels = [], []
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class{c}"))
            for k in range(n):
                base = np.zeros((32, 32, 3), np.int16)
                base[..., c] = 160
                image = np.clip(base + rng.integers(0, 90, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(os.path.join(root, split, f"class{c}", f"{k:03d}.png"))
                images.append(image)
                labels.append(c)
        arrays[split] = (np.stack(images), np.asarray(labels, np.int32))
    return str(root), arrays


def test_pad_crop_flip_on_decoded_images_equals_it_on_the_same_images_in_memory(tmp_path):
    from resnet_jax.data import pipeline
    from resnet_jax.data.sources import ArraySource, dataset_info, load_source

    folder, arrays = cifar_style_folder(tmp_path / "cifar")
    info = dataset_info("image_folder", folder, holdout_fraction=0.0)
    files = load_source("image_folder", "train", folder, holdout_fraction=0.0)
    assert list(files.labels) == list(arrays["train"][1])  # the same order
    memory = ArraySource(*arrays["train"])
    batches = {}
    for augment in ("crop_flip", "flip", "none"):
        decoded = next(pipeline.train_batches(files, info,
                                              pipeline.TrainInput(16, 3, augment=augment,
                                                                  image_size=32, threads=0)))
        in_memory = next(pipeline.train_batches(memory, info,
                                                pipeline.TrainInput(16, 3, augment=augment)))
        np.testing.assert_array_equal(decoded["image"], in_memory["image"])
        np.testing.assert_array_equal(decoded["label"], in_memory["label"])
        batches[augment] = decoded["image"]
    assert not np.array_equal(batches["crop_flip"], batches["flip"])  # shifted by the pad
    assert not np.array_equal(batches["flip"], batches["none"])  # mirrored
    # evaluation takes a 32x32 image whole when the model's size is 32
    val = load_source("image_folder", "val", folder, holdout_fraction=0.0)
    whole = next(pipeline.eval_batches(val, info, pipeline.EvalInput(12, image_size=32)))
    np.testing.assert_array_equal(whole["image"], arrays["val"][0])


def _mirrored_per_epoch(batches, n: int, epochs: int, per_epoch: int) -> list[dict]:
    """{image id: mirrored} per epoch, for images carrying their id + 1 in the left column."""
    seen = []
    for _ in range(epochs):
        epoch = {}
        for _ in range(per_epoch):
            images = next(batches)["image"][..., 0]
            mirrored = images[:, :, -1].any(axis=1)
            ids = np.where(mirrored, images[:, 0, -1], images[:, 0, 0]).astype(int) - 1
            epoch.update(zip(ids.tolist(), mirrored.tolist()))
        assert sorted(epoch) == list(range(n))  # every image once an epoch
        seen.append(epoch)
    return seen


def test_alternate_flips_mirror_each_image_in_exactly_one_of_two_epochs_running():
    from types import SimpleNamespace

    from resnet_jax.data import pipeline
    from resnet_jax.data.order import TrainPositions
    from resnet_jax.data.sources import DATASETS, ArraySource

    n, batch = 96, 16
    images = np.zeros((n, 28, 28, 1), np.uint8)
    images[:, :, 0, 0] = np.arange(1, n + 1)[:, None]
    source, info = ArraySource(images, np.arange(n, dtype=np.int32) % 10), DATASETS["fashion_mnist"]
    alternating = _mirrored_per_epoch(pipeline.train_batches(
        source, info, pipeline.TrainInput(batch, 3, augment="flip", alternate_flips=True)),
        n, 3, n // batch)
    assert 0.3 < np.mean(list(alternating[0].values())) < 0.7  # a random half first
    assert all(alternating[0][i] != alternating[1][i] for i in range(n))  # then the other
    assert alternating[2] == alternating[0]
    drawn = _mirrored_per_epoch(pipeline.train_batches(
        source, info, pipeline.TrainInput(batch, 3, augment="flip")), n, 2, n // batch)
    assert any(drawn[0][i] == drawn[1][i] for i in range(n))  # by default drawn anew
    # the run's config reaches the pipeline
    c = base_config()
    c.alternate_flips = True
    exp = SimpleNamespace(config=c, image_shape=(28, 28, 1),
                          durations=SimpleNamespace(total_steps=10))
    assert experiment.train_input(exp).alternate_flips
    with pytest.raises(ValueError, match=r"alternate_flips with augment='none': it alternates "
                                         r"the mirroring of 'flip' and 'crop_flip'"):
        pipeline.train_batches(source, info, pipeline.TrainInput(batch, 3, augment="none",
                                                                 alternate_flips=True))
    with pytest.raises(ValueError, match=r"alternate_flips with num_repeats=2"):
        TrainPositions(n, batch, batch, 0, 3, 0, repeats=2, alternate_flips=True)


def test_the_inception_crop_works_on_in_memory_images():
    from resnet_jax.data import pipeline
    from resnet_jax.data.sources import DATASETS, ArraySource

    rng = np.random.default_rng(1)
    source = ArraySource(rng.integers(0, 256, (64, 48, 48, 3), dtype=np.uint8),
                         np.zeros(64, np.int32))
    info = DATASETS["cifar10"]
    a = next(pipeline.train_batches(source, info, pipeline.TrainInput(32, 5, augment="inception")))
    b = next(pipeline.train_batches(source, info, pipeline.TrainInput(32, 5, augment="inception")))
    plain = next(pipeline.train_batches(source, info, pipeline.TrainInput(32, 5, augment="none")))
    np.testing.assert_array_equal(a["image"], b["image"])  # drawn from (seed, step)
    assert a["image"].shape == (32, 48, 48, 3) and a["image"].dtype == np.uint8
    changed = (a["image"] != plain["image"]).reshape(32, -1).any(axis=1)
    assert changed.mean() > 0.9  # nearly every image is a resized crop of itself


def test_a_cifar_style_folder_trains_with_the_cifar_recipe_and_tests_on_val(tmp_path):
    """cifar10_resnet20's recipe (pad-crop-flip, validation held out of train) on a folder of
    32x32 PNGs with train/ and val/ and no test/, with no split flag: val/ is the test split,
    said in the log and in selected.json."""
    from resnet_jax import load_config

    folder, arrays = cifar_style_folder(tmp_path / "cifar", per_class=(20, 4))
    c = load_config("cifar10_resnet20")
    c.update(dict(dataset="image_folder", data_dir=folder, image_size=32, num_classes=0,
                  num_steps=4, num_epochs=1, batch_size=16, eval_batch_size=12,
                  progress_bar=False, lr_boundaries=(2, 3)))
    c.model_overrides = {"stage_sizes": (1, 1, 1)}
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("resnet_jax")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        out = loop.train_and_evaluate(c, str(tmp_path / "run"))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert c.augment == "crop_flip" and c.validation_split == 0.1
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert config["eval_split"] == "val" and config["augment"] == "crop_flip"
    chosen = json.load(open(tmp_path / "run" / "selected.json"))
    assert chosen["test_count"] == 12 and "no test/" in chosen["test_split"]
    assert "val_accuracy" in out  # decisions on the part of train/ held out
    assert any("has no test/" in r.getMessage() for r in records)


# --- batches handed over in reused shared memory ------------------------------------------

def test_worker_batches_reuse_shared_slots_which_are_freed_with_their_batch_and_unlinked():
    import gc

    from resnet_jax.data import slots

    shared = slots.Slots(workers=1, nbytes=2 * 8 * 8 * 3, per_worker=2)
    names = set(shared.names[0])
    assert all(os.path.exists(f"/dev/shm/{n}") for n in names)
    to_slot = shared.to_slot()  # what a worker process runs (worker 0), here in this one
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8) for _ in range(4)]
    handed = [to_slot({"image": b, "label": np.zeros(2)}) for b in batches[:3]]
    assert isinstance(handed[0]["image"], slots.SlotRef)
    assert {handed[0]["image"].name, handed[1]["image"].name} == names
    fresh = handed[2]["image"]  # both slots busy: a fresh block of the pipeline's name
    assert isinstance(fresh, slots.FreshRef) and fresh.name.startswith(shared.prefix)
    np.testing.assert_array_equal(shared(handed[2])["image"], batches[2])
    assert not os.path.exists(f"/dev/shm/{fresh.name}")  # read once, unlinked at once
    on_its_way = to_slot({"image": batches[3]})["image"]  # never read: unlinked at close
    assert os.path.exists(f"/dev/shm/{on_its_way.name}")
    first = shared(handed[0])["image"]
    np.testing.assert_array_equal(first, batches[0])  # read in place
    del first
    gc.collect()  # the batch is gone: its slot is free again and gets the next batch
    again = to_slot({"image": batches[3]})["image"]
    assert again.name == handed[0]["image"].name
    kept = shared({"image": again})["image"]
    shared.close()
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)  # unlinked at close
    assert not os.path.exists(f"/dev/shm/{on_its_way.name}")
    np.testing.assert_array_equal(kept, batches[3])  # still readable while referenced


def test_a_close_that_meets_grains_thread_race_still_closes_everything_below():
    """grain's close can raise "cannot join thread before it is started" (a worker's prefetch
    thread created by another grain thread, not started yet; seen in CI with 8 workers closed
    after two steps), leaving the other workers open. grain_compat.close closes the rest."""
    from resnet_jax.data import grain_compat

    class Node:
        def __init__(self, parents=(), in_use=(), racy=0):
            self._parents, self._iterators_in_use, self.racy = list(parents), list(in_use), racy
            self.closed = False

        def close(self):
            if self.racy:
                self.racy -= 1
                raise RuntimeError("cannot join thread before it is started")
            self.closed = True

    workers = [Node(racy=2), Node(), Node()]
    interleave = Node(in_use=workers)
    top = Node(parents=[interleave], racy=1)  # the race surfaces through the top's close
    grain_compat.close(top)
    assert top.closed and interleave.closed and all(w.closed for w in workers)
    with pytest.raises(RuntimeError, match="another error"):
        class Broken(Node):
            def close(self):
                raise RuntimeError("another error")
        grain_compat.close(Broken())


def test_the_grain_internals_the_close_walks_are_those_of_the_installed_grain(tmp_path):
    """The walk of grain_compat reaches, on a real two-worker pipeline, each worker's process
    iterator and the thread that prefetches from it (the ones whose close can race): a grain
    that renames the private links it follows fails here, not by leaving workers behind."""
    import importlib.metadata

    from resnet_jax.data import grain_compat, pipeline
    from resnet_jax.data import workers as workers_lib
    from resnet_jax.data.sources import ArraySource, DatasetInfo

    assert importlib.metadata.version("grain") in grain_compat.TESTED
    source = ArraySource(np.zeros((64, 8, 8, 1), np.uint8), np.zeros(64, np.int32))
    info = DatasetInfo("none", 10, (8, 8, 1), (0.5,), (0.5,), "none")
    iterator = pipeline.train_batches(source, info,
                                      pipeline.TrainInput(8, 0, augment="none", workers=2))
    try:
        next(iterator), next(iterator)
        seen, todo = [], [iterator.grain_iterator]
        while todo:
            node = todo.pop()
            seen.append(type(node).__name__)
            todo += grain_compat.below(node)
    finally:
        workers_lib.close(iterator)
    assert seen.count("ProcessPrefetchDatasetIterator") == 2, seen
    assert seen.count("ThreadPrefetchDatasetIterator") >= 2, seen


def test_with_workers_only_the_slots_are_shared_memory_and_nothing_is_left_at_close(tmp_path):
    """Labels and masks cross pickled, images in the pipeline's slots or, with none free
    (workers ahead of a slow consumer), in blocks of the pipeline's name: grain would have put
    each array in fresh shared memory of its own, and one still on its way at close stayed
    linked (the "leaked shared_memory" warning at exit, one run in four of the two-worker
    image-folder test)."""
    from benchmarks.jpeg_folder import write_folder
    from resnet_jax.data import pipeline
    from resnet_jax.data import workers as workers_lib
    from resnet_jax.data.sources import dataset_info, load_source

    folder = write_folder(str(tmp_path / "photos"), train=48, classes=3)
    source = load_source("image_folder", "train", folder)
    iterator = pipeline.train_batches(source, dataset_info("image_folder", folder),
                                      pipeline.TrainInput(4, 0, image_size=32, workers=2,
                                                          end_step=24))
    names = {n for worker in iterator.slots.names for n in worker}
    kinds = set()
    for step, batch in enumerate(iterator):
        kinds |= {type(v) for v in batch.values()}
        time.sleep(0.2 if step < 3 else 0.0)  # the workers run ahead and fill their slots
        if step == 12:
            break
    assert all(os.path.exists(f"/dev/shm/{n}") for n in names)
    prefix = iterator.slots.prefix
    workers_lib.close(iterator)
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    assert kinds <= {np.ndarray}, kinds  # no grain SharedMemoryArray (an ndarray subclass)
