"""The grain input pipeline on real files: a tfds dataset prepared on disk without network,
image folders of JPEGs cut from real photographs, worker processes, corrupt files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.jpeg_folder import write_folder
from resnet_jax.data import pipeline
from resnet_jax.data import workers as workers_lib
from resnet_jax.data.images import CorruptImageError
from resnet_jax.data.sources import (DATASETS, DEBIAN_FASHION_MNIST, dataset_info, load_idx,
                                     load_source, scan_image_folder)
from resnet_jax.data.tfds_offline import jpeg_bytes, prepare, prepare_from_idx

from conftest import ROOT


def run_cli(config: str, workdir, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m experiments.train` with the config file and overrides."""
    return subprocess.run([sys.executable, "-m", "experiments.train", "--config",
                           os.path.join(ROOT, config), "--workdir", str(workdir), *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """train/ (5 classes x 24 JPEGs) and val/ (5 x 4), about 400x350, from real photographs."""
    root = str(tmp_path_factory.mktemp("photos"))
    return write_folder(root, train=120, val=20, classes=5)


def _copy(folder, tmp_path):
    out = str(tmp_path / "folder")
    shutil.copytree(folder, out)
    return out


# --- image folders ------------------------------------------------------------------------

def test_image_folder_classes_splits_and_holdout(photo_folder, tmp_path):
    classes, splits = scan_image_folder(photo_folder)
    assert classes == ("00_astronaut", "01_chelsea", "02_coffee", "03_rocket",
                       "04_hubble_deep_field")
    assert len(splits["train"]) == 120 and len(splits["val"]) == 20
    assert np.bincount(splits["val"].labels).tolist() == [4] * 5
    info = dataset_info("image_folder", photo_folder)
    assert info.num_classes == 5 and info.class_names == classes
    # without val/: a seeded tenth of train/ held out, disjoint from the rest
    folder = _copy(photo_folder, tmp_path)
    shutil.rmtree(os.path.join(folder, "val"))
    train = load_source("image_folder", "train", folder, holdout_fraction=0.1, seed=3)
    val = load_source("image_folder", "validation", folder, holdout_fraction=0.1, seed=3)
    again = load_source("image_folder", "val", folder, holdout_fraction=0.1, seed=3)
    assert len(train) == 108 and len(val) == 12 and val.paths == again.paths
    assert not set(train.paths) & set(val.paths)
    other = load_source("image_folder", "val", folder, holdout_fraction=0.1, seed=4)
    assert other.paths != val.paths
    with pytest.raises(ValueError, match=r"has splits \['train', 'val'\], not 'test'"):
        load_source("image_folder", "test", folder)


def test_image_folder_errors_name_the_path(photo_folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"{empty}/train: no such directory"):
        load_source("image_folder", "train", str(empty))
    (empty / "train").mkdir()
    with pytest.raises(ValueError, match=rf"{empty}/train: no class subfolders"):
        load_source("image_folder", "train", str(empty))

    folder = _copy(photo_folder, tmp_path)
    notes = os.path.join(folder, "train", "01_chelsea", "notes.txt")
    with open(notes, "w") as f:
        f.write("not an image")
    with pytest.raises(ValueError, match=rf"{notes}: not an image file"):
        load_source("image_folder", "train", folder)
    os.remove(notes)

    stray = os.path.join(folder, "val", "99_zebra")
    os.makedirs(stray)
    shutil.copy(os.path.join(folder, "val", "00_astronaut", os.listdir(
        os.path.join(folder, "val", "00_astronaut"))[0]), stray)
    with pytest.raises(ValueError, match=rf"{stray}: class '99_zebra' is not in train/"):
        load_source("image_folder", "train", folder)
    with pytest.raises(ValueError, match="needs data_dir"):
        dataset_info("image_folder", "")


def _corrupt_one(folder: str) -> str:
    """Truncate one training JPEG to its first 300 bytes; returns its path."""
    path = os.path.join(folder, "train", "02_coffee", sorted(os.listdir(
        os.path.join(folder, "train", "02_coffee")))[0])
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:300])
    return path


