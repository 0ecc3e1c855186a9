"""Train-step speed on one accelerator, resnet_jax against PyTorch on the same device.

    python -m experiments.benchmark --accelerator                      # the full sizes
    python -m experiments.benchmark --accelerator --sizes tiny         # a CPU-sized check

For each model and compute dtype (bfloat16: bfloat16 activations and float32 parameters;
float32), each side in a fresh process on the first device of the default backend:
- resnet_jax: the engine's jitted train step (SGD with momentum, weight decay, donated state;
  parallel="single", the XLA path, not the CPU backend's kernels) on a batch already on the
  device: images/s over `--steps` steps dispatched back to back (median of `--repeats`);
  the step's FLOPs from XLA's cost analysis of the same step lowered for the CPU (in a
  CPU-only process: the GPU backend's analysis leaves out cuDNN's convolutions), and from
  them the fraction of the device's peak FLOP/s used (MFU; peaks from the vendors' data
  sheets, dense, below);
  the seconds from building the model to the first step's result (trace, compile, run).
- resnet_jax fed by its input pipeline: the same step, each batch made by the grain
  pipeline with `--data-workers` processes (crop-and-flip of in-memory 32x32 images for the CIFAR
  nets; decode + random-resized crop + flip of JPEGs from an image folder for the 224 ones)
  and moved to the device by the training loop's prefetch. Input-bound when it runs below
  95% of the device-resident rate.
- PyTorch: the same architecture (benchmarks/torch_peers.py), channels-last, the same SGD,
  bfloat16 by `torch.autocast`, the model `torch.compile`d, cuDNN autotuning on; images/s
  and first-step seconds timed the same way.

Results: experiments/results/accelerator_PLATFORM[_tiny].json and .md, with the ratio
resnet_jax / PyTorch per row.
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

# model: (image side, batch) as the benchmark is defined; "tiny" for CPU-sized checks
SIZES = {
    "full": {"resnet50": (224, 256), "resnet18": (224, 256), "cifar_resnet20": (32, 512),
             "cifar_resnet56": (32, 512), "alexnet_owt": (224, 256)},
    "tiny": {"resnet50": (64, 4), "resnet18": (64, 8), "cifar_resnet20": (32, 16),
             "cifar_resnet56": (32, 8), "alexnet_owt": (96, 8)},
}
DTYPES = ("bfloat16", "float32")
INPUT_BOUND = 0.95  # fed by the pipeline below this fraction of the resident rate

# Dense peak FLOP/s (10^12) by device kind, from the vendors' data sheets (NVIDIA's figures
# "with sparsity" halved). float32 on NVIDIA GPUs: the TF32 tensor-core peak, the precision
# XLA and cuDNN use for float32 convolutions by default. First match wins.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.5, "float32": 494.5}),  # SXM
    ("H200", {"bfloat16": 989.5, "float32": 494.5}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("L4", {"bfloat16": 121.0, "float32": 60.0}),
    ("TPU v4", {"bfloat16": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),
    ("TPU v5p", {"bfloat16": 459.0}),
    ("TPU v6 lite", {"bfloat16": 918.0}),
)


def peak_flops(device_kind: str, dtype: str, override_tflops: float | None = None
               ) -> float | None:
    """The device's dense peak FLOP/s for `dtype`, or None where it is not known (CPUs)."""
    if override_tflops:
        return override_tflops * 1e12
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            value = peaks.get(dtype)
            return value * 1e12 if value else None
    return None


def step_flops(jitted, *args) -> float | None:
    """FLOPs of one call of `jitted(*args)`, from XLA's cost analysis of its lowered HLO.
    Call it where the CPU is jax's backend (`count_flops` runs in a process with
    JAX_PLATFORMS=cpu): the GPU backend gives no analysis before compilation, and after it
    counts nothing for the convolutions it hands to cuDNN (0.41 GFLOPs a ResNet-50 image,
    forward and backward, seen on an H200 with jax 0.11.2, against 23.7 counted on the CPU).
    The arithmetic is the model's, not the backend's."""
    import jax

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    cost = jitted.lower(*abstract).cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else None
    if not cost or not cost.get("flops"):
        return None
    return float(cost["flops"])


