"""The CPU backend's kernels behind one seam: a drop-in set of layer constructors for the
zoo's models and the XLA options for the steps that run them.

    from resnet_jax.ops import cpu
    model = get_model("cifar_resnet20", **cpu.layers())
    train_step = jax.jit(train_step, compiler_options=cpu.jit_options("train"))

Off the CPU backend `layers()` is empty and `jit_options()` is None, so the same code runs
unchanged on GPUs and TPUs. What each piece buys is in docs/cpu_speed_log.md:

- conv: `nn.Conv` on `cpu_conv.conv_general_dilated` (oneDNN's convolutions where its library
  is built, `python -m resnet_jax.ops.dnnl_conv`; XLA's otherwise, with materialized inputs
  for the weight gradient).
- norm: `batch_norm.BatchNorm`, `nn.BatchNorm` with a closed-form backward pass.
- pool: `max_pool.max_pool`, `nn.max_pool` with a hand-written backward pass.
- jit_options: YNNPACK for dots (and, in train steps, reductions), not for convolutions.

`retain_freed_memory()` is a process-wide malloc setting that helps the same steps; it is
for entry points to call first thing (before JAX starts), never done at import.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
from flax import linen as nn

from resnet_jax.ops import dnnl_conv
from resnet_jax.ops.batch_norm import BatchNorm
from resnet_jax.ops.cpu_conv import conv_general_dilated
from resnet_jax.ops.heap import retain_freed_memory
from resnet_jax.ops.max_pool import max_pool

STEPS = ("train", "eval")

# YNNPACK for dots and reductions, not for convolutions: its convolution gradients are slower
# than Eigen's here (and without it, the BatchNorm reductions of a train step become slower
# reduce-windows). The eval step keeps YNNPACK for dots only: there its reduction fusions
# swallow the convolutions feeding the final pooling and run them slower.
_YNN_FUSIONS = {"train": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
                "eval": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def on_cpu() -> bool:
    """Whether JAX computes on the CPU backend."""
    return jax.default_backend() == "cpu"


def layers(conv_dtype: str = "float32") -> dict[str, Any]:
    """`{"conv", "norm", "pool"}` constructors for `get_model(name, **layers())` on the CPU
    backend; {} elsewhere. Loads the oneDNN library here, not while a step is traced.

    `conv_dtype="bfloat16"`: oneDNN's convolutions multiply bfloat16 operands (rounded from
    the float32 activations, kernels and gradients) and accumulate in float32; everything
    else stays float32. Convolutions 1.7-2.2x faster where the CPU has AVX512-BF16 (a
    Zen 4 EPYC, docs/cpu_speed_log.md section 16); without it or AMX (or without the oneDNN
    library) it warns and keeps float32."""
    if conv_dtype not in dnnl_conv.OPERAND_DTYPES:
        raise ValueError(f"conv_dtype={conv_dtype!r}; allowed: {dnnl_conv.OPERAND_DTYPES}")
    if not on_cpu():
        return {}
    library = dnnl_conv.available()
    if conv_dtype == "bfloat16" and not (library and dnnl_conv.bf16_native()):
        warnings.warn("conv_dtype='bfloat16' needs oneDNN's library and a CPU with "
                      "AVX512-BF16 or AMX; keeping float32 convolutions", stacklevel=2)
        conv_dtype = "float32"
    conv = functools.partial(conv_general_dilated, operands=conv_dtype)
    return {"conv": functools.partial(nn.Conv, conv_general_dilated=conv),
            "norm": BatchNorm, "pool": max_pool}


def jit_options(step: str = "train") -> dict[str, str] | None:
    """`jax.jit(..., compiler_options=...)` for a "train" or "eval" step of a model built with
    `layers()`; None off the CPU backend."""
    if step not in STEPS:
        raise ValueError(f"step={step!r}; expected one of {STEPS}")
    if not on_cpu():
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": _YNN_FUSIONS[step]}


__all__ = ["STEPS", "jit_options", "layers", "on_cpu", "retain_freed_memory"]
