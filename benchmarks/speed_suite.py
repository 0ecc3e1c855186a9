"""resnet_jax against a peer on the CPU: train- and eval-step throughput, time to the first
step and peak memory for a fixed suite of models, measured in one run, side by side.

    python -m experiments.benchmark --against torch [--models a,b] [--repeats 5] [--rounds 3]
    python -m experiments.benchmark --against user  [--models a,b] ...

Peers: "torch", the same architectures in PyTorch (benchmarks/torch_peers.py); "user", a train
step written as a user of the library writes one (`get_model(name, **ops.cpu.layers())`,
optax, `jax.jit(..., compiler_options=ops.cpu.jit_options("train"))`, no engine code), to show
that the CPU kernels' speed is not the engine's alone. Every process first applies the CPU
kernels' malloc setting (`experiment.apply_process_settings`, as experiments.train does), so
the sides differ only in their steps.

Each (model, framework) pair runs in a fresh process so that peak memory (max RSS) is its
own, `--rounds` times with the two frameworks in alternating order: this VM's speed drifts by
up to 30% over minutes, and one pair of runs moved a model's ratio by as much. Both frameworks use the same number of threads (all cores unless --threads). Results:
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")

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
    """The training engine's single-device steps (its jit options, state donated)."""
    import jax
    import numpy as np

    from resnet_jax.models import get_spec
    from resnet_jax.training import experiment
    from resnet_jax.training.config import base_config
    from resnet_jax.training.durations import durations
    from resnet_jax.training.optim import make_optimizer
    from resnet_jax.training.state import create_train_state

    spec = get_spec(model_name)
    c = base_config()
    c.model, c.schedule, c.momentum = model_name, "constant", 0.9
    c.batch_size, c.eval_batch_size = batch, batch
    model = experiment.build_model(c, spec.num_classes)
    tx, schedule = make_optimizer(c, durations(c, 1000))
    state = jax.jit(create_train_state, static_argnums=(0, 1, 3))(model, tx, jax.random.key(0),
                                                                  shape)
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    rng = np.random.default_rng(0)
    batch_data = {"image": jax.device_put(rng.normal(size=(batch, *shape)).astype(np.float32)),
                  "label": jax.device_put(rng.integers(0, spec.num_classes, batch).astype(np.int32))}
    strategy = experiment.make_steps(c, model, spec.num_classes, tx, schedule)
    train, evaluate = strategy.train_step, strategy.eval_step
    key = jax.random.key(1)
    holder = {"state": state}

    def train_once():
        holder["state"], m = train(holder["state"], batch_data, key)
        jax.block_until_ready(m)

    first, train_s = _timed(train_once, repeats, warmup)
    _, eval_s = _timed(lambda: jax.block_until_ready(evaluate(holder["state"], batch_data)),
                       repeats, warmup)
    return {"params": params, "first_step_s": first, "train_step_s": train_s, "eval_step_s": eval_s}