def _throughput(run_steps, steps: int, repeats: int, batch: int) -> float:
    """Images/s: the median over `repeats` of `steps` steps dispatched back to back."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_steps(steps)
        rates.append(steps * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def _synthetic_source(image: int, channels: int, batch: int, classes: int):
    import numpy as np

    from resnet_jax.data.sources import ArraySource

    rng = np.random.default_rng(0)
    n = 4 * batch
    return ArraySource(rng.integers(0, 256, (n, image, image, channels), dtype=np.uint8),
                       rng.integers(0, classes, n).astype(np.int32))


def _pipeline(model: str, image: int, batch: int, channels: int, classes: int,
              workers: int, folder: str):
    """The training pipeline of the model's kind of data, endless."""
    import dataclasses

    from resnet_jax.data import pipeline
    from resnet_jax.data import workers as workers_lib
    from resnet_jax.data.prefetch import prefetch
    from resnet_jax.data.sources import DATASETS, dataset_info, load_source

    if image <= 32:  # CIFAR-sized: in memory, pad-4 crop and flip
        source = _synthetic_source(image, channels, batch, classes)
        info = dataclasses.replace(DATASETS["cifar10"], image_shape=(image, image, channels))
        return pipeline.train_batches(source, info, pipeline.TrainInput(batch, 0, workers=workers))
    info = dataset_info("image_folder", folder, 0.0)
    source = load_source("image_folder", "train", folder, holdout_fraction=0.0)
    if len(source) < batch:
        raise ValueError(f"--folder {folder} has {len(source)} training images; {model} at "
                         f"batch {batch} needs at least {batch}")
    return pipeline.train_batches(source, info,
                                  pipeline.TrainInput(batch, 0, image_size=image, workers=workers))


def _engine(model: str, image: int, batch: int, dtype: str):
    """(spec, image shape, model, optimizer, strategy): the engine's single-device train step
    for the benchmark's settings (SGD with momentum and weight decay, constant rate)."""
    from resnet_jax.models import get_spec
    from resnet_jax.training import experiment
    from resnet_jax.training.config import base_config
    from resnet_jax.training.durations import durations
    from resnet_jax.training.optim import make_optimizer

    spec = get_spec(model)
    shape = (image, image, spec.input_shape[-1])
    c = base_config()
    c.model, c.parallel, c.dtype, c.cpu_kernels = model, "single", dtype, False
    c.schedule, c.batch_size, c.eval_batch_size = "constant", batch, batch
    net = experiment.build_model(c, spec.num_classes)
    tx, schedule = make_optimizer(c, durations(c, 1000))
    return spec, shape, net, tx, experiment.make_steps(c, net, spec.num_classes, tx, schedule)


def count_flops(model: str, image: int, batch: int, dtype: str) -> dict:
    """The train step's FLOPs, from its HLO lowered for the CPU (see step_flops)."""
    import jax
    import numpy as np

    from resnet_jax.training.state import create_train_state

    _, shape, net, tx, strategy = _engine(model, image, batch, dtype)
    state = jax.eval_shape(lambda: create_train_state(net, tx, jax.random.key(0), shape))
    data = {"image": np.zeros((batch, *shape), np.float32), "label": np.zeros(batch, np.int32)}
    return {"side": "flops", "flops_per_step": step_flops(strategy.train_step, state, data,
                                                          jax.random.key(1))}


