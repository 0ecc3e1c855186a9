"""resnet_jax against its peers on the CPU: train- and eval-step throughput, time to the first
step and peak memory for a fixed suite of models, measured in one run, side by side.

    python -m experiments.benchmark --against torch [--models a,b] [--repeats 5] [--rounds 3]
    python -m experiments.benchmark --against user  [--models a,b] ...

Peers: with "torch", PyTorch (the same architectures, benchmarks/torch_peers.py) and Keras 3
on its JAX backend (keras-hub's ResNets where they are the same net, the others written in
Keras, benchmarks/keras_peers.py), each a ratio column; by default on the four nets the CPU
target is stated on (HEADLINE), any of SUITE with --models. "user": a train step written as a
user of the library writes one (`get_model(name, **ops.cpu.layers())`, optax,
`jax.jit(..., compiler_options=ops.cpu.jit_options("train"))`, no engine code), to show that
the CPU kernels' speed is not the engine's alone. Every process first applies the CPU
kernels' malloc setting (`experiment.apply_process_settings`, as experiments.train does), so
the sides differ only in their steps.

Each (model, side) pair runs in a fresh process so that peak memory (max RSS) is its own,
`--rounds` times with the sides' order rotated each round: this VM's speed drifts by up to
30% over minutes, and one pair of runs moved a model's ratio by as much. Every side uses the
same number of threads (all cores unless --threads). Results:
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


def run_keras(model_name, shape, batch, repeats, warmup) -> dict:
    """Keras 3 on its JAX backend as its users train: the model compiled with SGD (momentum,
    weight decay) and sparse cross-entropy (XLA's jit, Keras's defaults), one step per
    `train_on_batch` (measured equal to `fit()` per step: 0.64 s both at cifar_resnet20),
    `predict_on_batch` for the eval step."""
    import jax
    import keras
    import numpy as np

    from benchmarks.keras_peers import PEERS
    from resnet_jax.models import get_spec

    if keras.backend.backend() != "jax":
        raise RuntimeError(f"Keras runs on {keras.backend.backend()!r}; set KERAS_BACKEND=jax")
    keras.utils.set_random_seed(0)
    num_classes = get_spec(model_name).num_classes
    model = PEERS[model_name](num_classes, shape)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    params = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.normal(size=(batch, *shape)).astype(np.float32))
    y = jax.device_put(rng.integers(0, num_classes, batch).astype(np.int32))
    first, train_s = _timed(lambda: model.train_on_batch(x, y), repeats, warmup)
    _, eval_s = _timed(lambda: model.predict_on_batch(x).argmax(-1), repeats, warmup)
    return {"params": params, "first_step_s": first, "train_step_s": train_s, "eval_step_s": eval_s}


def worker(framework, model_name, repeats, warmup, threads) -> dict:
    from resnet_jax.training import config, experiment

    experiment.apply_process_settings(config.base_config())  # as experiments.train does
    shape, batch = next((s, b) for m, s, b in SUITE if m == model_name)
    if framework == "jax":
        out = run_jax(model_name, shape, batch, repeats, warmup)
    elif framework == "user":
        out = run_user(model_name, shape, batch, repeats, warmup)
    elif framework == "keras":
        out = run_keras(model_name, shape, batch, repeats, warmup)
    else:
        out = run_torch(model_name, shape, batch, repeats, warmup, threads)
    out.update(framework=framework, model=model_name, batch=batch, input_shape=list(shape),
               train_images_per_s=batch / out["train_step_s"],
               eval_images_per_s=batch / out["eval_step_s"],
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def _result_line(stdout: str) -> str | None:
    """The last line of a worker's output that carries its record (`RESULT {json}`)."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return lines[-1] if lines else None


def worker_output(framework, model_name, repeats, warmup, threads, env_changes=None) -> str:
    """The stdout of `worker` in a fresh process, which ends with its RESULT line;
    `env_changes`: variables to set there (None: unset)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               KERAS_BACKEND="jax")
    for name, value in (env_changes or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    cmd = [sys.executable, "-m", "benchmarks.speed_suite", framework, model_name,
           str(repeats), str(warmup), str(threads)]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode or _result_line(out.stdout) is None:
        raise RuntimeError(f"{framework} {model_name} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def _run_worker(framework, model_name, repeats, warmup, threads, env_changes=None) -> dict:
    """`worker`'s record, from a fresh process (`worker_output`)."""
    stdout = worker_output(framework, model_name, repeats, warmup, threads, env_changes)
    return json.loads(_result_line(stdout)[len("RESULT "):])