def run_user(model_name, shape, batch, repeats, warmup) -> dict:
    """A train step as a user writes one: the zoo model with the CPU layers, optax SGD with
    momentum and weight decay, `jax.jit` with the CPU options; nothing of the engine."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from resnet_jax import get_model
    from resnet_jax.models import get_spec
    from resnet_jax.ops import cpu

    num_classes = get_spec(model_name).num_classes
    model = get_model(model_name, **cpu.layers())
    key = jax.random.key(0)
    variables = jax.jit(model.init)({"params": key, "dropout": key}, jnp.zeros((1, *shape)))
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    opt_state = tx.init(params)

    def train_step(params, batch_stats, opt_state, x, y, rng):
        def loss_fn(p):
            logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                          train=True, mutable=["batch_stats"],
                                          rngs={"dropout": rng})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates.get("batch_stats", batch_stats)

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    step = jax.jit(train_step, donate_argnums=(0, 1, 2),
                   compiler_options=cpu.jit_options("train"))
    predict = jax.jit(lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x).argmax(-1),
                      compiler_options=cpu.jit_options("eval"))
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(size=(batch, *shape)).astype(np.float32))
    y = jax.device_put(rng.integers(0, num_classes, batch).astype(np.int32))
    holder = {"state": (params, batch_stats, opt_state)}
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))

    def train_once():
        *state, loss = step(*holder["state"], x, y, key)
        holder["state"] = tuple(state)
        jax.block_until_ready(loss)

    first, train_s = _timed(train_once, repeats, warmup)
    _, eval_s = _timed(lambda: jax.block_until_ready(predict(*holder["state"][:2], x)),
                       repeats, warmup)
    return {"params": count, "first_step_s": first, "train_step_s": train_s, "eval_step_s": eval_s}


def run_torch(model_name, shape, batch, repeats, warmup, threads) -> dict:
    import torch

    from benchmarks.torch_peers import PEERS
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
    from resnet_jax.training import config, experiment

    experiment.apply_process_settings(config.base_config())  # as experiments.train does
    shape, batch = next((s, b) for m, s, b in SUITE if m == model_name)
    if framework == "jax":
        out = run_jax(model_name, shape, batch, repeats, warmup)
    elif framework == "user":
        out = run_user(model_name, shape, batch, repeats, warmup)
    else:
        out = run_torch(model_name, shape, batch, repeats, warmup, threads)
    out.update(framework=framework, model=model_name, batch=batch, input_shape=list(shape),
               train_images_per_s=batch / out["train_step_s"],
               eval_images_per_s=batch / out["eval_step_s"],
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def _run_worker(framework, model_name, repeats, warmup, threads) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "benchmarks.speed_suite", framework, model_name,
           str(repeats), str(warmup), str(threads)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not line:
        raise RuntimeError(f"{framework} {model_name} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def _median_record(records: list[dict]) -> dict:
    """One framework's rounds: the median of each timing, the rest from the first round."""
    out = dict(records[0])
    for key in ("first_step_s", "train_step_s", "eval_step_s", "train_images_per_s",
                "eval_images_per_s", "peak_rss_mib"):
        out[key] = statistics.median(r[key] for r in records)
    return out


def run_suite(models, repeats, warmup, threads, rounds: int = 3,
              pair: tuple[str, str] = ("jax", "torch")) -> list[dict]:
    """Each model: `rounds` pairs of fresh processes, the two sides of `pair` in alternating
    order (the first side first in odd rounds) so that a drift in the machine's speed does not
    favour either. The ratio (first / second) is the median of the per-round ratios."""
    a, b = pair
    rows = []
    for model_name in models:
        runs: dict[str, list[dict]] = {a: [], b: []}
        for r in range(rounds):
            for framework in (a, b) if r % 2 == 0 else (b, a):
                result = _run_worker(framework, model_name, repeats, warmup, threads)
                runs[framework].append(result)
                print(f"{model_name:24s} round {r + 1} {framework:5s} train "
                      f"{result['train_images_per_s']:8.1f} img/s  eval "
                      f"{result['eval_images_per_s']:8.1f} img/s", flush=True)
        if runs[a][0]["params"] != runs[b][0]["params"]:
            raise RuntimeError(f"{model_name}: parameter counts differ "
                               f"({runs[a][0]['params']} vs {runs[b][0]['params']})")
        ratios = {kind: [x[f"{kind}_images_per_s"] / y[f"{kind}_images_per_s"]
                         for x, y in zip(runs[a], runs[b])] for kind in ("train", "eval")}
        rows.append({"model": model_name, a: _median_record(runs[a]), b: _median_record(runs[b]),
                     "train_ratio": statistics.median(ratios["train"]),
                     "eval_ratio": statistics.median(ratios["eval"]),
                     "train_ratio_rounds": ratios["train"], "eval_ratio_rounds": ratios["eval"],
                     "rounds": runs})
    return rows


LABELS = {("jax", "torch"): ("JAX", "torch"), ("user", "jax"): ("user", "engine")}


