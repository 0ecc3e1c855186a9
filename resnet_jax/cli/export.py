"""Export a run's selected model for serving (ONNX, StableHLO) or for PyTorch.

    python -m experiments.export --workdir DIR --out OUT [--format onnx|stablehlo|pytorch]
        [--layout timm|torchvision] [--checkpoint selected|best|latest] [--ema | --no-ema]

onnx and stablehlo write OUT/model.onnx or OUT/model.stablehlo (logits of float32 NHWC
images, any batch size), OUT/preprocessing.json (how to make those images from uint8 ones:
mean, std, crop, layout; the class names) and OUT/class_names.txt; pytorch writes
OUT/model.safetensors and OUT/config.json for timm's or torchvision's model.
"""

from __future__ import annotations

import argparse
import sys

FORMATS = ("onnx", "stablehlo", "pytorch")


def export_run(workdir: str, out: str, format: str = "onnx", layout: str = "timm",
               which: str = "selected", ema: bool | None = None) -> str:
    """Export checkpoint `which` of the run in `workdir` to `out`; returns what was written."""
    from resnet_jax import Run

    from resnet_jax.export import check_format

    check_format(format)  # before the checkpoint is read
    return Run.load(workdir, which, ema).export(out, format=format, layout=layout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the run directory")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--format", default="onnx", help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--layout", default="timm", help="pytorch only: timm or torchvision")
    parser.add_argument("--checkpoint", choices=("selected", "best", "latest"),
                        default="selected")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="the EMA weights (default: as the run selected)")
    args = parser.parse_args(argv)
    try:
        written = export_run(args.workdir, args.out, args.format, args.layout,
                             args.checkpoint, args.ema)
    except (FileNotFoundError, ValueError, NotImplementedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
