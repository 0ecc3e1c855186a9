"""The oneDNN convolutions (ops.dnnl_conv): built and registered on this machine, the same
numbers as lax.conv_general_dilated, and the ones the CPU path's models compile to."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_jax.ops import cpu_conv, dnnl_conv

DN = ("NHWC", "HWIO", "NHWC")


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12))


def test_the_library_is_available_on_this_machine():
    assert dnnl_conv.available(), "oneDNN convolutions missing: run bash experiments/setup.sh"


def test_build_writes_a_loadable_library(tmp_path):
    out = dnnl_conv.build(tmp_path / "lib.so")
    lib = ctypes.cdll.LoadLibrary(str(out))
    for symbol in ("DnnlConvForward", "DnnlConvBackwardData", "DnnlConvBackwardWeights"):
        assert getattr(lib, symbol)
    assert not list(tmp_path.glob("tmp*.so"))  # the temporary name was renamed


@pytest.mark.parametrize("shape,kernel,strides,pads,groups", [
    ((2, 9, 7, 6), (3, 1), (2, 1), ((1, 0), (0, 2)), 1),    # non-square, asymmetric
    ((1, 12, 12, 8), (3, 3), (1, 1), ((1, 1), (1, 1)), 8),  # one channel per group
    ((3, 11, 11, 4), (5, 5), (3, 2), ((0, 0), (2, 1)), 2),  # strides not dividing
    ((2, 6, 6, 3), (1, 1), (2, 2), ((0, 0), (0, 0)), 1),    # 1x1, strided
])
def test_forward_and_gradients_match_lax(shape, kernel, strides, pads, groups):
    kx, kw, kp = jax.random.split(jax.random.key(sum(shape)), 3)
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, (*kernel, shape[3] // groups, 2 * groups))

    def ref(x, w):
        return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=DN,
                                        feature_group_count=groups, precision="highest")

    y_ref, vjp_ref = jax.vjp(ref, x, w)
    y, vjp = jax.vjp(jax.jit(lambda x, w: dnnl_conv.conv(x, w, strides, pads, groups)), x, w)
    dy = jax.random.normal(kp, y_ref.shape)
    assert y.shape == y_ref.shape
    assert rel_err(y_ref, y) <= 1e-5
    for g_ref, g in zip(vjp_ref(dy), vjp(dy)):
        assert g.shape == g_ref.shape
        assert rel_err(g_ref, g) <= 1e-5


def test_vmap_over_a_batch_of_kernels():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    ws = jax.random.normal(jax.random.key(1), (3, 3, 3, 3, 4))
    pads = ((1, 1), (1, 1))
    got = jax.vmap(lambda w: dnnl_conv.conv(x, w, (1, 1), pads))(ws)
    want = jnp.stack([lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=DN,
                                               precision="highest") for w in ws])
    assert rel_err(want, got) <= 1e-5


def _targets(f, *args) -> str:
    return jax.jit(f).lower(*args).as_text()


def test_the_cpu_path_compiles_to_the_onednn_calls():
    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))

    def loss(x, w):
        return jnp.sum(cpu_conv.conv_general_dilated(x, w, (1, 1), "SAME",
                                                     dimension_numbers=DN) ** 2)

    hlo = _targets(jax.grad(loss, argnums=(0, 1)), x, w)
    for target in dnnl_conv.TARGETS.values():
        assert target in hlo
    assert "convolution" not in hlo
    xla = _targets(jax.grad(lambda x, w: jnp.sum(cpu_conv.xla_conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=DN) ** 2), argnums=(0, 1)), x, w)
    assert "convolution" in xla and "dnnl" not in xla


def test_what_onednn_does_not_take_goes_to_xla():
    w = jnp.ones((3, 3, 4, 4))
    assert dnnl_conv.supports(jnp.ones((2, 8, 8, 4)), w, ((1, 1), (1, 1)), 1)
    assert not dnnl_conv.supports(jnp.ones((2, 8, 8, 4), jnp.float16), w, ((1, 1), (1, 1)), 1)
    assert not dnnl_conv.supports(jnp.ones((2, 8, 8, 4)), w, ((-1, 1), (1, 1)), 1)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    pads = ((-1, 2), (1, 1))
    got = jax.jit(lambda x: cpu_conv.conv_general_dilated(x, w, (1, 1), pads,
                                                          dimension_numbers=DN))(x)
    want = lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=DN)
    assert rel_err(want, got) <= 1e-5


def test_resnet_jax_dnnl_0_keeps_xla_convolutions():
    code = ("import jax.numpy as jnp; from resnet_jax.ops import cpu_conv, dnnl_conv;"
            "import jax; print(dnnl_conv.available(), 'convolution' in jax.jit(lambda x, w: "
            "cpu_conv.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', "
            "'HWIO', 'NHWC'))).lower(jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2))).as_text())")
    env = {**os.environ, "RESNET_JAX_DNNL": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "True"]


def test_resnet_jax_dnnl_library_loads_another_build(tmp_path):
    """A build of the same source elsewhere (as benchmarks/probes/onednn_sid.py makes against
    another oneDNN; here a copy of this machine's, so that no compiler or oneDNN headers are
    needed) is what the process loads; a missing one falls back to XLA's."""
    built = tmp_path / "other.so"
    shutil.copyfile(dnnl_conv.LIBRARY, built)
    code = ("from resnet_jax.ops import dnnl_conv; print(dnnl_conv.available(), "
            "any(l.rstrip().endswith('other.so') for l in open('/proc/self/maps')))")
    for path, expected in ((built, ["True", "True"]), (tmp_path / "none.so", ["False", "False"])):
        env = {**os.environ, "RESNET_JAX_DNNL_LIBRARY": str(path)}
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env,
                             capture_output=True, text=True, check=True)
        assert out.stdout.split() == expected, out.stderr