def _intro(meta, pair) -> str:
    common = (f"({meta['cpu']}, {meta['threads']} threads, float32; JAX {meta['jax']}), "
              f"{meta['date']}. Median of {meta['repeats']} timed steps after warm-up, in each of "
              f"{meta['rounds']} rounds of fresh processes (the two sides in alternating order); "
              "figures are medians over the rounds, ratio = ")
    if pair == ("jax", "torch"):
        return (f"resnet_jax vs PyTorch {meta['torch']} on the CPU {common}resnet_jax / PyTorch "
                "(median of the per-round ratios; the rounds' train ratios in the last column).")
    return ("A plain `jax.jit` + optax train step with `ops.cpu.layers()` and "
            "`ops.cpu.jit_options()` against the training engine's step on the CPU "
            f"{common}user / engine (median of the per-round ratios; the rounds' train ratios "
            "in the last column).")


def markdown(rows, meta, pair: tuple[str, str] = ("jax", "torch")) -> str:
    """The suite's table: both sides' throughput, first step and peak memory, and ratios."""
    import numpy as np

    (a, b), (la, lb) = pair, LABELS[pair]
    lines = [_intro(meta, pair), "",
             f"| model | batch | params | train img/s {la} | train img/s {lb} | train ratio | "
             f"eval img/s {la} | eval img/s {lb} | eval ratio | first step {la} (s) | "
             f"first step {lb} (s) | peak RSS {la} (MiB) | peak RSS {lb} (MiB) | "
             "train ratio per round |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x, y = r[a], r[b]
        lines.append(f"| {r['model']} | {x['batch']} | {x['params']:,} | "
                     f"{x['train_images_per_s']:.1f} | {y['train_images_per_s']:.1f} | "
                     f"{r['train_ratio']:.2f} | {x['eval_images_per_s']:.1f} | "
                     f"{y['eval_images_per_s']:.1f} | {r['eval_ratio']:.2f} | "
                     f"{x['first_step_s']:.1f} | {y['first_step_s']:.2f} | "
                     f"{x['peak_rss_mib']:.0f} | {y['peak_rss_mib']:.0f} | "
                     + ", ".join(f"{v:.2f}" for v in r["train_ratio_rounds"]) + " |")
    ratios = [r["train_ratio"] for r in rows]
    geo = float(np.exp(np.mean(np.log(ratios))))
    worst = min(rows, key=lambda r: r["train_ratio"])
    lines += ["", f"Train-step ratio: geometric mean {geo:.2f}, minimum "
              f"{worst['train_ratio']:.2f} ({worst['model']})."]
    return "\n".join(lines) + "\n"


USER_SUITE = ("cifar_resnet20", "resnet18", "alexnet_owt")


def main(models=None, repeats=5, warmup=2, threads=None, rounds=3, out_dir=RESULTS,
         peer: str = "torch") -> int:
    """Run the suite against `peer` ("torch" or "user") and write its JSON and table."""
    import jax

    if peer not in ("torch", "user"):
        raise ValueError(f"peer={peer!r}; expected 'torch' or 'user'")
    threads = threads or os.cpu_count()
    names = models or ([m for m, _, _ in SUITE] if peer == "torch" else list(USER_SUITE))
    unknown = [m for m in names if m not in {n for n, _, _ in SUITE}]
    if unknown:
        raise ValueError(f"models {unknown} are not in the suite; expected some of "
                         f"{[n for n, _, _ in SUITE]}")
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: expected at least 1")
    pair = ("jax", "torch") if peer == "torch" else ("user", "jax")
    rows = run_suite(names, repeats, warmup, threads, rounds, pair)
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "threads": threads, "jax": jax.__version__, "repeats": repeats, "rounds": rounds}
    if peer == "torch":
        import torch

        meta["torch"] = torch.__version__
    try:
        meta["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                           if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    name = "cpu_vs_torch" if peer == "torch" else "user_vs_engine"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    table = markdown(rows, meta, pair)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    framework, model_name, repeats, warmup, threads = sys.argv[1:6]
    print("RESULT " + json.dumps(worker(framework, model_name, int(repeats), int(warmup),
                                        int(threads))))
