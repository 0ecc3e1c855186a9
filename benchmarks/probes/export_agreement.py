"""Every registered model, at its registry size, exported to ONNX and StableHLO: how far
onnxruntime's logits and the deserialized StableHLO's are from the model's own.

    python -m benchmarks.probes.export_agreement [--models NAME ...] [--out FILE.json]
    python -m benchmarks.probes.export_agreement --run RUN_DIR [--out FILE.json]

With --run, a trained run instead: its selected model exported both ways, on its whole test
split against `Run.logits` (accuracy of each, largest difference, agreement of the classes).

Random weights with BatchNorm statistics and scales drawn away from (0, 1) (as
tests/test_export.py draws them), 7 random images; ImageNet-layout models at 128x128 (64x64
for the 101- and 152-layer ones, to keep the run short), AlexNet at 67x67. The error is
max |exported - model| / max |model| at batch sizes 1 and 7; the test asserts 1e-4 on one
model per family, this runs them all.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.accelerator import _cpu_name
from resnet_jax.export.to_onnx import to_onnx
from resnet_jax.export.to_stablehlo import to_stablehlo
from resnet_jax.models import get_model, get_spec, list_models
from resnet_jax.training.steps import eval_logits


def input_shape(name: str) -> tuple[int, int, int]:
    shape = get_spec(name).input_shape
    if name.startswith("alexnet"):
        return (67, 67, 3)
    if shape == (224, 224, 3):
        return (64, 64, 3) if any(d in name for d in ("101", "152")) else (128, 128, 3)
    return shape


def randomized(variables, seed: int = 1):
    """BatchNorm statistics and affine parameters drawn away from (0, 1), so that a folding
    that swaps mean and variance or scale and bias shows in the logits (the tests' too)."""
    rng = np.random.default_rng(seed)
    draws = {"mean": lambda s: rng.normal(0, 0.2, s), "var": lambda s: rng.uniform(0.5, 2, s),
             "scale": lambda s: rng.uniform(0.5, 1.5, s)}

    def draw(path, a):
        key = getattr(path[-1], "key", None)
        return (draws[key](a.shape) if key in draws else np.asarray(a)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, variables)


def measure(name: str) -> dict:
    import onnxruntime

    shape = input_shape(name)
    model = get_model(name, num_classes=10)
    x = np.random.default_rng(0).normal(size=(7, *shape)).astype(np.float32)
    variables = randomized(jax.jit(model.init)(jax.random.key(0), jnp.asarray(x[:1])))
    fn = lambda v, images: eval_logits(model, v, images)  # noqa: E731
    want = np.asarray(jax.jit(fn)(variables, x))
    started = time.perf_counter()
    onnx_model = to_onnx(fn, variables, shape)
    onnx_s = time.perf_counter() - started
    session = onnxruntime.InferenceSession(onnx_model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    exported = jax.export.deserialize(to_stablehlo(lambda im: fn(variables, im), shape))
    scale = float(np.abs(want).max())
    row = {"model": name, "input": list(shape), "onnx_nodes": len(onnx_model.graph.node),
           "onnx_seconds": round(onnx_s, 2)}
    for b in (1, 7):
        onnx_out = session.run(["logits"], {"images": x[:b]})[0]
        hlo_out = np.asarray(exported.call(x[:b]))
        row[f"onnx_error_b{b}"] = float(np.abs(onnx_out - want[:b]).max() / scale)
        row[f"stablehlo_error_b{b}"] = float(np.abs(hlo_out - want[:b]).max() / scale)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list_models())
    parser.add_argument("--run", default="", help="a trained run's directory")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.run:
        result = {"machine": _cpu_name(), "jax": jax.__version__, **measure_run(args.run)}
        print(json.dumps(result, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        return
    rows = []
    for name in args.models:
        rows.append(measure(name))
        print(json.dumps(rows[-1]), flush=True)
    worst = max(max(r[k] for k in r if "_error_" in k) for r in rows)
    result = {"machine": _cpu_name(), "jax": jax.__version__,
              "worst_error": worst, "rows": rows}
    print(f"worst error over {len(rows)} models: {worst:.2e}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
