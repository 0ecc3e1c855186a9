"""2-D convolutions through oneDNN on XLA:CPU (forward, input and weight gradients).

XLA:CPU runs convolutions with Eigen; at the 16-64 channels of the CIFAR ResNets its forward
and input gradient take about twice as long as oneDNN's and its weight gradient three times
(docs/cpu_speed_log.md, section 14). `native/dnnl_conv.cc` wraps oneDNN's
convolution primitives as XLA FFI handlers; `conv` calls them from a jitted function, with
a custom VJP whose two gradients are oneDNN's too.

The library is built on this machine against the `onednn-cpu-gomp` wheel (x86-64 Linux) by
one explicit command, `python -m resnet_jax.ops.dnnl_conv` (experiments/setup.sh runs it);
nothing compiles it while a step is traced. Where it is missing, older than its source or
cannot be loaded (another platform), `available()` warns once and is False, and
`ops.cpu_conv` keeps XLA's convolutions.
Float32 in and out, optionally with bfloat16 operands (`conv(..., operands="bfloat16")`);
NHWC activations and HWIO kernels, as `nn.Conv`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("native") / "dnnl_conv.cc"
# RESNET_JAX_DNNL_LIBRARY=path loads another build of the same source instead (e.g. against
# another oneDNN: benchmarks/probes/onednn_sid.py)
LIBRARY = Path(os.environ.get("RESNET_JAX_DNNL_LIBRARY")
               or SOURCE.with_name("libresnet_jax_dnnl_conv.so"))
TARGETS = {"forward": "resnet_jax_dnnl_conv_forward",
           "backward_data": "resnet_jax_dnnl_conv_backward_data",
           "backward_weights": "resnet_jax_dnnl_conv_backward_weights"}
_SYMBOLS = {"forward": "DnnlConvForward", "backward_data": "DnnlConvBackwardData",
            "backward_weights": "DnnlConvBackwardWeights"}


def _onednn_prefix() -> Path | None:
    """The installation prefix holding oneDNN's header and library (the wheels put them
    under the environment's include/ and lib/)."""
    for prefix in (sys.prefix, sys.base_prefix, "/usr/local", "/usr"):
        p = Path(prefix)
        if (p / "include/oneapi/dnnl/dnnl.hpp").exists() and any(p.glob("lib*/libdnnl.so*")):
            return p
    return None


def build(output: Path = LIBRARY, verbose: bool = False, prefix: Path | None = None,
          extra_sources: Sequence[Path] = ()) -> Path:
    """Compiles the FFI library into `output` (written to a temporary name and renamed, so
    that concurrent builds never load a half-written file) against the oneDNN under `prefix`
    (include/, lib/; default: the installed wheel's), with `extra_sources` compiled in.
    Raises RuntimeError with the compiler's message when it fails."""
    prefix = prefix or _onednn_prefix()
    if prefix is None:
        raise RuntimeError("oneDNN not found: pip install onednn-cpu-gomp==2023.2.0 "
                           "onednn-devel-cpu-gomp==2023.2.0")
    libdir = next(d for d in (prefix / "lib", prefix / "lib64") if any(d.glob("libdnnl.so*")))
    cxx = os.environ.get("CXX", "g++")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=output.parent)
    os.close(fd)
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
           str(SOURCE), *map(str, extra_sources), "-o", tmp, f"-I{jax.ffi.include_dir()}",
           f"-I{prefix / 'include'}", f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-ldnnl"]
    if verbose:
        print(" ".join(cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"building {output.name} failed:\n{result.stderr[-4000:]}")
    os.replace(tmp, output)
    return output


def _stale() -> bool:
    return not LIBRARY.exists() or LIBRARY.stat().st_mtime < SOURCE.stat().st_mtime


@functools.cache
def available() -> bool:
    """Whether the oneDNN convolutions are registered with XLA:CPU (loading the built library
    the first time). Set RESNET_JAX_DNNL=0 to keep XLA's convolutions."""
    if os.environ.get("RESNET_JAX_DNNL", "1") == "0":
        return False
    if sys.platform != "linux" or sysconfig.get_platform().split("-")[-1] != "x86_64":
        return False
    if _stale():
        state = "missing" if not LIBRARY.exists() else "older than its source"
        warnings.warn(f"oneDNN convolutions not built ({LIBRARY.name} is {state}); using XLA's. "
                      "Build them with `python -m resnet_jax.ops.dnnl_conv`.", stacklevel=2)
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(LIBRARY))
        for kind, target in TARGETS.items():
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(lib, _SYMBOLS[kind])), platform="cpu")
    except (OSError, AttributeError) as err:
        warnings.warn(f"oneDNN convolutions unavailable, using XLA's: {err}", stacklevel=2)
        return False
    return True


