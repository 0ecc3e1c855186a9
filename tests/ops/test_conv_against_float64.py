"""The CPU convolutions (oneDNN's and XLA's paths of ops.cpu_conv) against float64: output and
both gradients within the worst-case rounding bound of a float32 sum, on any CPU.

For a sum of K products computed in float32 in any order (with or without FMA), the error is
at most gamma_K * sum |terms|, gamma_K = K u / (1 - K u), u = 2**-24 (Higham, "Accuracy and
Stability of Numerical Algorithms", section 3.1). For a convolution, sum |terms| is the same
convolution of |x| and |w|; for its gradients, the same products of |dy| with |w| or |x|. The
bound does not depend on the summation order a CPU's instruction set picks, so it holds on
every x86-64 CPU; a kernel that accumulated in bfloat16 (AMX) or used a transform-based
algorithm with larger error would break it. lax's own float32 convolution is checked the
same way, as a control.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

CASES = [  # kernel, stride, padding, groups, channels in/out
    (1, 1, "VALID", 1, 16, 16), (3, 1, "SAME", 1, 16, 32), (3, 2, "SAME", 1, 32, 32),
    (5, 1, "SAME", 2, 16, 16), (7, 2, "SAME", 1, 3, 16), (11, 4, "VALID", 1, 3, 16),
    (3, 1, "SAME", 1, 64, 64),
]

PROBE = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from resnet_jax.ops import cpu, cpu_conv, dnnl_conv
DN = ("NHWC", "HWIO", "NHWC")
u = 2.0 ** -24
hooks = {"lax": lax.conv_general_dilated, "xla": cpu_conv.xla_conv_general_dilated,
         "onednn": cpu_conv.conv_general_dilated}
out = {"onednn_available": dnnl_conv.available(), "cases": []}
for k, s, pad, g, cin, cout in json.loads(sys.argv[1]):
    rng = np.random.default_rng(k * 100 + s * 10 + g)
    x = rng.normal(size=(4, 20, 20, cin)).astype(np.float32)
    w = rng.normal(size=(k, k, cin // g, cout)).astype(np.float32)
    def conv(fn, x, w):
        return fn(x, w, (s, s), pad, dimension_numbers=DN, feature_group_count=g)
    y64, vjp64 = jax.vjp(lambda x, w: conv(lax.conv_general_dilated, x, w),
                         x.astype(np.float64), w.astype(np.float64))
    dy = rng.normal(size=y64.shape).astype(np.float32)
    dx64, dw64 = vjp64(dy.astype(np.float64))
    # sum |terms| of each output: the same products on absolute values
    ay, avjp = jax.vjp(lambda x, w: conv(lax.conv_general_dilated, x, w),
                       np.abs(x).astype(np.float64), np.abs(w).astype(np.float64))
    adx, adw = avjp(np.abs(dy).astype(np.float64))
    n, oh, ow, _ = y64.shape
    terms = {"y": k * k * cin // g, "dx": k * k * cout // g, "dw": n * oh * ow}
    gamma = {key: t * u / (1 - t * u) for key, t in terms.items()}
    row = {"case": [k, s, pad, g, cin, cout]}
    for name, fn in hooks.items():
        step = jax.jit(lambda x, w, dy: (lambda y, f: (y, *f(dy)))(*jax.vjp(
            lambda x, w: conv(fn, x, w), x, w)), compiler_options=cpu.jit_options("train"))
        y, dx, dw = (np.asarray(a, np.float64) for a in step(x, w, dy))
        ratios = {key: float(np.max(np.abs(got - ref) / (gamma[key] * bound + 1e-300)))
                  for key, got, ref, bound in (("y", y, y64, ay), ("dx", dx, dx64, adx),
                                               ("dw", dw, dw64, adw))}
        row[name] = ratios
    out["cases"].append(row)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def errors():
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(CASES)], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_onednn_library_took_part(errors):
    assert errors["onednn_available"], "oneDNN convolutions missing: run bash experiments/setup.sh"


@pytest.mark.parametrize("kernel", ["lax", "xla", "onednn"])
def test_outputs_and_gradients_are_within_the_float32_rounding_bound(errors, kernel):
    worst = {tuple(row["case"]): max(row[kernel].values()) for row in errors["cases"]}
    assert len(worst) == len(CASES)
    # <= 1: within the worst-case bound (errors in practice are far below it)
    assert all(ratio <= 1.0 for ratio in worst.values()), worst
