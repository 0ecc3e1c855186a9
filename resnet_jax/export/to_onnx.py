"""A JAX function of (variables, images) as an ONNX graph with a dynamic batch dimension.

The function is traced to a jaxpr with a symbolic batch size `batch`; every equation becomes
ONNX operators (opset `OPSET`) built with the `onnx` package. What depends only on the
variables (BatchNorm's scale and shift, kernel layouts) is evaluated here, by JAX itself,
and stored as initializers, so the graph holds the folded constants and no parameter
arithmetic. Activations stay in the function's layout (NHWC for the project's models):
convolutions and pooling are wrapped in transposes to ONNX's NCHW, which onnxruntime's
optimizer cancels between neighbouring layers.

The primitives handled are those of the project's evaluation graphs (convolutions, dense
layers, pooling, local response normalisation, elementwise arithmetic, reductions, shape
changes); any other is a `NotImplementedError` naming it, never a silently wrong graph.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

OPSET = 18
BATCH = "batch"
_INT64_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass
class _Graph:
    """The ONNX graph under construction: nodes, initializers and what each jaxpr variable
    became (a constant NumPy array or the name of a tensor)."""

    batch_source: str  # the graph input whose first dimension is the symbolic batch
    nodes: list = dataclasses.field(default_factory=list)
    constants: dict = dataclasses.field(default_factory=dict)  # name -> np.ndarray
    used: dict = dataclasses.field(default_factory=dict)  # the constants nodes read
    count: int = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        from onnx import helper

        out = self.fresh(op.lower())
        for name in inputs:
            if name in self.constants:
                self.used[name] = self.constants[name]
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        """A constant; it becomes an initializer of the graph if a node reads it."""
        name = self.fresh(hint)
        self.constants[name] = np.asarray(value)
        return name

    def initializers(self) -> list:
        from onnx import numpy_helper

        return [numpy_helper.from_array(value, name) for name, value in self.used.items()]

    def ints(self, values) -> str:
        return self.const(np.asarray(values, np.int64), "ints")

    def shape(self, dims) -> str:
        """An int64 shape tensor for `dims`, where a symbolic dimension is the batch size,
        read from the batch source at run time."""
        if all(_is_int(d) for d in dims):
            return self.ints([int(d) for d in dims])
        parts = []
        for d in dims:
            if _is_int(d):
                parts.append(self.ints([int(d)]))
            elif str(d) == BATCH:
                shape = self.node("Shape", [self.batch_source], start=0, end=1)
                parts.append(shape)
            else:
                raise NotImplementedError(f"dimension {d} (only the batch size may be symbolic)")
        return self.node("Concat", parts, axis=0)


def _is_int(d) -> bool:
    return isinstance(d, (int, np.integer))


def _perm_inverse(perm) -> list[int]:
    return [int(i) for i in np.argsort(perm)]


def to_onnx(fn: Callable, variables: Any, image_shape: tuple[int, ...],
            dtype=jnp.float32, input_name: str = "images", output_name: str = "logits",
            metadata: dict[str, str] | None = None):
    """The ONNX ModelProto of `fn(variables, images)`, images of shape (batch, *image_shape)
    and any batch size; `variables` are stored in the graph. `metadata`: the model's
    metadata_props (strings)."""
    import onnx
    from onnx import TensorProto, helper

    batch, = jax.export.symbolic_shape(BATCH)
    images = jax.ShapeDtypeStruct((batch, *image_shape), dtype)
    closed = jax.make_jaxpr(fn)(variables, images)
    leaves = jax.tree.leaves(variables)
    graph = _Graph(batch_source=input_name)
    env: dict[Any, str] = {}
    for var, value in zip(closed.jaxpr.constvars, closed.consts):
        env[var] = graph.const(np.asarray(value), "c")
    invars = closed.jaxpr.invars
    for var, value in zip(invars[:len(leaves)], leaves):
        env[var] = graph.const(np.asarray(value), "w")
    env[invars[-1]] = input_name
    _convert(graph, closed.jaxpr, env)
    out_var = closed.jaxpr.outvars[0]
    result = _read(graph, env, out_var)
    graph.nodes.append(helper.make_node("Identity", [result], [output_name], name=output_name))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    out_dims = [BATCH if not _is_int(d) else int(d) for d in out_var.aval.shape]
    onnx_graph = helper.make_graph(
        graph.nodes, "resnet_jax",
        [helper.make_tensor_value_info(input_name, elem, [BATCH, *image_shape])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, out_dims)],
        initializer=graph.initializers())
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="resnet_jax")
    model.ir_version = 9  # readable by onnxruntime 1.16 and newer
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model


def _read(graph: _Graph, env: dict, var) -> str:
    """The tensor name of a jaxpr variable or literal."""
    if isinstance(var, jax.extend.core.Literal):
        return graph.const(np.asarray(var.val, var.aval.dtype), "lit")
    return env[var]


def _convert(graph: _Graph, jaxpr, env: dict) -> None:
    for eqn in jaxpr.eqns:
        inputs = [_read(graph, env, v) for v in eqn.invars]
        name = eqn.primitive.name
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        if inner is not None:  # jit, custom_jvp_call: convert the body in place
            inner_jaxpr = getattr(inner, "jaxpr", inner)
            inner_env = dict(zip(inner_jaxpr.invars, inputs))
            for var, value in zip(inner_jaxpr.constvars, getattr(inner, "consts", ())):
                inner_env[var] = graph.const(np.asarray(value), "c")
            _convert(graph, inner_jaxpr, inner_env)
            outs = [_read(graph, inner_env, v) for v in inner_jaxpr.outvars]
        elif all(i in graph.constants for i in inputs):  # fold: evaluate with JAX
            values = eqn.primitive.bind(*[graph.constants[i] for i in inputs], **eqn.params)
            values = values if eqn.primitive.multiple_results else [values]
            outs = [graph.const(np.asarray(v), name) for v in values]
        else:
            if name not in _RULES:
                raise NotImplementedError(
                    f"no ONNX conversion for the JAX primitive {name!r} (in {eqn})")
            outs = [_RULES[name](graph, inputs, eqn)]
        for var, out in zip(eqn.outvars, outs):
            env[var] = out


def _elementwise(op: str):
    return lambda g, ins, eqn: g.node(op, ins)


def _rsqrt(g, ins, eqn):
    return g.node("Reciprocal", [g.node("Sqrt", ins)])


def _square(g, ins, eqn):
    return g.node("Mul", [ins[0], ins[0]])


def _integer_pow(g, ins, eqn):
    exponent = g.const(np.asarray(eqn.params["y"], eqn.outvars[0].aval.dtype))
    return g.node("Pow", [ins[0], exponent])


def _convert_element_type(g, ins, eqn):
    from onnx import helper

    return g.node("Cast", ins, to=helper.np_dtype_to_tensor_dtype(eqn.params["new_dtype"]))


def _reshape(g, ins, eqn):
    if eqn.params.get("dimensions") is not None:
        raise NotImplementedError("reshape with dimensions")
    return g.node("Reshape", [ins[0], g.shape(eqn.params["new_sizes"])])


def _broadcast_in_dim(g, ins, eqn):
    shape, kept = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    x = ins[0]
    new_axes = [d for d in range(len(shape)) if d not in kept]
    if new_axes:
        x = g.node("Unsqueeze", [x, g.ints(new_axes)])
    return g.node("Expand", [x, g.shape(shape)])


def _transpose(g, ins, eqn):
    return g.node("Transpose", ins, perm=[int(p) for p in eqn.params["permutation"]])


def _reduce(op: str):
    def rule(g, ins, eqn):
        return g.node(op, [ins[0], g.ints(eqn.params["axes"])], keepdims=0)
    return rule


def _concatenate(g, ins, eqn):
    return g.node("Concat", ins, axis=int(eqn.params["dimension"]))


def _squeeze(g, ins, eqn):
    return g.node("Squeeze", [ins[0], g.ints(eqn.params["dimensions"])])


def _slice(g, ins, eqn):
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    steps = eqn.params["strides"] or (1,) * len(starts)
    limits = [int(d) if _is_int(d) else _INT64_MAX for d in limits]
    return g.node("Slice", [ins[0], g.ints(starts), g.ints(limits),
                            g.ints(range(len(starts))), g.ints(steps)])


def _rev(g, ins, eqn):
    axes = list(eqn.params["dimensions"])
    return g.node("Slice", [ins[0], g.ints([-1] * len(axes)), g.ints([-_INT64_MAX] * len(axes)),
                            g.ints(axes), g.ints([-1] * len(axes))])


def _pad(g, ins, eqn):
    config = eqn.params["padding_config"]
    if any(int(interior) for _, _, interior in config):
        raise NotImplementedError("pad with interior padding")
    low, high = [int(lo) for lo, _, _ in config], [int(hi) for _, hi, _ in config]
    if min(low + high) < 0:
        x = g.node("Slice", [ins[0], g.ints([max(-lo, 0) for lo in low]),
                             g.ints([hi if hi < 0 else _INT64_MAX for hi in high]),
                             g.ints(range(len(low)))])
        low, high = [max(lo, 0) for lo in low], [max(hi, 0) for hi in high]
    else:
        x = ins[0]
    return g.node("Pad", [x, g.ints(low + high), ins[1]], mode="constant")


def _dot_general(g, ins, eqn):
    """A contraction without batch dimensions as one MatMul: each side's free and contracted
    dimensions gathered and flattened, the product reshaped to the output."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    if lhs_batch or rhs_batch:
        raise NotImplementedError(f"dot_general with batch dimensions "
                                  f"{eqn.params['dimension_numbers']}")
    lhs_shape, rhs_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    size = int(np.prod([lhs_shape[d] for d in lhs_contract]))
    lhs_free = [d for d in range(len(lhs_shape)) if d not in lhs_contract]
    rhs_free = [d for d in range(len(rhs_shape)) if d not in rhs_contract]
    lhs, rhs = ins
    if lhs_free + list(lhs_contract) != list(range(len(lhs_shape))):
        lhs = g.node("Transpose", [lhs], perm=lhs_free + list(lhs_contract))
    if list(rhs_contract) + rhs_free != list(range(len(rhs_shape))):
        rhs = g.node("Transpose", [rhs], perm=list(rhs_contract) + rhs_free)
    plain = len(lhs_shape) == 2 and len(rhs_shape) == 2 and len(lhs_contract) == 1
    if plain:
        return g.node("MatMul", [lhs, rhs])
    lhs = g.node("Reshape", [lhs, g.ints([-1, size])])
    rhs = g.node("Reshape", [rhs, g.ints([size, -1])])
    return g.node("Reshape", [g.node("MatMul", [lhs, rhs]),
                              g.shape(eqn.outvars[0].aval.shape)])


