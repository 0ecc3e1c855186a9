"""resnet_jax against PyTorch on the CPU: train- and eval-step throughput, time to the first
step and peak memory for a fixed suite of models, measured in one run, side by side.

    python -m experiments.benchmark --against torch [--models a,b] [--repeats 5]

Each (model, framework) pair runs in a fresh process so that peak memory (max RSS) is its
own. Both frameworks use the same number of threads (all cores unless --threads). Results:
experiments/results/cpu_vs_torch.json and .md (the table also belongs in RESULTS.md).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# model, input (H, W, C), batch
SUITE = [
    ("cifar_resnet20", (32, 32, 3), 128),
    ("cifar_resnet56", (32, 32, 3), 128),
    ("resnet18", (224, 224, 3), 32),
    ("fashion_mnist_resnet50", (28, 28, 1), 128),
    ("mnist_preact_resnet", (28, 28, 1), 32),
    ("alexnet_owt", (224, 224, 3), 32),
]


def _timed(fn, repeats: int, warmup: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `repeats` calls after `warmup`)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def run_jax(model_name, shape, batch, repeats, warmup) -> dict:
    import jax
    import numpy as np

    from resnet_jax.models import get_spec
    from resnet_jax.training import loop
    from resnet_jax.training.config import base_config
    from resnet_jax.training.optim import make_optimizer
    from resnet_jax.training.state import create_train_state
    from resnet_jax.training.steps import make_eval_step, make_train_step

    spec = get_spec(model_name)
    c = base_config()
    c.model, c.schedule, c.momentum = model_name, "constant", 0.9
    model = loop.build_model(c, spec.num_classes)
    tx, schedule = make_optimizer(c, 1000)
    state = jax.jit(create_train_state, static_argnums=(0, 1, 3))(model, tx, jax.random.key(0),
                                                                  shape)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    rng = np.random.default_rng(0)
    batch_data = {"image": jax.device_put(rng.normal(size=(batch, *shape)).astype(np.float32)),
                  "label": jax.device_put(rng.integers(0, spec.num_classes, batch).astype(np.int32))}
    train = jax.jit(make_train_step(model, tx, schedule), compiler_options=loop.compiler_options(c))
    evaluate = jax.jit(make_eval_step(model, spec.num_classes),
                       compiler_options=loop.compiler_options(c, "eval"))
    key = jax.random.key(1)
    holder = {"state": state}

    def train_once():
        holder["state"], m = train(holder["state"], batch_data, key)
        jax.block_until_ready(m)

    first, train_s = _timed(train_once, repeats, warmup)
    _, eval_s = _timed(lambda: jax.block_until_ready(evaluate(holder["state"], batch_data)),
                       repeats, warmup)
    return {"params": params, "first_step_s": first, "train_step_s": train_s, "eval_step_s": eval_s}


def run_torch(model_name, shape, batch, repeats, warmup, threads) -> dict:
    import torch

    from experiments.torch_peers import PEERS
    from resnet_jax.models import get_spec

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = get_spec(model_name)
    model = PEERS[model_name](spec.num_classes).to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch, shape[2], shape[0], shape[1]).to(memory_format=torch.channels_last)
    y = torch.randint(0, spec.num_classes, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def train_once():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def eval_once():
        model.eval()
        with torch.no_grad():
            model(x).argmax(-1)

    first, train_s = _timed(train_once, repeats, warmup)
    _, eval_s = _timed(eval_once, repeats, warmup)
    return {"params": params, "first_step_s": first, "train_step_s": train_s, "eval_step_s": eval_s}


def worker(framework, model_name, repeats, warmup, threads) -> dict:
    shape, batch = next((s, b) for m, s, b in SUITE if m == model_name)
    if framework == "jax":
        out = run_jax(model_name, shape, batch, repeats, warmup)
    else:
        out = run_torch(model_name, shape, batch, repeats, warmup, threads)
    out.update(framework=framework, model=model_name, batch=batch, input_shape=list(shape),
               train_images_per_s=batch / out["train_step_s"],
               eval_images_per_s=batch / out["eval_step_s"],
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def run_suite(models, repeats, warmup, threads) -> list[dict]:
    rows = []
    for model_name in models:
        pair = {}
        for framework in ("jax", "torch"):
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu",
                       PYTHONPATH=ROOT)
            cmd = [sys.executable, "-m", "experiments.speed_suite", framework, model_name,
                   str(repeats), str(warmup), str(threads)]
            out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                raise RuntimeError(f"{framework} {model_name} failed:\n{out.stderr[-3000:]}")
            pair[framework] = json.loads(line[-1][7:])
            print(f"{model_name:24s} {framework:5s} train {pair[framework]['train_images_per_s']:8.1f} "
                  f"img/s  eval {pair[framework]['eval_images_per_s']:8.1f} img/s", flush=True)
        if pair["jax"]["params"] != pair["torch"]["params"]:
            raise RuntimeError(f"{model_name}: parameter counts differ "
                               f"({pair['jax']['params']} vs {pair['torch']['params']})")
        rows.append({"model": model_name, "jax": pair["jax"], "torch": pair["torch"],
                     "train_ratio": pair["jax"]["train_images_per_s"] / pair["torch"]["train_images_per_s"],
                     "eval_ratio": pair["jax"]["eval_images_per_s"] / pair["torch"]["eval_images_per_s"]})
    return rows


def markdown(rows, meta) -> str:
    lines = [f"resnet_jax vs PyTorch {meta['torch']} on the CPU ({meta['cpu']}, {meta['threads']} "
             f"threads, float32; JAX {meta['jax']}), {meta['date']}. Median of {meta['repeats']} "
             "timed steps after warm-up; ratio = resnet_jax / PyTorch.", "",
             "| model | batch | params | train img/s JAX | train img/s torch | train ratio | "
             "eval img/s JAX | eval img/s torch | eval ratio | first step JAX (s) | "
             "first step torch (s) | peak RSS JAX (MiB) | peak RSS torch (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        j, t = r["jax"], r["torch"]
        lines.append(f"| {r['model']} | {j['batch']} | {j['params']:,} | {j['train_images_per_s']:.1f} | "
                     f"{t['train_images_per_s']:.1f} | {r['train_ratio']:.2f} | "
                     f"{j['eval_images_per_s']:.1f} | {t['eval_images_per_s']:.1f} | "
                     f"{r['eval_ratio']:.2f} | {j['first_step_s']:.1f} | {t['first_step_s']:.2f} | "
                     f"{j['peak_rss_mib']:.0f} | {t['peak_rss_mib']:.0f} |")
    ratios = [r["train_ratio"] for r in rows]
    geo = float(__import__("numpy").exp(__import__("numpy").mean(__import__("numpy").log(ratios))))
    lines += ["", f"Train-step ratio: geometric mean {geo:.2f}, minimum {min(ratios):.2f} "
              f"({min(rows, key=lambda r: r['train_ratio'])['model']})."]
    return "\n".join(lines) + "\n"


def main(models=None, repeats=5, warmup=2, threads=None) -> int:
    import jax
    import torch

    threads = threads or os.cpu_count()
    names = models or [m for m, _, _ in SUITE]
    rows = run_suite(names, repeats, warmup, threads)
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "threads": threads, "jax": jax.__version__, "torch": torch.__version__,
            "repeats": repeats}
    try:
        meta["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                           if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "cpu_vs_torch.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    table = markdown(rows, meta)
    with open(os.path.join(RESULTS, "cpu_vs_torch.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    framework, model_name, repeats, warmup, threads = sys.argv[1:6]
    print("RESULT " + json.dumps(worker(framework, model_name, int(repeats), int(warmup),
                                        int(threads))))