def test_a_corrupt_jpeg_stops_training_with_its_path_or_is_skipped_and_counted(
        photo_folder, tmp_path):
    folder = _copy(photo_folder, tmp_path)
    bad = _corrupt_one(folder)
    info = dataset_info("image_folder", folder)
    source = load_source("image_folder", "train", folder)
    index = source.paths.index(bad)

    def batches(skip):
        # one batch covering the whole split, so the corrupt file is in it
        return pipeline.train_batches(source, info,
                                      pipeline.TrainInput(len(source), 0, image_size=32,
                                                          skip_corrupt=skip))
    with pytest.raises(CorruptImageError,
                       match=rf"{bad}: (cannot decode|not a readable image).*skip_corrupt_images"):
        next(batches(False))
    batch = next(batches(True))
    assert int(batch["corrupt"].sum()) == 1 and len(batch["label"]) == len(source)
    # replaced by the next readable example: its label stands in the corrupt one's place
    assert np.isfinite(batch["image"]).all()
    del index

    evals = list(pipeline.eval_batches(source, info,
                                       pipeline.EvalInput(50, image_size=32, skip_corrupt=True)))
    assert sum(int(b["corrupt"].sum()) for b in evals) == 1
    assert sum(float(b["mask"].sum()) for b in evals) == len(source) - 1  # masked out


def test_a_run_counts_skipped_corrupt_images_in_its_metrics_or_stops_naming_the_file(
        photo_folder, tmp_path):
    folder = _copy(photo_folder, tmp_path)
    bad = _corrupt_one(folder)
    args = ["--config.model=cifar_resnet20", "--config.dataset=image_folder",
            f"--config.data_dir={folder}", "--config.eval_split=train", "--config.image_size=32",
            "--config.batch_size=8", "--config.eval_batch_size=40", "--config.num_steps=2",
            "--config.num_classes=0", "--config.progress_bar=False",
            "--config.augment=inception"]
    out = run_cli("experiments/configs/cifar10_resnet20.py", tmp_path / "stops", *args)
    assert out.returncode == 2 and bad in out.stderr, out.stderr[-3000:]
    assert "skip_corrupt_images" in out.stderr
    workdir = tmp_path / "skips"
    out = run_cli("experiments/configs/cifar10_resnet20.py", workdir, *args,
                  "--config.skip_corrupt_images=True")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"skipped corrupt image: {bad}" in out.stderr
    record = [json.loads(line) for line in open(workdir / "metrics.jsonl")][-1]
    # evaluation over train/ met it once (masked out); training counts what it replaced
    assert record["test_corrupt_images"] == 1 and record["test_count"] == 119
    assert "corrupt_images" in record


def test_worker_processes_give_the_same_batches_and_resume_from_their_state(photo_folder):
    info = dataset_info("image_folder", photo_folder)
    source = load_source("image_folder", "train", photo_folder)
    here = pipeline.train_batches(source, info, pipeline.TrainInput(16, 5, image_size=48))
    expected = [next(here) for _ in range(10)]  # crosses the epoch boundary (7 steps/epoch)
    workers = pipeline.train_batches(source, info,
                                     pipeline.TrainInput(16, 5, image_size=48, workers=2))
    try:
        got = [next(workers) for _ in range(4)]
        state = workers.get_state()
    finally:
        workers_lib.close(workers)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    json.dumps(state)  # checkpoint metadata is JSON
    resumed = pipeline.train_batches(source, info,
                                     pipeline.TrainInput(16, 5, image_size=48, workers=2),
                                                         state=state)
    by_step = pipeline.train_batches(source, info,
                                     pipeline.TrainInput(16, 5, image_size=48), start_step=4)
    try:
        for k in range(4, 10):
            a, b = next(resumed), next(by_step)
            np.testing.assert_array_equal(a["image"], expected[k]["image"])
            np.testing.assert_array_equal(b["image"], expected[k]["image"])
    finally:
        workers_lib.close(resumed)
    assert expected[0]["image"].shape == (16, 48, 48, 3)
    assert expected[0]["image"].dtype == np.uint8  # normalised on the device, in the step
    assert not np.array_equal(expected[0]["image"], expected[7]["image"])  # new epoch order


