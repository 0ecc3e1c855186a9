"""The input pipeline against tf.data and against the previous pipeline, on the same JPEG
files, side by side in one run: images/s of the ImageNet train transform (decode,
Inception-style random-resized crop to 224, flip, normalise, batch 256) and of the eval
transform (decode, central 87.5% crop resized to 224, normalise, batch 256), for 1, 2, ...
worker processes.

    python -m experiments.benchmark --input-pipeline [--workers 1,2] [--images 2000]

Sides, each measured in a fresh process, the sides alternating within a round:
- resnet_jax: `pipeline.train_batches` / `eval_batches` over an image folder, W worker
  processes (grain), each with one decoding thread.
- tf.data: the same work with TensorFlow's ops (decode_and_crop_jpeg of a
  sample_distorted_bounding_box window, bilinear resize, random flip, normalise), W threads
  (`num_parallel_calls=W`, a private thread pool of W), batch 256, prefetch. TensorFlow is a
  benchmark-only dependency in its own environment (.venv-tf, `experiments/setup.sh tf`).
- previous: the pipeline before grain (one background thread, whole images decoded by PIL,
  then cropped), the same at every W.

The data: an image folder of JPEGs cut and rescaled from real photographs
(benchmarks/jpeg_folder.py, about 400x350, quality 90). Results:
experiments/results/input_pipeline.json (rows {"transform", "workers", "resnet_jax_img_s",
"tf_data_img_s", "previous_img_s"}) and .md.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
TF_PYTHON = os.path.join(ROOT, ".venv-tf", "bin", "python")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BATCH, SIZE = 256, 224


def _files(folder: str) -> tuple[list[str], list[int]]:
    classes = sorted(os.listdir(os.path.join(folder, "train")))
    paths, labels = [], []
    for k, name in enumerate(classes):
        d = os.path.join(folder, "train", name)
        for f in sorted(os.listdir(d)):
            paths.append(os.path.join(d, f))
            labels.append(k)
    return paths, labels


WARMUP = 4  # batches: more than any side's prefetch buffer holds, so the timed ones are made


def _rate(batches, n_batches: int) -> float:
    """Images/s over `n_batches` batches after WARMUP (start-up, worker spawn and the
    batches prefetched while starting excluded): the producing rate."""
    for _ in range(WARMUP):
        next(batches)
    start, images = time.perf_counter(), 0
    for _ in range(n_batches):
        images += len(next(batches)["label"])
    return images / (time.perf_counter() - start)


def measure_resnet_jax(folder: str, transform: str, workers: int, n_batches: int) -> float:
    import numpy as np

    from resnet_jax.data import pipeline
    from resnet_jax.data.sources import FileSource, dataset_info, load_source
    from resnet_jax.ops import cpu

    # the training process's malloc setting (experiments.train applies it): freed batches'
    # memory is reused rather than returned to the kernel and faulted in again
    cpu.retain_freed_memory()
    info = dataset_info("image_folder", folder, 0.0)
    source = load_source("image_folder", "train", folder, holdout_fraction=0.0)
    if transform == "train":
        batches = pipeline.train_batches(source, info, BATCH, 0, image_size=SIZE,
                                         workers=workers, threads=1)
    else:  # one evaluation pass over the files listed often enough for every timed batch
        repeat = -(-(n_batches + WARMUP + 1) * BATCH // len(source))
        source = FileSource(source.paths * repeat, np.tile(source.labels, repeat))
        batches = pipeline.eval_batches(source, info, BATCH, SIZE, workers=workers, threads=1)
    try:
        return _rate(batches, n_batches)
    finally:
        pipeline.close(batches)


def measure_previous(folder: str, transform: str, n_batches: int) -> float:
    """The pipeline before grain, kept here for this comparison: one background thread; each
    image decoded whole by PIL, then cropped and resized (numpy + PIL), batch normalised."""
    import queue
    import threading

    import numpy as np
    from PIL import Image

    from resnet_jax.data import transforms

    paths, labels = _files(folder)
    n = len(paths)
    steps = n // BATCH

    def load(k):
        with Image.open(paths[k]) as im:
            return np.asarray(im.convert("RGB"))

    def produce(q):
        step = 0
        while True:
            epoch, index = divmod(step, steps)
            if transform == "train":
                perm = np.random.default_rng([0, epoch]).permutation(n)
                indices = perm[index * BATCH:(index + 1) * BATCH]
                seeds = np.random.default_rng([0, epoch, index, 1]).integers(0, 2**31, BATCH)
            else:
                indices = np.arange(index * BATCH, (index + 1) * BATCH) % n
            images = []
            for k, i in enumerate(indices):
                image = load(i)
                if transform == "train":
                    r = np.random.default_rng(seeds[k])
                    image = transforms.random_resized_crop(r, image, SIZE)
                    if r.random() < 0.5:
                        image = image[:, ::-1]
                else:
                    image = transforms.center_crop(image, SIZE)
                images.append(image)
            q.put({"image": transforms.normalize(np.stack(images), MEAN, STD),
                   "label": np.asarray([labels[i] for i in indices], np.int32)})
            step += 1

    q: queue.Queue = queue.Queue(maxsize=2)
    threading.Thread(target=produce, args=(q,), daemon=True).start()
    return _rate(iter(q.get, None), n_batches)


def measure_tf_data(folder: str, transform: str, workers: int, n_batches: int) -> float:
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    paths, labels = _files(folder)
    mean, std = tf.constant(MEAN), tf.constant(STD)

    def train_map(path, label):
        data = tf.io.read_file(path)
        shape = tf.image.extract_jpeg_shape(data)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            shape, bounding_boxes=tf.zeros([1, 0, 4]), area_range=(0.08, 1.0),
            aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        y, x, _ = tf.unstack(begin)
        h, w, _ = tf.unstack(size)
        image = tf.image.decode_and_crop_jpeg(data, tf.stack([y, x, h, w]), channels=3)
        image = tf.image.resize(image, [SIZE, SIZE], method="bilinear")
        image = tf.image.random_flip_left_right(image)
        return {"image": (image / 255.0 - mean) / std, "label": label}

    def eval_map(path, label):
        data = tf.io.read_file(path)
        shape = tf.image.extract_jpeg_shape(data)
        side = tf.cast(tf.cast(tf.minimum(shape[0], shape[1]), tf.float32) * 0.875, tf.int32)
        y, x = (shape[0] - side) // 2, (shape[1] - side) // 2
        image = tf.image.decode_and_crop_jpeg(data, tf.stack([y, x, side, side]), channels=3)
        image = tf.image.resize(image, [SIZE, SIZE], method="bilinear")
        return {"image": (image / 255.0 - mean) / std, "label": label}

    ds = tf.data.Dataset.from_tensor_slices((paths, labels)).repeat()
    if transform == "train":
        ds = ds.shuffle(len(paths), seed=0)
    ds = ds.map(train_map if transform == "train" else eval_map, num_parallel_calls=workers,
                deterministic=True)
    ds = ds.batch(BATCH, drop_remainder=True).prefetch(2)
    options = tf.data.Options()
    options.threading.private_threadpool_size = workers
    options.threading.max_intra_op_parallelism = 1  # W threads in all, as the other sides
    options.deterministic = True
    ds = ds.with_options(options)
    return _rate(iter(ds.as_numpy_iterator()), n_batches)


def _worker(args: list[str]) -> None:
    side, folder, transform, workers, n_batches = args
    workers, n_batches = int(workers), int(n_batches)
    if side == "resnet_jax":
        rate = measure_resnet_jax(folder, transform, workers, n_batches)
    elif side == "tf_data":
        rate = measure_tf_data(folder, transform, workers, n_batches)
    else:
        rate = measure_previous(folder, transform, n_batches)
    print("RESULT " + json.dumps({"img_s": rate}), flush=True)


def _spawn(side: str, folder: str, transform: str, workers: int, n_batches: int) -> float:
    python = TF_PYTHON if side == "tf_data" else sys.executable
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    out = subprocess.run([python, "-m", "benchmarks.input_pipeline", "--worker", side, folder,
                          transform, str(workers), str(n_batches)],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])["img_s"]
    raise RuntimeError(f"{side} {transform} workers={workers} failed:\n{out.stderr[-3000:]}")


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Input pipeline, images/s ({meta['machine']}, {meta['images']} JPEGs about "
             f"400x350 from real photographs, batch {BATCH}, {SIZE}x{SIZE}; median of "
             f"{meta['rounds']} rounds)", "",
             "| transform | worker processes | resnet_jax (grain) | tf.data | previous | "
             "resnet_jax / tf.data | per worker |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['transform']} | {r['workers']} | {r['resnet_jax_img_s']:.0f} | "
            f"{r['tf_data_img_s']:.0f} | {r['previous_img_s']:.0f} | "
            f"{r['resnet_jax_img_s'] / r['tf_data_img_s']:.2f} | "
            f"{r['resnet_jax_img_s'] / r['workers']:.0f} |")
    return "\n".join(lines) + "\n"


def run(workers: list[int], images: int, rounds: int, n_batches: int, folder: str,
        results_dir: str = RESULTS) -> list[dict]:
    """Measure every (transform, workers) for the three sides; write JSON and Markdown."""
    from benchmarks.jpeg_folder import write_folder

    if not os.path.exists(TF_PYTHON):
        raise SystemExit(f"{TF_PYTHON} is missing: create it with `bash experiments/setup.sh tf`")
    if not os.path.isdir(os.path.join(folder, "train")):
        print(f"writing {images} JPEGs to {folder}", file=sys.stderr)
        write_folder(folder, images)
    rows = []
    for transform in ("train", "eval"):
        previous = statistics.median(_spawn("previous", folder, transform, 0, n_batches)
                                     for _ in range(rounds))
        for w in workers:
            ours, theirs = [], []
            for k in range(rounds):
                order = ("resnet_jax", "tf_data") if k % 2 == 0 else ("tf_data", "resnet_jax")
                for side in order:
                    rate = _spawn(side, folder, transform, w, n_batches)
                    (ours if side == "resnet_jax" else theirs).append(rate)
            row = {"transform": transform, "workers": w,
                   "resnet_jax_img_s": round(statistics.median(ours), 1),
                   "tf_data_img_s": round(statistics.median(theirs), 1),
                   "previous_img_s": round(previous, 1),
                   "rounds": {"resnet_jax": [round(x, 1) for x in ours],
                              "tf_data": [round(x, 1) for x in theirs]}}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    meta = {"machine": _machine(), "images": images, "rounds": rounds,
            "batches_timed": n_batches, "date": time.strftime("%Y-%m-%d")}
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, "input_pipeline.json"), "w") as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(results_dir, "input_pipeline_meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    with open(os.path.join(results_dir, "input_pipeline.md"), "w") as f:
        f.write(markdown(rows, meta))
    print(markdown(rows, meta))
    return rows


def _machine() -> str:
    model = platform.processor() or "cpu"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