def _conv(g, ins, eqn):
    p = eqn.params
    if any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
        raise NotImplementedError("transposed or batch-grouped convolution")
    dn = p["dimension_numbers"]
    x = g.node("Transpose", [ins[0]], perm=list(dn.lhs_spec))
    kernel = g.node("Transpose", [ins[1]], perm=list(dn.rhs_spec))
    pads = [int(lo) for lo, _ in p["padding"]] + [int(hi) for _, hi in p["padding"]]
    y = g.node("Conv", [x, kernel], strides=list(p["window_strides"]),
               dilations=list(p["rhs_dilation"]), pads=pads, group=int(p["feature_group_count"]))
    return g.node("Transpose", [y], perm=_perm_inverse(dn.out_spec))


def _reduce_window(op: str):
    """reduce_window_max/sum as MaxPool/AveragePool: the windowed dimensions moved last, the
    others flattened into the batch of a one-channel pooling, then put back."""

    def rule(g, ins, eqn):
        p = eqn.params
        if any(d != 1 for d in p["base_dilation"]):
            raise NotImplementedError(f"{eqn.primitive.name} with base dilation")
        shape = eqn.invars[0].aval.shape
        window = [d for d in range(len(shape))
                  if p["window_dimensions"][d] != 1 or p["window_strides"][d] != 1
                  or tuple(p["padding"][d]) != (0, 0)]
        others = [d for d in range(len(shape)) if d not in window]
        perm = others + window
        x = g.node("Transpose", [ins[0]], perm=perm)
        x = g.node("Reshape", [x, g.ints([-1, 1] + [int(shape[d]) for d in window])])
        pads = [int(p["padding"][d][0]) for d in window] + [int(p["padding"][d][1]) for d in window]
        attrs = dict(kernel_shape=[int(p["window_dimensions"][d]) for d in window],
                     strides=[int(p["window_strides"][d]) for d in window], pads=pads)
        dilations = [int(p["window_dilation"][d]) for d in window]
        if any(d != 1 for d in dilations):  # AveragePool has them from opset 19 only
            raise NotImplementedError(f"{eqn.primitive.name} with window dilation")
        if op == "MaxPool":
            y = g.node("MaxPool", [x], **attrs)
        else:  # a sum over the window, padding counted as zeros
            y = g.node("AveragePool", [x], count_include_pad=1, **attrs)
            size = int(np.prod(attrs["kernel_shape"]))
            y = g.node("Mul", [y, g.const(np.asarray(size, eqn.outvars[0].aval.dtype))])
        out_shape = eqn.outvars[0].aval.shape
        y = g.node("Reshape", [y, g.shape([out_shape[d] for d in perm])])
        return g.node("Transpose", [y], perm=_perm_inverse(perm))
    return rule