@functools.cache
def bf16_native() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX-BF16), where
    oneDNN's bfloat16 convolutions run about twice as fast as its float32 ones."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def supports(x: jax.Array, w: jax.Array, pads: Sequence[tuple[int, int]], groups: int) -> bool:
    """Whether `conv` takes these operands: float32, rank 4, non-negative padding, and the
    library available."""
    return (x.ndim == 4 and w.ndim == 4 and x.dtype == jnp.float32 and w.dtype == jnp.float32
            and all(lo >= 0 and hi >= 0 for lo, hi in pads) and x.shape[3] == w.shape[2] * groups
            and w.shape[3] % groups == 0 and available())


def _out_shape(x_shape, w_shape, strides, pads) -> tuple[int, int, int, int]:
    oh = (x_shape[1] + sum(pads[0]) - w_shape[0]) // strides[0] + 1
    ow = (x_shape[2] + sum(pads[1]) - w_shape[1]) // strides[1] + 1
    return x_shape[0], oh, ow, w_shape[3]


OPERAND_DTYPES = ("float32", "bfloat16")


def _call(kind: str, shape, a, b, strides, pads, groups):
    if not available():  # registers the library with XLA the first time, in this process
        raise RuntimeError("oneDNN convolutions are not available here (see the warning "
                           "above); build them with `python -m resnet_jax.ops.dnnl_conv`, or "
                           "use ops.cpu_conv, which falls back to XLA's")
    attrs = dict(strides=np.asarray(strides, np.int64),
                 padding=np.asarray([p for pair in pads for p in pair], np.int64),
                 groups=np.int64(groups))
    out = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    return jax.ffi.ffi_call(TARGETS[kind], out, vmap_method="sequential")(a, b, **attrs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
         pads: tuple[tuple[int, int], tuple[int, int]], groups: int = 1,
         operands: str = "float32") -> jax.Array:
    """NHWC x HWIO -> NHWC float32 convolution with `feature_group_count=groups`; the same
    as `lax.conv_general_dilated(x, w, strides, pads, feature_group_count=groups,
    dimension_numbers=("NHWC", "HWIO", "NHWC"))` up to rounding.

    `operands="bfloat16"` rounds x, w and (in the backward pass) dy to bfloat16 before
    oneDNN multiplies them; products are accumulated and returned in float32, as the
    bfloat16 matmul units of recent x86 CPUs (AVX512-BF16, AMX) do. Where the CPU has none,
    `ops.cpu.layers` keeps float32 (oneDNN's bfloat16 path there was not measured)."""
    return _conv_fwd(x, w, strides, pads, groups, operands)[0]


def _operand_dtype(operands: str):
    if operands not in OPERAND_DTYPES:
        raise ValueError(f"dnnl_conv: operands={operands!r}; allowed: {OPERAND_DTYPES}")
    return jnp.dtype(operands)


def _conv_fwd(x, w, strides, pads, groups, operands):
    dtype = _operand_dtype(operands)
    xc, wc = x.astype(dtype), w.astype(dtype)
    y = _call("forward", _out_shape(x.shape, w.shape, strides, pads), xc, wc, strides, pads,
              groups)
    return y, (xc, wc)


def _conv_bwd(strides, pads, groups, operands, residuals, dy):
    xc, wc = residuals
    dyc = dy.astype(_operand_dtype(operands))
    dx = _call("backward_data", xc.shape, dyc, wc, strides, pads, groups)
    dw = _call("backward_weights", wc.shape, xc, dyc, strides, pads, groups)
    return dx, dw


conv.defvjp(_conv_fwd, _conv_bwd)


if __name__ == "__main__":
    print(f"built {build(verbose=True)}")