def test_version_needs_are_marked_weak(tmp_path):
    from benchmarks.probes.onednn_sid import weaken_version_needs

    lib = tmp_path / "lib.so"
    lib.write_bytes(dnnl_conv.LIBRARY.read_bytes())
    versions = subprocess.run(["readelf", "-V", str(lib)], capture_output=True, text=True,
                              check=True).stdout
    assert "Name: GLIBC_2.2.5  Flags: none" in versions
    assert weaken_version_needs(lib, ("GLIBC_2.2.5", "GLIBC_9.99")) == ["GLIBC_2.2.5"]
    versions = subprocess.run(["readelf", "-V", str(lib)], capture_output=True, text=True,
                              check=True).stdout
    assert "Name: GLIBC_2.2.5  Flags: WEAK" in versions
    ctypes.cdll.LoadLibrary(str(lib))  # still loads


@pytest.mark.parametrize("x_shape,w_shape,strides,onednn", [
    ((2, 8, 8, 4), (3, 3, 4, 4), (1, 1), True),     # 8x8 output
    ((2, 16, 16, 4), (3, 3, 4, 4), (2, 2), True),   # 8x8 output, strided
    ((2, 7, 7, 4), (3, 3, 4, 4), (1, 1), False),    # 7x7 output: XLA's
    ((2, 16, 16, 4), (1, 1, 4, 8), (1, 1), True),   # 1x1
    ((2, 16, 16, 4), (1, 1, 4, 8), (2, 2), False),  # strided 1x1: XLA's
])
def test_the_cpu_path_takes_onednn_where_it_pays(x_shape, w_shape, strides, onednn):
    def f(x, w):
        return cpu_conv.conv_general_dilated(x, w, strides, "SAME", dimension_numbers=DN)

    hlo = _targets(f, jnp.ones(x_shape), jnp.ones(w_shape))
    assert (dnnl_conv.TARGETS["forward"] in hlo) == onednn
    assert ("convolution" in hlo) == (not onednn)