_RULES: dict[str, Callable] = {
    "add": _elementwise("Add"), "sub": _elementwise("Sub"), "mul": _elementwise("Mul"),
    "div": _elementwise("Div"), "max": _elementwise("Max"), "min": _elementwise("Min"),
    "pow": _elementwise("Pow"), "exp": _elementwise("Exp"), "log": _elementwise("Log"),
    "neg": _elementwise("Neg"), "sqrt": _elementwise("Sqrt"), "tanh": _elementwise("Tanh"),
    "logistic": _elementwise("Sigmoid"), "abs": _elementwise("Abs"),
    "stop_gradient": _elementwise("Identity"), "copy": _elementwise("Identity"),
    "copy_p": _elementwise("Identity"),
    "rsqrt": _rsqrt, "square": _square, "integer_pow": _integer_pow,
    "convert_element_type": _convert_element_type, "reshape": _reshape,
    "broadcast_in_dim": _broadcast_in_dim, "transpose": _transpose,
    "reduce_sum": _reduce("ReduceSum"), "reduce_max": _reduce("ReduceMax"),
    "reduce_min": _reduce("ReduceMin"), "concatenate": _concatenate, "squeeze": _squeeze,
    "slice": _slice, "rev": _rev, "pad": _pad, "dot_general": _dot_general,
    "conv_general_dilated": _conv, "reduce_window_max": _reduce_window("MaxPool"),
    "reduce_window_sum": _reduce_window("AveragePool"),
}
