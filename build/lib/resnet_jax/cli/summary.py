"""Per-layer summary of a registered model, like Keras' `model.summary()`.

    python -m experiments.summary --model resnet50 [--input-shape 224,224,3] [--num-classes N]
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from resnet_jax.models import get_model, get_spec, list_models


def parse_shape(text: str) -> tuple[int, int, int]:
    """'224,224,3' -> (224, 224, 3), with an error naming a malformed value."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"--input-shape {text!r} must be three positive integers HEIGHT,WIDTH,CHANNELS"
        )
    return shape  # type: ignore[return-value]


def summarize(name: str, input_shape: tuple[int, int, int] | None = None,
              num_classes: int | None = None, depth: int | None = None) -> str:
    """The per-layer table (output shapes, parameters) and totals of model `name`."""
    spec = get_spec(name)
    shape = input_shape or spec.input_shape
    model = get_model(name, num_classes=num_classes)
    x = jnp.zeros((1, *shape), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    table = nn.tabulate(model, rngs, depth=depth, console_kwargs={"width": 140, "force_terminal": sys.stdout.isatty()})(x)
    variables = jax.eval_shape(model.init, rngs, x)
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))
    header = f"{name}: {spec.description}\ninput (1, {', '.join(map(str, shape))})\n"
    return f"{header}{table}\nTrainable parameters: {count:,}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=f"one of: {', '.join(list_models())}")
    parser.add_argument("--input-shape", type=parse_shape, default=None,
                        help="HEIGHT,WIDTH,CHANNELS (default: the model's natural input)")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None,
                        help="nesting depth of the table (default: every layer)")
    args = parser.parse_args(argv)
    try:
        print(summarize(args.model, args.input_shape, args.num_classes, args.depth))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
