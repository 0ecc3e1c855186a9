"""The input pipeline against tf.data and against the previous pipeline, on the same JPEG
files, side by side in one run: images/s of the ImageNet train transform (decode,
Inception-style random-resized crop to 224, flip, batch 256) and of the eval transform
(decode, central 87.5% crop resized to 224, batch 256), for 1, 2, ... worker processes;
with `--feeder` also the ceiling the training process sets (ready-made batches from W
workers put on the device), with `--before DIR` another checkout's pipeline beside this one.

    python -m experiments.benchmark --input-pipeline [--feeder] [--before DIR] [--workers 1,2]

Sides, each measured in a fresh process, their order rotating round by round:
- resnet_jax: `pipeline.train_batches` / `eval_batches` over an image folder, W worker
  processes (grain), each with one decoding thread; uint8 batches, as the training process
  gets them (the step normalises them on the device).
- tf.data: the same work with TensorFlow's ops (decode_and_crop_jpeg of a
  sample_distorted_bounding_box window, bilinear resize, random flip, normalise), W threads
  (`num_parallel_calls=W`, a private thread pool of W), batch 256, prefetch. TensorFlow is a
  benchmark-only dependency in its own environment (.venv-tf, `experiments/setup.sh tf`).
- before: resnet_jax's side as the checkout DIR runs it.
- previous: the pipeline before grain (one background thread, whole images decoded by PIL,
  then cropped), the same at every W.

The data: an image folder of JPEGs cut and rescaled from real photographs
(benchmarks/jpeg_folder.py, about 400x350, quality 90). Results:
experiments/results/input_pipeline.json (rows {"transform", "workers", "resnet_jax_img_s",
"tf_data_img_s", "previous_img_s"[, "before_img_s"]}; feeder rows {"transform": "feeder",
"workers", "resnet_jax_img_s"}) and .md.
"""

from __future__ import annotations

import dataclasses
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
    from resnet_jax.data import workers as workers_lib
    from resnet_jax.data.prefetch import prefetch
    from resnet_jax.data.sources import FileSource, dataset_info, load_source
    from resnet_jax.ops import cpu

    # the training process's malloc setting (experiments.train applies it): freed batches'
    # memory is reused rather than returned to the kernel and faulted in again
    cpu.retain_freed_memory()
    info = dataset_info("image_folder", folder, 0.0)
    source = load_source("image_folder", "train", folder, holdout_fraction=0.0)
    if transform == "train":
        batches = pipeline.train_batches(source, info,
                                         pipeline.TrainInput(BATCH, 0, image_size=SIZE,
                                                             workers=workers, threads=1))
    else:  # one evaluation pass over the files listed often enough for every timed batch
        repeat = -(-(n_batches + WARMUP + 1) * BATCH // len(source))
        source = FileSource(source.paths * repeat, np.tile(source.labels, repeat))
        batches = pipeline.eval_batches(source, info,
                                        pipeline.EvalInput(BATCH, image_size=SIZE, workers=workers,
                                                           threads=1))
    try:
        return _rate(batches, n_batches)
    finally:
        workers_lib.close(batches)


@dataclasses.dataclass
class ReadyBatch:
    """A worker's element of the feeder: a ready-made uint8 batch (no decoding), the same
    bytes every time, handed over as a new batch would be (grain copies it to shared
    memory)."""

    batch: int

    def __call__(self, step: int) -> dict:
        import numpy as np

        if not hasattr(self, "_image"):
            rng = np.random.default_rng(0)
            self._image = rng.integers(0, 256, (self.batch, SIZE, SIZE, 3), dtype=np.uint8)
            self._label = np.zeros(self.batch, np.int32)
        return {"image": self._image, "label": self._label}


def measure_feeder(workers: int, n_batches: int) -> float:
    """The ceiling the training process sets: `workers` processes hand over ready-made
    uint8 batches through the pipeline's worker path, and the training process puts each
    on the device (the loop's prefetch thread, `jax.device_put`) and waits for it there."""
    import grain
    import jax

    from resnet_jax.data import pipeline
    from resnet_jax.data import workers as workers_lib
    from resnet_jax.data.prefetch import prefetch
    from resnet_jax.ops import cpu

    cpu.retain_freed_memory()
    device = jax.local_devices()[0]
    dataset = grain.MapDataset.range(0, 10**9).map(ReadyBatch(BATCH))
    iterator = workers_lib.with_workers(dataset, workers, 0, BATCH * SIZE * SIZE * 3)
    fed = prefetch(iterator, lambda b: jax.device_put(b, device))

    def on_device():
        while True:
            batch = next(fed)
            jax.block_until_ready(batch)
            yield batch

    try:
        return _rate(on_device(), n_batches)
    finally:
        fed.close()
        workers_lib.close(iterator)


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
    elif side == "feeder":
        rate = measure_feeder(workers, n_batches)
    elif side == "tf_data":
        rate = measure_tf_data(folder, transform, workers, n_batches)
    else:
        rate = measure_previous(folder, transform, n_batches)
    print("RESULT " + json.dumps({"img_s": rate}), flush=True)


def _spawn(side: str, folder: str, transform: str, workers: int, n_batches: int,
           before: str = "") -> float:
    """One measurement in a fresh process; sides "before" and "feeder_before": resnet_jax's
    side and the feeder as the checkout `before` (another commit) runs them."""
    python = TF_PYTHON if side == "tf_data" else sys.executable
    root = before if side in ("before", "feeder_before") else ROOT
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=root)
    worker = {"before": "resnet_jax", "feeder_before": "feeder"}.get(side, side)
    out = subprocess.run([python, "-m", "benchmarks.input_pipeline", "--worker",
                          worker, folder, transform, str(workers), str(n_batches)],
                         capture_output=True, text=True, cwd=root, env=env, timeout=900)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])["img_s"]
    raise RuntimeError(f"{side} {transform} workers={workers} failed:\n{out.stderr[-3000:]}")


