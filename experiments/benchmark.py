"""Train-step throughput of a model under a parallel strategy, over a range of device counts.

    python -m experiments.benchmark --model cifar_resnet20 --parallel pmap --devices 1,2,4
    python -m experiments.benchmark --against torch     # CPU speed suite vs PyTorch and Keras
    python -m experiments.benchmark --against user      # the engine's step vs a plain one
    python -m experiments.benchmark --input-pipeline    # JPEG input pipeline vs tf.data
    python -m experiments.benchmark --accelerator       # one GPU/TPU: train step vs PyTorch
    python -m experiments.benchmark --population 1,2,4,8  # populations vs members in turn

Each device count runs in a fresh process (on the CPU, JAX is split into N host devices
with XLA_FLAGS; on GPUs, CUDA_VISIBLE_DEVICES keeps the first N). The global batch is
`--batch-per-device` x N (weak scaling). Results go to stdout and to
experiments/results/scaling_MODEL_PARALLEL.json. On the CPU the forced devices share the
same cores, so only the correctness of the run means anything there; measure scaling on
a machine with real accelerators.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def measure(model_name: str, parallel: str, batch: int, steps: int, warmup: int,
            input_shape: tuple[int, int, int] | None, sync_bn: bool) -> dict:
    """Time `steps` train steps (after `warmup`) of `model_name` on all visible devices."""
    import jax
    import numpy as np

    from resnet_jax.models import get_spec
    from resnet_jax.training import experiment
    from resnet_jax.training.config import base_config
    from resnet_jax.training.durations import durations
    from resnet_jax.training.optim import make_optimizer
    from resnet_jax.training.state import create_train_state

    spec = get_spec(model_name)
    shape = input_shape or spec.input_shape
    c = base_config()
    c.model, c.parallel, c.sync_batch_norm = model_name, parallel, sync_bn
    c.schedule, c.batch_size, c.eval_batch_size = "constant", batch, batch
    model = experiment.build_model(c, spec.num_classes)
    tx, schedule = make_optimizer(c, durations(c, 1000))
    strategy = experiment.make_steps(c, model, spec.num_classes, tx, schedule)
    state = strategy.place_state(jax.jit(create_train_state, static_argnums=(0, 1, 3))(
        model, tx, jax.random.key(0), shape))
    rng = np.random.default_rng(0)
    batch_data = strategy.put_train_batch({
        "image": rng.normal(size=(batch, *shape)).astype(np.float32),
        "label": rng.integers(0, spec.num_classes, batch).astype(np.int32)})
    key = jax.random.key(1)
    start = time.perf_counter()
    state, m = strategy.train_step(state, batch_data, key)
    jax.block_until_ready(m)
    first = time.perf_counter() - start
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, m = strategy.train_step(state, batch_data, key)
        jax.block_until_ready(m)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"model": model_name, "parallel": parallel, "devices": jax.device_count(),
            "platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "global_batch": batch, "input_shape": list(shape), "sync_batch_norm": sync_bn,
            "first_step_seconds": round(first, 3), "median_step_seconds": round(median, 5),
            "images_per_second": round(batch / median, 2), "timed_steps": steps}


def _parse_shape(text: str | None):
    return tuple(int(v) for v in text.split(",")) if text else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar_resnet20")
    parser.add_argument("--parallel", default="pmap", choices=("single", "pmap", "sharded"))
    parser.add_argument("--devices", default="1,2,4", help="comma-separated device counts")
    parser.add_argument("--batch-per-device", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps (default 5; with --accelerator 20)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 2; with --accelerator 5)")
    parser.add_argument("--input-shape", default=None, help="H,W,C (default: the model's)")
    parser.add_argument("--sync-bn", action="store_true")
    parser.add_argument("--platform", default=os.environ.get("JAX_PLATFORMS", "cpu"),
                        help="cpu (forced host devices) or gpu (first N GPUs)")
    parser.add_argument("--output", default=None, help="JSON file (default under results/)")
    parser.add_argument("--against", choices=("torch", "user"), default=None,
                        help="the CPU speed suite against PyTorch and Keras 3 (JAX backend), or "
                             "the engine's step against "
                             "a plain jax.jit + optax step with ops.cpu (benchmarks/speed_suite.py)")
    parser.add_argument("--models", default=None,
                        help="with --against or --accelerator: a subset of the models")
    parser.add_argument("--repeats", type=int, default=None,
                        help="default 5; with --accelerator 3")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3,
                        help="with --against: pairs of runs per model, in alternating order")
    parser.add_argument("--results-dir", default=None,
                        help="with --against: where cpu_vs_torch.json/.md go (default results/)")
    parser.add_argument("--input-pipeline", action="store_true",
                        help="the JPEG input pipeline against tf.data and the previous one")
    parser.add_argument("--feeder", action="store_true",
                        help="with --input-pipeline: also the feeder's ceiling (ready-made "
                             "uint8 batches from W workers put on the device)")
    parser.add_argument("--feeder-only", action="store_true",
                        help="with --input-pipeline: only the feeder (no JPEGs, no tf.data)")
    parser.add_argument("--before", default="",
                        help="with --input-pipeline: a checkout of another commit, whose "
                             "pipeline is measured beside this one's")
    parser.add_argument("--workers", default="1,2",
                        help="with --input-pipeline: worker-process counts")
    parser.add_argument("--images", type=int, default=2000,
                        help="with --input-pipeline: JPEGs generated when --folder has none")
    parser.add_argument("--folder", default="/tmp/resnet_jax_jpegs",
                        help="with --input-pipeline: the image folder (DIR/train/CLASS/*.jpg)")
    parser.add_argument("--batches", type=int, default=24,
                        help="with --input-pipeline: batches of 256 timed per measurement")
    parser.add_argument("--accelerator", action="store_true",
                        help="train-step images/s, MFU, first-step time and input-boundness "
                             "on one device against PyTorch (benchmarks/accelerator.py)")
    parser.add_argument("--sizes", choices=("full", "tiny"), default="full",
                        help="with --accelerator: the benchmark's sizes, or CPU-sized ones")
    parser.add_argument("--dtypes", default="bfloat16,float32",
                        help="with --accelerator: compute dtypes")
    parser.add_argument("--data-workers", type=int, default=None,
                        help="with --accelerator: input worker processes (default: one per "
                             "CPU core; 0: in the benchmark's process)")
    parser.add_argument("--no-pipeline", action="store_true",
                        help="with --accelerator: skip the pipeline-fed measurement")
    parser.add_argument("--no-torch", action="store_true",
                        help="with --accelerator: skip the PyTorch peer")
    parser.add_argument("--no-torch-compile", action="store_true",
                        help="with --accelerator: the PyTorch peer in eager mode")
    parser.add_argument("--xla-flags", default=None,
                        help="with --accelerator: XLA_FLAGS for the resnet_jax side")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="with --accelerator: the device's peak, where the table lacks it")
    parser.add_argument("--population", default=None, metavar="N,N,...",
                        help="populations of these sizes against their members trained one "
                             "after another: step rate and whole job (benchmarks/population.py)")
    parser.add_argument("--job-steps", type=int, default=None,
                        help="--population: steps of each whole job (0: no jobs)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.population:
        from benchmarks import population

        try:
            return population.main([int(n) for n in args.population.split(",")],
                                   args.models.split(",") if args.models else None,
                                   args.steps or 10, 2 if args.warmup is None else args.warmup,
                                   args.rounds, args.job_steps,
                                   args.results_dir or population.RESULTS)
        except ValueError as err:
            parser.error(str(err))
    if args.accelerator:
        from benchmarks import accelerator

        if args.data_workers is not None and args.data_workers < 0:
            parser.error(f"--data-workers {args.data_workers}: expected >= 0")
        models = (args.models.split(",") if args.models else list(accelerator.SIZES[args.sizes]))
        try:
            accelerator.run(models, args.dtypes.split(","), args.sizes,
                            args.steps or 20, 5 if args.warmup is None else args.warmup,
                            args.repeats or 3,
                            -1 if args.no_pipeline else args.data_workers, args.folder,
                            not args.no_torch, not args.no_torch_compile, args.xla_flags,
                            args.peak_tflops, args.results_dir or accelerator.RESULTS)
        except ValueError as err:
            parser.error(str(err))
        return 0
    steps = args.steps or 5
    warmup = 2 if args.warmup is None else args.warmup
    repeats = args.repeats or 5
    if args.input_pipeline:
        from benchmarks import input_pipeline

        workers = [int(w) for w in args.workers.split(",")]
        if any(w < 1 for w in workers):
            parser.error(f"--workers {args.workers!r}: counts must be >= 1")
        if args.images < input_pipeline.BATCH:
            parser.error(f"--images {args.images}: at least one batch of "
                         f"{input_pipeline.BATCH} is needed")
        input_pipeline.run(workers, args.images, args.rounds, args.batches, args.folder,
                           args.results_dir or input_pipeline.RESULTS,
                           args.feeder or args.feeder_only,
                           () if args.feeder_only else ("train", "eval"), args.before)
        return 0
    if args.against:
        from benchmarks import speed_suite

        return speed_suite.main(args.models.split(",") if args.models else None, repeats,
                                warmup, args.threads, args.rounds,
                                args.results_dir or speed_suite.RESULTS, peer=args.against)
    counts = [int(d) for d in args.devices.split(",")]
    if any(n < 1 for n in counts):
        parser.error(f"--devices {args.devices!r}: counts must be >= 1")

    if args.worker:
        if args.platform == "cpu":
            from resnet_jax.training import config, experiment

            experiment.apply_process_settings(config.base_config())  # as experiments.train
        result = measure(args.model, args.parallel, args.batch_per_device * counts[0],
                         steps, warmup, _parse_shape(args.input_shape), args.sync_bn)
        print("RESULT " + json.dumps(result))
        return 0

    results = []
    for n in counts:
        if args.parallel == "single" and n > 1:
            print(f"skipping {n} devices: parallel=single uses one device", file=sys.stderr)
            continue
        env = dict(os.environ)
        if args.platform == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
            # the caller's own XLA flags kept, the device count replaced
            kept = [f for f in env.get("XLA_FLAGS", "").split()
                    if not f.startswith("--xla_force_host_platform_device_count")]
            env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
        cmd = [sys.executable, "-m", "experiments.benchmark", "--worker", "--model", args.model,
               "--parallel", args.parallel, "--devices", str(n), "--batch-per-device",
               str(args.batch_per_device), "--steps", str(steps), "--warmup",
               str(warmup)] + (["--input-shape", args.input_shape] if args.input_shape
                                    else []) + (["--sync-bn"] if args.sync_bn else [])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(out.stderr[-2000:], file=sys.stderr)
            return out.returncode or 1
        result = json.loads(lines[-1][len("RESULT "):])
        results.append(result)
        print(f"{n} device(s): {result['images_per_second']:.1f} images/s "
              f"(global batch {result['global_batch']}, first step {result['first_step_seconds']} s)")
    if results:
        base = results[0]["images_per_second"] / results[0]["devices"]
        for r in results:
            r["scaling_efficiency"] = round(r["images_per_second"] / (base * r["devices"]), 3)
    output = args.output or os.path.join(RESULTS, f"scaling_{args.model}_{args.parallel}.json")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