def test_eval_crops_are_the_central_crop_of_the_decoded_image(photo_folder):
    """The crop-then-resize path matches a plain reference: PIL decodes the whole image
    (libjpeg's accurate IDCT), the box torchvision's evaluation transform takes (the shorter
    side resized to floor(size / 0.875), the central size x size, its offsets rounded) is cut
    and resized by OpenCV. Where no reduced-scale decoding applies (224 from about 300
    pixels) only the fast IDCT differs; at 64 the 1/4-scale DCT decoding is a different
    filter."""
    import cv2
    from PIL import Image

    info = dataset_info("image_folder", photo_folder)
    source = load_source("image_folder", "val", photo_folder)
    diffs = {}
    for size in (224, 64):
        batch = next(pipeline.eval_batches(source, info, pipeline.EvalInput(4, image_size=size)))
        for k in range(4):
            with Image.open(source.paths[k]) as im:
                whole = np.asarray(im.convert("RGB"))
            h, w = whole.shape[:2]
            short = int(size / 0.875)  # torchvision: Resize(short), then CenterCrop(size)
            new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
            top_r, left_r = round((new_h - size) / 2), round((new_w - size) / 2)
            left, top, right, bottom = (int(round(v)) for v in (
                left_r * w / new_w, top_r * h / new_h, (left_r + size) * w / new_w,
                (top_r + size) * h / new_h))
            crop = whole[top:bottom, left:right]
            # at 64 (1/4-scale decoding, a low-pass filter) against area averaging: bilinear
            # from the full image would alias
            expected = cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR
                                  if size == 224 else cv2.INTER_AREA)
            got = batch["image"][k].astype(np.float64)  # uint8: normalised in the step
            diffs[size, k] = np.abs(got - expected).mean()
    # mean absolute difference in grey levels of 255. Measured: 0.90-0.93 at 224 (libjpeg's
    # fast IDCT differs from the accurate one by 0.95 on these photographs), 5.5-8.7 at 64
    # (the DCT's 1/4-scale filter against area averaging, on detailed photographs)
    assert all(d < 1.5 for (size, _), d in diffs.items() if size == 224), diffs
    assert all(d < 12.0 for (size, _), d in diffs.items() if size == 64), diffs


@pytest.mark.slow
def test_an_imagenet_layout_run_on_jpegs_trains_with_two_workers(photo_folder, tmp_path):
    """imagenet_resnet50's recipe on an image folder, crops of 64, three steps, two workers.
    One bottleneck block per stage: the input path is under test, not the depth (the full
    ResNet-50's compilation was most of this test's 45 s)."""
    workdir = tmp_path / "run"
    out = run_cli(
        "experiments/configs/imagenet_resnet50.py", workdir,
        "--config.dataset=image_folder", f"--config.data_dir={photo_folder}",
        "--config.eval_split=val", "--config.image_size=64", "--config.batch_size=8",
        "--config.eval_batch_size=20", "--config.num_steps=3", "--config.warmup_epochs=0",
        "--config.data_workers=2", "--config.num_classes=0", "--config.progress_bar=False",
        "--config.model_overrides={'stage_sizes':(1,1,1,1)}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "leaked shared_memory" not in out.stderr  # the workers' batches were all unlinked
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert records[-1]["step"] == 3 and records[-1]["test_count"] == 20
    config = json.loads((workdir / "config.json").read_text())
    assert config["dataset"] == "image_folder" and config["data_workers"] == 2


# --- a real tfds dataset prepared on disk, no network, no mocks ----------------------------

@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION_MNIST),
                    reason="needs the Debian package dataset-fashion-mnist (.ci/run installs it)")