def _median_record(records: list[dict]) -> dict:
    """One framework's rounds: the median of each timing, the rest from the first round."""
    out = dict(records[0])
    for key in ("first_step_s", "train_step_s", "eval_step_s", "train_images_per_s",
                "eval_images_per_s", "peak_rss_mib"):
        out[key] = statistics.median(r[key] for r in records)
    return out


def run_suite(models, repeats, warmup, threads, rounds: int = 3,
              sides: tuple[str, ...] = ("jax", "torch")) -> list[dict]:
    """Each model: `rounds` sets of fresh processes, one per side, the order rotated by one
    side per round (two sides alternate) so that a drift in the machine's speed favours none.
    Ratios are the first side's throughput over each other side's, the median of the
    per-round ratios; the first peer's are also the row's `train_ratio`/`eval_ratio`."""
    a, peers = sides[0], sides[1:]
    rows = []
    for model_name in models:
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(rounds):
            k = r % len(sides)
            for framework in sides[k:] + sides[:k]:
                result = _run_worker(framework, model_name, repeats, warmup, threads)
                runs[framework].append(result)
                print(f"{model_name:24s} round {r + 1} {framework:5s} train "
                      f"{result['train_images_per_s']:8.1f} img/s  eval "
                      f"{result['eval_images_per_s']:8.1f} img/s", flush=True)
        counts = {side: runs[side][0]["params"] for side in sides}
        if len(set(counts.values())) > 1:
            raise RuntimeError(f"{model_name}: parameter counts differ ({counts})")
        row = {"model": model_name, **{side: _median_record(runs[side]) for side in sides},
               "ratios": {}, "rounds": runs}
        for peer in peers:
            per_round = {kind: [x[f"{kind}_images_per_s"] / y[f"{kind}_images_per_s"]
                                for x, y in zip(runs[a], runs[peer])] for kind in ("train", "eval")}
            row["ratios"][peer] = {"train": statistics.median(per_round["train"]),
                                   "eval": statistics.median(per_round["eval"]),
                                   "train_rounds": per_round["train"],
                                   "eval_rounds": per_round["eval"]}
        first = row["ratios"][peers[0]]
        row.update(train_ratio=first["train"], eval_ratio=first["eval"],
                   train_ratio_rounds=first["train_rounds"], eval_ratio_rounds=first["eval_rounds"])
        rows.append(row)
    return rows


LABELS = {"jax": "JAX", "torch": "torch", "keras": "Keras", "user": "user"}


def _label(side: str, sides: tuple[str, ...]) -> str:
    """A side's column label; the engine's step is "engine" beside the user's."""
    return "engine" if side == "jax" and sides[0] == "user" else LABELS[side]
# The nets the CPU target is stated on (geometric mean of their train ratios).
HEADLINE = ("cifar_resnet20", "cifar_resnet56", "resnet18", "alexnet_owt")


def _intro(meta, sides) -> str:
    common = (f"({meta['cpu']}, {meta['threads']} threads, float32; JAX {meta['jax']}), "
              f"{meta['date']}. Median of {meta['repeats']} timed steps after warm-up, in each of "
              f"{meta['rounds']} rounds of fresh processes (the sides' order rotated each round); "
              "figures are medians over the rounds, ratio = ")
    if sides[0] == "jax":
        peers = " and ".join({"torch": f"PyTorch {meta.get('torch')}",
                              "keras": f"Keras {meta.get('keras')} (JAX backend, keras-hub "
                                       f"{meta.get('keras_hub')})"}[p] for p in sides[1:])
        return (f"resnet_jax vs {peers} on the CPU {common}resnet_jax / peer "
                "(median of the per-round ratios; the rounds' train ratios in the last columns).")
    return ("A plain `jax.jit` + optax train step with `ops.cpu.layers()` and "
            "`ops.cpu.jit_options()` against the training engine's step on the CPU "
            f"{common}user / engine (median of the per-round ratios; the rounds' train ratios "
            "in the last column).")


def _geomean(values) -> float:
    import numpy as np

    return float(np.exp(np.mean(np.log(list(values)))))