def _round_bf16(a):
    return a.astype(jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize("shape,kernel,strides,pads,groups", [
    ((4, 7, 7, 32), (3, 3), (1, 1), ((1, 1), (1, 1)), 1),
    ((2, 9, 9, 16), (3, 3), (2, 2), ((1, 1), (1, 1)), 2),
])
def test_bfloat16_operands_are_exact_products_accumulated_in_float32(
        shape, kernel, strides, pads, groups):
    # Products of two bfloat16 numbers are exact in float32, so the convolution of the
    # rounded operands in float32 is the reference up to the order of the sums.
    if not dnnl_conv.bf16_native():
        pytest.skip("no AVX512-BF16/AMX here: layers('bfloat16') falls back to float32 "
                    "(test_cpu_conv.py::test_bfloat16_convolutions_fall_back_...)")
    kx, kw, kp = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, (*kernel, shape[3] // groups, 8))
    dy = jax.random.normal(kp, dnnl_conv._out_shape(shape, w.shape, strides, pads))

    def ref(x, w):
        return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=DN,
                                        feature_group_count=groups, precision="highest")

    y_ref, vjp_ref = jax.vjp(ref, _round_bf16(x), _round_bf16(w))
    dx_ref, dw_ref = vjp_ref(_round_bf16(dy))
    f = jax.jit(lambda x, w: dnnl_conv.conv(x, w, strides, pads, groups, "bfloat16"))
    y, vjp = jax.vjp(f, x, w)
    dx, dw = vjp(dy)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    for want, got in ((y_ref, y), (dx_ref, dx), (dw_ref, dw)):
        assert rel_err(want, got) <= 1e-5
    # and they differ from the float32 convolution by bfloat16's rounding, not more
    assert 1e-4 < rel_err(ref(x, w), y) < 2e-2


def test_operands_of_two_types_are_refused():
    x, w = jnp.ones((1, 8, 8, 2)), jnp.ones((3, 3, 2, 2), jnp.bfloat16)
    with pytest.raises(Exception, match="both float32 or both bfloat16"):
        jax.block_until_ready(dnnl_conv._call("forward", (1, 8, 8, 2), x, w, (1, 1),
                                              ((1, 1), (1, 1)), 1))
    with pytest.raises(ValueError, match="operands='float16'; allowed"):
        dnnl_conv.conv(x, w.astype(jnp.float32), (1, 1), ((1, 1), (1, 1)), 1, "float16")


@pytest.mark.parametrize("x_shape,w_shape,strides,onednn", [
    ((2, 7, 7, 4), (3, 3, 4, 4), (1, 1), True),     # 7x7 output: oneDNN's at bfloat16
    ((2, 4, 4, 4), (3, 3, 4, 4), (1, 1), True),     # 4x4
    ((2, 16, 16, 4), (1, 1, 4, 8), (2, 2), False),  # strided 1x1: XLA's
])
def test_with_bfloat16_operands_onednn_takes_small_maps_too(x_shape, w_shape, strides, onednn):
    def f(x, w):
        return cpu_conv.conv_general_dilated(x, w, strides, "SAME", dimension_numbers=DN,
                                             operands="bfloat16")

    hlo = _targets(f, jnp.ones(x_shape), jnp.ones(w_shape))
    assert (dnnl_conv.TARGETS["forward"] in hlo) == onednn
    assert ("bf16" in hlo) == onednn


def test_the_in_step_probe_sums_onednn_calls_per_primitive_and_shape():
    from benchmarks.probes.in_step_calls import parse, table

    shape = "mb8_ic16oc16_ih8oh8kh3sh1dh0ph1_iw8ow8kw3sw1dw0pw1"
    line = ("onednn_verbose,exec,cpu,convolution,brgconv:avx512_core,forward_training,"
            "src_f32::blocked:acdb::f0 dst_f32::blocked:acdb::f0,attr-scratchpad:user ,"
            "alg:convolution_direct,{},{}")
    lines = [line.format(shape, ms) for ms in (1.0, 3.0, 2.0)] + [
        "onednn_verbose,info,prim_template:operation,engine,primitive,implementation",
        "onednn_verbose,exec,cpu,reorder,jit:uni,undef,src_f32 dst_f32,,,16x16x3x3,0.5"]
    calls = parse(lines)
    assert calls[("convolution", "brgconv:avx512_core", "forward_training", shape)] == [
        1.0, 3.0, 2.0]
    conv, reorder = table(calls, steps=2)  # the larger share first
    assert conv["calls_per_step"] == 1.5 and conv["ms_per_step"] == 3.0
    assert conv["fastest_ms"] == 1.0 and conv["median_ms"] == 2.0
    assert conv["excess_ms_per_step"] == 1.5  # (6 - 3 x 1.0) / 2
    assert reorder["shape"] == "16x16x3x3" and reorder["ms_per_step"] == 0.25