def test_fashion_mnist_prepared_as_tfds_array_record_trains_through_data_source(tmp_path):
    data_dir = str(tmp_path / "tfds")
    version_dir = prepare_from_idx("fashion_mnist", DEBIAN_FASHION_MNIST, data_dir)
    assert version_dir.endswith(os.path.join("fashion_mnist", "3.0.1"))
    assert any(f.endswith("array_record-00000-of-00001") for f in os.listdir(version_dir))
    test = load_source("fashion_mnist", "test", data_dir, "tfds")
    idx = load_idx(DEBIAN_FASHION_MNIST, "test")
    # the same 10,000 images and labels (tfds stores them in its own order)
    assert len(test) == 10_000
    np.testing.assert_array_equal(np.bincount(test.labels), np.bincount(idx.labels))
    assert int(test.images.astype(np.int64).sum()) == int(idx.images.astype(np.int64).sum())

    workdir = tmp_path / "run"
    out = run_cli("experiments/configs/fashion_mnist.py", workdir, "--config.data_source=tfds",
                  f"--config.data_dir={data_dir}", "--config.train_subset=2000",
                  "--config.eval_subset=1000", "--config.num_epochs=1",
                  "--config.progress_bar=False")
    assert out.returncode == 0, out.stderr[-3000:]
    record = [json.loads(line) for line in open(workdir / "metrics.jsonl")][-1]
    assert record["test_count"] == 1000 and record["test_accuracy"] > 0.5


def test_imagenet_style_tfds_dataset_keeps_jpegs_encoded_until_the_pipeline(tmp_path):
    """imagenette, prepared offline from JPEGs of real photographs: read through
    tfds.data_source with the images left encoded, cropped by the pipeline."""
    from benchmarks.jpeg_folder import photographs, variant

    photos = photographs()[:3]
    rng = np.random.default_rng(0)
    data = {split: [(jpeg_bytes(variant(photos[k % 3], rng)), k % 3) for k in range(n)]
            for split, n in (("train", 24), ("validation", 10))}
    prepare("imagenette", {s: (lambda s=s: data[s]) for s in data}, str(tmp_path))
    train = load_source("imagenette", "train", str(tmp_path), "tfds")
    val = load_source("imagenette", "validation", str(tmp_path), "tfds")
    assert isinstance(train[0]["data"], bytes) and train[0]["data"][:2] == b"\xff\xd8"
    info = DATASETS["imagenette"]
    batches = pipeline.train_batches(train, info, pipeline.TrainInput(8, 0, image_size=64))
    first, second = next(batches), next(batches)
    again = next(pipeline.train_batches(train, info,
                                        pipeline.TrainInput(8, 0, image_size=64), start_step=1))
    np.testing.assert_array_equal(second["image"], again["image"])
    assert first["image"].shape == (8, 64, 64, 3)
    evals = list(pipeline.eval_batches(val, info, pipeline.EvalInput(4, image_size=64)))
    assert sum(float(b["mask"].sum()) for b in evals) == 10 and len(evals) == 3


def test_scanning_a_folder_of_many_classes_shows_a_progress_bar(tmp_path, capsys):
    from PIL import Image

    for c in range(60):
        folder = tmp_path / "train" / f"class_{c:03d}"
        folder.mkdir(parents=True)
        Image.fromarray(np.full((4, 4, 3), c, np.uint8)).save(folder / "a.png")
    classes, splits = scan_image_folder(str(tmp_path))
    assert len(classes) == 60 and len(splits["train"]) + len(splits["val"]) == 60
    assert f"scanning {tmp_path}/train" in capsys.readouterr().err