def markdown(rows: list[dict], meta: dict) -> str:
    before = f" before ({meta['before']})" if meta.get("before") else ""
    if all(r["transform"] == "feeder" for r in rows):  # --feeder-only: no JPEG table
        return _feeder_markdown(rows, meta, before).lstrip("\n")
    lines = [f"Input pipeline, images/s ({meta['machine']}, {meta['images']} JPEGs about "
             f"400x350 from real photographs, batch {BATCH}, {SIZE}x{SIZE}; median of "
             f"{meta['rounds']} rounds). resnet_jax hands over uint8 batches (normalised on "
             f"the device, in the step); tf.data normalises in its map.", "",
             "| transform | worker processes | resnet_jax (grain) |"
             + (f" resnet_jax{before} |" if before else "")
             + " tf.data | previous | resnet_jax / tf.data | per worker |"
             + (" per worker, before |" if before else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if before else "")]
    for r in rows:
        if r["transform"] == "feeder":
            continue
        line = f"| {r['transform']} | {r['workers']} | {r['resnet_jax_img_s']:.0f} |"
        if before:
            line += f" {r['before_img_s']:.0f} |"
        line += (f" {r['tf_data_img_s']:.0f} | {r['previous_img_s']:.0f} | "
                 f"{r['resnet_jax_img_s'] / r['tf_data_img_s']:.2f} | "
                 f"{r['resnet_jax_img_s'] / r['workers']:.0f} |")
        if before:
            line += f" {r['before_img_s'] / r['workers']:.0f} |"
        lines.append(line)
    return "\n".join(lines) + "\n" + _feeder_markdown(rows, meta, before)


def _feeder_markdown(rows: list[dict], meta: dict, before: str) -> str:
    feeder = [r for r in rows if r["transform"] == "feeder"]
    lines = [""]
    if feeder:
        lines += ["", f"The feeder ({meta['machine']}, median of {meta['rounds']} rounds): "
                      f"ready-made uint8 {SIZE}x{SIZE} batches of {BATCH} from W "
                      f"worker processes, put on the device by the training process "
                      f"(the ceiling it sets)", "",
                  "| worker processes | images/s | batches/s | rounds |"
                  + (f" images/s{before} | rounds{before} |" if before else ""),
                  "|---:|---:|---:|---|" + ("---:|---|" if before else "")]
        for r in feeder:
            line = (f"| {r['workers']} | {r['resnet_jax_img_s']:.0f} | "
                    f"{r['resnet_jax_img_s'] / BATCH:.1f} | "
                    f"{', '.join(f'{x:.0f}' for x in r['rounds']['resnet_jax'])} |")
            if "before_img_s" in r:
                line += (f" {r['before_img_s']:.0f} | "
                         f"{', '.join(f'{x:.0f}' for x in r['rounds']['before'])} |")
            lines.append(line)
    return "\n".join(lines) + "\n"


def run(workers: list[int], images: int, rounds: int, n_batches: int, folder: str,
        results_dir: str = RESULTS, feeder: bool = False, transforms=("train", "eval"),
        before: str = "") -> list[dict]:
    """Measure every (transform, workers) for the sides, alternating their order round by
    round, and with `feeder` the feeder's ceiling; with `before` (a checkout of another
    commit) its resnet_jax side too; write JSON and Markdown."""
    from benchmarks.jpeg_folder import write_folder

    if transforms and not os.path.exists(TF_PYTHON):
        raise SystemExit(f"{TF_PYTHON} is missing: create it with `bash experiments/setup.sh tf`")
    if transforms and not os.path.isdir(os.path.join(folder, "train")):
        print(f"writing {images} JPEGs to {folder}", file=sys.stderr)
        write_folder(folder, images)
    rows = []
    sides = ("resnet_jax", "tf_data") + (("before",) if before else ())
    for transform in transforms:
        previous = statistics.median(_spawn("previous", folder, transform, 0, n_batches)
                                     for _ in range(rounds))
        for w in workers:
            rates: dict[str, list[float]] = {side: [] for side in sides}
            for k in range(rounds):
                for side in sides[k % len(sides):] + sides[:k % len(sides)]:
                    rates[side].append(_spawn(side, folder, transform, w, n_batches, before))
            row = {"transform": transform, "workers": w}
            row.update({f"{side}_img_s": round(statistics.median(rates[side]), 1)
                        for side in sides})
            row["previous_img_s"] = round(previous, 1)
            row["rounds"] = {side: [round(x, 1) for x in rates[side]] for side in sides}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if feeder:
        sides = ("feeder",) + (("feeder_before",) if before else ())
        for w in workers:
            got: dict[str, list[float]] = {s: [] for s in sides}
            for r in range(rounds):  # the sides in rotating order
                for s in sides[r % len(sides):] + sides[:r % len(sides)]:
                    got[s].append(_spawn(s, folder, "feeder", w, n_batches * 4, before))
            row = {"transform": "feeder", "workers": w,
                   "resnet_jax_img_s": round(statistics.median(got["feeder"]), 1),
                   "rounds": {"resnet_jax": [round(x, 1) for x in got["feeder"]]}}
            if before:
                row["before_img_s"] = round(statistics.median(got["feeder_before"]), 1)
                row["rounds"]["before"] = [round(x, 1) for x in got["feeder_before"]]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    meta = {"machine": _machine(), "images": images, "rounds": rounds,
            "batches_timed": n_batches, "date": time.strftime("%Y-%m-%d")}
    if before:
        meta["before"] = subprocess.run(["git", "-C", before, "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True).stdout.strip() or before
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