def measure_jax(model: str, image: int, batch: int, dtype: str, steps: int, warmup: int,
                repeats: int, workers: int, folder: str) -> dict:
    import jax
    import numpy as np

    from resnet_jax.data import pipeline
    from resnet_jax.data import workers as workers_lib
    from resnet_jax.data.prefetch import prefetch
    from resnet_jax.training.state import create_train_state

    start = time.perf_counter()
    spec, shape, net, tx, strategy = _engine(model, image, batch, dtype)
    rng = np.random.default_rng(0)
    host = {"image": rng.normal(size=(batch, *shape)).astype(np.float32),
            "label": rng.integers(0, spec.num_classes, batch).astype(np.int32)}
    key = jax.random.key(1)
    state = strategy.place_state(jax.jit(create_train_state, static_argnums=(0, 1, 3))(
        net, tx, jax.random.key(0), shape))
    data = strategy.put_train_batch(host)
    state, m = strategy.train_step(state, data, key)
    jax.block_until_ready(m)
    first = time.perf_counter() - start

    def resident(n):
        nonlocal state
        for _ in range(n):
            state, out = strategy.train_step(state, data, key)
        jax.block_until_ready(out)

    resident(warmup)
    rate = _throughput(resident, steps, repeats, batch)

    fed_rate = None
    if workers >= 0:
        batches = _pipeline(model, image, batch, shape[-1], spec.num_classes, workers, folder)
        fed = prefetch(batches, strategy.put_train_batch)

        def from_pipeline(n):
            nonlocal state
            for _ in range(n):
                state, out = strategy.train_step(state, next(fed), key)
            jax.block_until_ready(out)

        try:
            from_pipeline(warmup + 2)  # worker start-up and the prefetched batches
            fed_rate = _throughput(from_pipeline, steps, 1, batch)
        finally:
            workers_lib.close(batches)
    device = jax.devices()[0]
    return {"side": "resnet_jax", "img_s": rate, "first_step_s": first,
            "fed_img_s": fed_rate, "device_kind": device.device_kind,
            "platform": jax.default_backend(), "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


def measure_torch(model: str, image: int, batch: int, dtype: str, steps: int, warmup: int,
                  repeats: int, compile_model: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from benchmarks.torch_peers import PEERS
    from resnet_jax.models import get_spec

    spec = get_spec(model)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    channels = spec.input_shape[-1]
    x = torch.randn(batch, channels, image, image, device=device).to(
        memory_format=torch.channels_last)
    y = torch.randint(0, spec.num_classes, (batch,), device=device)

    start = time.perf_counter()
    net = PEERS[model](spec.num_classes).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    forward = torch.compile(net) if compile_model else net

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    sync()
    first = time.perf_counter() - start

    def run(n):
        for _ in range(n):
            step()
        sync()

    run(warmup)
    rate = _throughput(run, steps, repeats, batch)
    name = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    return {"side": "torch", "img_s": rate, "first_step_s": first, "device_kind": name,
            "torch": torch.__version__, "compiled": compile_model}


def _worker(argv: list[str]) -> None:
    spec = json.loads(argv[0])
    side = spec.pop("side")
    measure = {"resnet_jax": measure_jax, "torch": measure_torch, "flops": count_flops}[side]
    result = measure(**spec)
    print("RESULT " + json.dumps(result), flush=True)


def _spawn(spec: dict, xla_flags: str | None) -> dict:
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="2")
    if xla_flags is not None and spec["side"] == "resnet_jax":
        env["XLA_FLAGS"] = xla_flags
    if spec["side"] == "flops":
        env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--worker",
                          json.dumps(spec)], env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{spec['side']} {spec['model']} {spec['dtype']} failed "
                           f"(exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _folder(folder: str, images: int) -> str:
    if not os.path.isdir(os.path.join(folder, "train")):
        from benchmarks.jpeg_folder import write_folder

        print(f"writing {images} JPEGs to {folder}", file=sys.stderr)
        write_folder(folder, images)
    return folder


def run(models: list[str], dtypes: list[str], sizes: str = "full", steps: int = 20,
        warmup: int = 5, repeats: int = 3, workers: int | None = None,
        folder: str = "/tmp/resnet_jax_jpegs", torch_peer: bool = True,
        compile_torch: bool = True, xla_flags: str | None = None,
        peak_tflops: float | None = None, results_dir: str = RESULTS) -> list[dict]:
    """Measure every (model, dtype) for both sides; write JSON and Markdown; return rows."""
    unknown = [m for m in models if m not in SIZES[sizes]]
    if unknown:
        raise ValueError(f"models {unknown}: this benchmark has {sorted(SIZES[sizes])}")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"dtypes {bad}: expected some of {DTYPES}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if any(SIZES[sizes][m][0] > 32 for m in models) and workers >= 0:
        most = max(SIZES[sizes][m][1] for m in models)
        _folder(folder, max(2 * most, 256))
    rows, failed = [], []
    for model in models:
        image, batch = SIZES[sizes][model]
        for dtype in dtypes:
            common = {"model": model, "image": image, "batch": batch, "dtype": dtype,
                      "steps": steps, "warmup": warmup, "repeats": repeats}
            try:  # a side that fails is reported and the run goes on to the next row
                jax_r = _spawn({"side": "resnet_jax", **common, "workers": workers,
                                "folder": folder}, xla_flags)
                shape = {k: common[k] for k in ("model", "image", "batch", "dtype")}
                flops = _spawn({"side": "flops", **shape}, None)["flops_per_step"]
            except RuntimeError as err:
                failed.append(str(err).splitlines()[0])
                print(err, file=sys.stderr, flush=True)
                continue
            peak = peak_flops(jax_r["device_kind"], dtype, peak_tflops)
            mfu = flops * jax_r["img_s"] / batch / peak if flops and peak else None
            torch_r = None
            if torch_peer:
                try:
                    torch_r = _spawn({"side": "torch", **common, "compile_model": compile_torch},
                                     None)
                except RuntimeError as err:
                    failed.append(str(err).splitlines()[0])
                    print(err, file=sys.stderr, flush=True)
            row = {**{k: common[k] for k in ("model", "image", "batch", "dtype")},
                   "jax_img_s": round(jax_r["img_s"], 2),
                   "jax_first_step_s": round(jax_r["first_step_s"], 2),
                   "gflops_per_image": round(flops / batch / 1e9, 3) if flops else None,
                   "mfu": round(mfu, 4) if mfu is not None else None,
                   "fed_img_s": (round(jax_r["fed_img_s"], 2)
                                 if jax_r["fed_img_s"] is not None else None),
                   "input_bound": (jax_r["fed_img_s"] < INPUT_BOUND * jax_r["img_s"]
                                   if jax_r["fed_img_s"] is not None else None),
                   "device_kind": jax_r["device_kind"], "platform": jax_r["platform"]}
            if torch_r:
                row.update({"torch_img_s": round(torch_r["img_s"], 2),
                            "torch_first_step_s": round(torch_r["first_step_s"], 2),
                            "ratio": round(jax_r["img_s"] / torch_r["img_s"], 3),
                            "torch_mfu": (round(mfu * torch_r["img_s"] / jax_r["img_s"], 4)
                                          if mfu is not None else None)})
            rows.append(row)
            print(_line(row), file=sys.stderr, flush=True)
            meta = {"date": time.strftime("%Y-%m-%d"), "jax": jax_r["jax"],
                    "xla_flags": jax_r["xla_flags"], "sizes": sizes, "steps": steps,
                    "repeats": repeats, "workers": workers, "cpu": _cpu_name(),
                    "torch": torch_r["torch"] if torch_r else None,
                    "torch_compiled": compile_torch if torch_peer else None}
            meta["failed"] = failed
            path = _write(rows, meta, results_dir)  # after every row: a stopped run keeps them
    if rows:
        print(f"wrote {path}.json and .md", file=sys.stderr)
    if failed:
        raise RuntimeError("failed: " + "; ".join(failed))
    return rows


