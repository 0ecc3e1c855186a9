"""Pretrained weights from other frameworks as resnet_jax variables.

`torchvision.convert(state_dict, model_name)` and `keras.convert(weights, model_name)` return
`{"params": ..., "batch_stats": ...}` for the registry model `model_name`; every tensor is
accounted for (a missing, extra or wrongly shaped one is a ValueError naming it). File
reading and the registry of published weight files are in `files.py`.
"""

from resnet_jax.convert.common import ConversionError, expected_variables

__all__ = ["ConversionError", "expected_variables"]
