"""Export for serving: every model family's ONNX graph, run by onnxruntime, and its
StableHLO artefact, run in a process that never imports resnet_jax, give `Run.logits`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from benchmarks.probes.export_agreement import randomized
from resnet_jax import Run, load_config
from resnet_jax.training import experiment
from conftest import cheap_variables

# Relative to the largest logit: a logit near zero has no meaningful relative error of its
# own, and onnxruntime's and XLA's convolutions sum in different orders (measured: at most
# 3e-6 of the largest logit over every registered model at batch 1 and 7).
TOL = 1e-4

# One model per family, shrunk where a family's blocks repeat (stage_sizes), at small inputs.
FAMILIES = {
    "resnet18": ("imagenette", 64, {"stage_sizes": (1, 1, 1, 1)}),        # v1.5 = -B, basic
    "keras_resnet50": ("imagenette", 64, {"stage_sizes": (1, 1, 1, 1)}),  # v1, stride on 1x1
    "resnet50c": ("imagenette", 64, {"stage_sizes": (1, 1, 1, 1)}),       # -C: -B's bottleneck, deep stem
    "resnet26d": ("imagenette", 64, {"stage_sizes": (1, 1, 1, 1)}),       # -D, avg-pool shortcut
    "wide_resnet50_2": ("imagenette", 64, {"stage_sizes": (1, 1, 1, 1)}),
    "resnext50_32x4d": ("imagenette", 64, {"stage_sizes": (1, 1, 1, 1)}),
    "preact_resnet18": ("imagenette", 64, {"stage_sizes": (1, 1, 1, 1)}),  # pre-activation v2
    "cifar_resnet20": ("cifar10", 0, {}),                                # 6n+2, option A
    "preact_resnet164": ("cifar10", 0, {"stage_sizes": (2, 2, 2)}),      # CIFAR v2, bottleneck
    "fashion_mnist_resnet8": ("fashion_mnist", 0, {}),                   # the main job's seed net
    "mnist_preact_resnet": ("fashion_mnist", 0, {}),                     # the MNIST seed net
    "alexnet": ("imagenette", 67, {"hidden": 256}),                      # LRN, two towers
    "alexnet_owt": ("imagenette", 67, {"hidden": 256}),
}

FRESH_PROCESS = """
import json, sys
import numpy as np
import jax
batches = []
for model_file, images_file, out_file in json.loads(sys.argv[1]):
    exported = jax.export.deserialize(bytearray(open(model_file, "rb").read()))
    images = np.load(images_file)
    np.savez(out_file, **{k: np.asarray(exported.call(images[k])) for k in images.files})
    batches.append(str(exported.in_avals[0].shape[0]))
print(json.dumps({"resnet_jax": any(m.split(".")[0] == "resnet_jax" for m in sys.modules),
                  "batch": batches}))
"""


def family_run(name: str, workdir: str, eval_flip: bool = False, eval_shift: int = 0) -> Run:
    """A run of `name` as `Run.load` would give it, with random weights (nothing trained),
    evaluating with the project's CPU kernels in float32 (the export is float32 on XLA's
    own operations; a run with bfloat16 convolutions differs from it by their rounding),
    with the test-time views `eval_flip` and `eval_shift`."""
    dataset, size, overrides = FAMILIES[name]
    config = load_config("fashion_mnist", model=name, dataset=dataset, image_size=size,
                         eval_image_size=size, model_overrides=overrides, num_classes=10,
                         eval_flip=eval_flip, eval_shift=eval_shift, eval_batch_size=8,
                         cpu_kernels=True, cpu_conv_dtype="float32")
    model = experiment.build_model(config, 10)
    shape = experiment.image_shape(config)
    variables = randomized(cheap_variables(model, shape), seed=0)
    return Run(workdir, config, model, variables, [], 0, "latest")


def images_for(run: Run, n: int = 7) -> np.ndarray:
    shape = run.info.image_shape or (80, 96, 3)  # photographs larger than the crop
    return np.random.default_rng(1).integers(0, 256, (n, *shape), dtype=np.uint8)


def assert_logits_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL * np.abs(want).max(), np.abs(got - want).max()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_exports_to_onnx_with_the_runs_logits(name, tmp_path):
    import onnxruntime

    main_job = name == "fashion_mnist_resnet8"  # its test-time views: mirrors and shifts
    run = family_run(name, str(tmp_path / "run"), eval_flip=main_job, eval_shift=int(main_job))
    raw = images_for(run)
    x, want = run.preprocess(raw), run.logits(raw)
    onnx_file = run.export(str(tmp_path / "onnx"), format="onnx")
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch"
    for b in (1, 7):
        assert_logits_close(session.run(["logits"], {"images": x[:b]})[0], want[:b])


@pytest.mark.parametrize("half", [0, 1])
def test_every_familys_stablehlo_runs_in_a_process_without_resnet_jax(half, tmp_path):
    """Each family's artefact deserialized and called in a fresh process that never imports
    resnet_jax (one process for half the families: a Python with jax starts in seconds)."""
    expected = {}
    names = list(FAMILIES)[half::2]
    for name in names:
        run = family_run(name, str(tmp_path / name), eval_flip=name == "fashion_mnist_resnet8")
        raw = images_for(run)
        hlo_file = run.export(str(tmp_path / name / "hlo"), format="stablehlo")
        x = run.preprocess(raw)
        np.savez(tmp_path / f"{name}_x.npz", b1=x[:1], b7=x)
        expected[name] = (hlo_file, run.logits(raw))
    jobs = [[hlo, str(tmp_path / f"{n}_x.npz"), str(tmp_path / f"{n}_y.npz")]
            for n, (hlo, _) in expected.items()]
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(jobs)],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": ""}, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"resnet_jax": False, "batch": ["batch"] * len(names)}
    for name, (_, want) in expected.items():
        got = np.load(tmp_path / f"{name}_y.npz")
        assert_logits_close(got["b1"], want[:1])
        assert_logits_close(got["b7"], want)