def _write(rows: list[dict], meta: dict, results_dir: str) -> str:
    name = f"accelerator_{rows[0]['platform']}" + ("_tiny" if meta["sizes"] == "tiny" else "")
    path = os.path.join(results_dir, name)
    os.makedirs(results_dir, exist_ok=True)
    with open(path + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    with open(path + ".md", "w") as f:
        f.write(markdown(rows, meta))
    return path


def _line(r: dict) -> str:
    text = (f"{r['model']} {r['dtype']} batch {r['batch']}: resnet_jax {r['jax_img_s']:.1f} img/s"
            f" (first step {r['jax_first_step_s']} s")
    text += f", MFU {100 * r['mfu']:.1f}%)" if r["mfu"] is not None else ")"
    if r.get("torch_img_s"):
        text += f", PyTorch {r['torch_img_s']:.1f} img/s, ratio {r['ratio']}"
    if r["fed_img_s"] is not None:
        text += f"; fed by the pipeline {r['fed_img_s']:.1f} img/s"
    return text


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cell(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def markdown(rows: list[dict], meta: dict) -> str:
    device = rows[0]["device_kind"] if rows else "?"
    lines = [f"# Train step on {device}: resnet_jax against PyTorch", "",
             f"{meta['date']}, jax {meta['jax']}, PyTorch {meta['torch'] or '-'} "
             f"(torch.compile: {meta['torch_compiled']}), host CPU {meta['cpu']}, sizes "
             f"{meta['sizes']}, median of {meta['repeats']} x {meta['steps']} steps; input "
             f"pipeline with {meta['workers']} worker processes. XLA_FLAGS: "
             f"`{meta['xla_flags'] or '(none)'}`.", "",
             "| model | image | batch | dtype | resnet_jax img/s | PyTorch img/s | ratio | "
             "MFU resnet_jax | MFU PyTorch | GFLOPs/image | first step s (jax / torch) | "
             "fed by pipeline img/s | input-bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['image']} | {r['batch']} | {r['dtype']} | "
            f"{r['jax_img_s']:.1f} | {_cell(r.get('torch_img_s'), '{:.1f}')} | "
            f"{_cell(r.get('ratio'), '{:.2f}')} | {_cell(r['mfu'], '{:.1%}')} | "
            f"{_cell(r.get('torch_mfu'), '{:.1%}')} | {_cell(r['gflops_per_image'])} | "
            f"{r['jax_first_step_s']} / {_cell(r.get('torch_first_step_s'))} | "
            f"{_cell(r['fed_img_s'], '{:.1f}')} | "
            f"{_cell(r['input_bound'], '{}').replace('True', 'yes').replace('False', 'no')} |")
    lines += ["", "MFU: the step's FLOPs (XLA's cost analysis of the resnet_jax step lowered for "
              "the CPU; the same count for PyTorch) times steps/s over the device's dense peak; '-' where the "
              "peak is not known (CPUs). Ratio: resnet_jax / PyTorch images/s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
    else:
        raise SystemExit("run it as: python -m experiments.benchmark --accelerator")