def markdown(rows, meta, sides: tuple[str, ...] = ("jax", "torch")) -> str:
    """The suite's table: every side's throughput, first step and peak memory, and the first
    side's ratios against each peer, with their geometric means."""
    a, peers = sides[0], sides[1:]
    head, rule = ["model", "batch", "params"], []
    for kind in ("train", "eval"):
        head += [f"{kind} img/s {_label(s, sides)}" for s in sides]
        head += [f"{kind} ratio {_label(p, sides)}" for p in peers]
    head += [f"first step {_label(s, sides)} (s)" for s in sides]
    head += [f"peak RSS {_label(s, sides)} (MiB)" for s in sides]
    head += [f"train ratio {_label(p, sides)} per round" for p in peers]
    rule = ["---"] * len(head)
    lines = [_intro(meta, sides), "", "| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for r in rows:
        cells = [r["model"], str(r[a]["batch"]), f"{r[a]['params']:,}"]
        for kind in ("train", "eval"):
            cells += [f"{r[s][f'{kind}_images_per_s']:.1f}" for s in sides]
            cells += [f"{r['ratios'][p][kind]:.2f}" for p in peers]
        cells += [f"{r[s]['first_step_s']:.2f}" for s in sides]
        cells += [f"{r[s]['peak_rss_mib']:.0f}" for s in sides]
        cells += [", ".join(f"{v:.2f}" for v in r["ratios"][p]["train_rounds"]) for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for p in peers:
        ratios = {r["model"]: r["ratios"][p]["train"] for r in rows}
        worst = min(ratios, key=ratios.get)
        text = (f"Train-step ratio against {_label(p, sides)}: geometric mean "
                f"{_geomean(ratios.values()):.2f}, minimum {ratios[worst]:.2f} ({worst})")
        headline = [m for m in HEADLINE if m in ratios]
        if len(headline) == len(HEADLINE) and len(ratios) > len(headline):
            text += (f"; over {', '.join(HEADLINE)}: "
                     f"{_geomean(ratios[m] for m in headline):.2f}")
        lines.append(text + ".")
    return "\n".join(lines) + "\n"


USER_SUITE = ("cifar_resnet20", "resnet18", "alexnet_owt")


def _cpu() -> dict:
    """The CPU as lscpu names it: model name, family and model number (the first processor's
    block of /proc/cpuinfo)."""
    out = {"cpu": platform.processor() or platform.machine()}
    keys = {"model name": "cpu", "cpu family": "cpu_family", "model": "cpu_model"}
    try:
        block = open("/proc/cpuinfo").read().split("\n\n")[0]
    except OSError:
        return out
    for line in block.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            out[keys[key.strip()]] = value.strip()
    return out


def main(models=None, repeats=5, warmup=2, threads=None, rounds=3, out_dir=RESULTS,
         peer: str = "torch") -> int:
    """Run the suite against `peer` ("torch": PyTorch and Keras 3 side by side, or "user")
    and write its JSON and table."""
    import jax

    if peer not in ("torch", "user"):
        raise ValueError(f"peer={peer!r}; expected 'torch' or 'user'")
    threads = threads or os.cpu_count()
    names = models or list(HEADLINE if peer == "torch" else USER_SUITE)
    unknown = [m for m in names if m not in {n for n, _, _ in SUITE}]
    if unknown:
        raise ValueError(f"models {unknown} are not in the suite; expected some of "
                         f"{[n for n, _, _ in SUITE]}")
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: expected at least 1")
    sides = ("jax", "torch", "keras") if peer == "torch" else ("user", "jax")
    rows = run_suite(names, repeats, warmup, threads, rounds, sides)
    meta = {"date": time.strftime("%Y-%m-%d"), **_cpu(), "threads": threads,
            "jax": jax.__version__, "repeats": repeats, "rounds": rounds}
    if peer == "torch":
        from importlib.metadata import version

        meta.update(torch=version("torch"), keras=version("keras"),
                    keras_hub=version("keras-hub"))
    name = "cpu_vs_torch" if peer == "torch" else "user_vs_engine"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    table = markdown(rows, meta, sides)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    framework, model_name, repeats, warmup, threads = sys.argv[1:6]
    print("RESULT " + json.dumps(worker(framework, model_name, int(repeats), int(warmup),
                                        int(threads))))
