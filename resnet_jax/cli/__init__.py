"""The commands users type, installed as console scripts (pyproject.toml) and also run as
`python -m resnet_jax.cli.NAME` or, from a checkout, `python -m experiments.NAME`:

    resnet-jax-train      train.py            train (or resume) a run from a config
    resnet-jax-evaluate   evaluate.py         evaluate a run's selected model on a split
    resnet-jax-sweep      sweep.py            a grid of configs times seeds, run or planned
    resnet-jax-compare    compare.py          two settings of a sweep, with their interval
    resnet-jax-launch     launch.py           a multi-process run on this machine
    resnet-jax-plot       plot_runs.py        runs' accuracy against time, one plot
    resnet-jax-summary    summary.py          a model's layers, parameters and FLOPs
    resnet-jax-convert    convert_weights.py  PyTorch/timm/Keras weights into a run's format
    resnet-jax-export     export.py           a run's model as ONNX, StableHLO or PyTorch weights
"""
