"""AlexNet (Krizhevsky, Sutskever & Hinton 2012) and the single-tower "one weird trick"
variant (Krizhevsky 2014) that torchvision ships as `alexnet`.

The paper's two-GPU split is expressed as grouped convolutions: conv2, conv4 and conv5 have
`feature_group_count=2`, so each tower's output channels (first half / second half) see
only that tower's input channels; conv3 and the dense layers see both towers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax.models.common import ModuleDef, make_conv, make_dense
from resnet_jax.models.layers import adaptive_avg_pool, local_response_norm

KERNELS = (11, 5, 3, 3, 3)
PADDING = (2, 2, 1, 1, 1)
POOL_AFTER = (True, True, False, False, True)  # overlapping 3x3/2 max-pools (section 3.4)


def min_input_size() -> int:
    """Smallest square input for which every pooling window still fits."""
    size = 1
    while True:
        s = (size + 2 * PADDING[0] - KERNELS[0]) // 4 + 1
        ok = s >= 1
        for i in range(5):
            if i > 0:
                s = s + 2 * PADDING[i] - KERNELS[i] + 1
            if POOL_AFTER[i]:
                ok = ok and s >= 3
                s = (s - 3) // 2 + 1
        if ok and s >= 1:
            return size
        size += 1


class AlexNet(nn.Module):
    """AlexNet: five convolutions, three dense layers.

    Defaults are the paper's: widths 96-256-384-384-256, ReLU, local response normalisation
    after the ReLU of conv1 and conv2 (k=2, n=5, alpha=1e-4, beta=0.75), overlapping
    max-pooling, dropout 0.5 after fc6 and fc7, and the two-tower split (`groups`). A
    224x224 input with 2-pixel padding gives the paper's 55x55 conv1 map and a 6x6x256 pool5;
    other sizes are average-pooled to 6x6 as torchvision does. fc6's input is flattened in
    (H, W, C) order.

    Attributes:
      widths: output channels of conv1..conv5.
      groups: feature groups of conv1..conv5 (2 = the two towers; all 1 = one tower).
      lrn: local response normalisation after conv1 and conv2.
      hidden: width of fc6 and fc7.
      dropout_rate: dropout on fc6 and fc7 outputs in train mode (rng stream "dropout").
      paper_init: N(0, 0.01) weights, biases 1 in conv2, conv4, conv5, fc6, fc7 and 0
        elsewhere (section 5). Otherwise Kaiming (fan-out) convs and PyTorch dense init.
      conv, pool: the layer constructors (`nn.Conv`, `nn.max_pool` or drop-ins with their
        arguments). AlexNet has no BatchNorm, so it takes no `norm`.
    """

    num_classes: int = 1000
    widths: Sequence[int] = (96, 256, 384, 384, 256)
    groups: Sequence[int] = (1, 2, 1, 2, 2)
    lrn: bool = True
    hidden: int = 4096
    dropout_rate: float = 0.5
    paper_init: bool = True
    pool_output: int = 6
    dtype: jnp.dtype = jnp.float32
    conv: ModuleDef = nn.Conv
    pool: Callable = nn.max_pool

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        h, w = x.shape[1:3]
        smallest = min_input_size()
        if min(h, w) < smallest:
            raise ValueError(
                f"AlexNet needs inputs of at least {smallest}x{smallest} pixels, got {h}x{w}"
            )
        paper_ones = (False, True, False, True, True)
        weight_init = nn.initializers.normal(0.01)
        x = jnp.asarray(x, self.dtype)
        for i in range(5):
            if self.paper_init:
                conv = make_conv(self.conv, self.dtype, True, weight_init)
                bias_init = nn.initializers.ones if paper_ones[i] else nn.initializers.zeros
            else:
                conv = make_conv(self.conv, self.dtype, True)
                bias_init = nn.initializers.zeros
            k, p = KERNELS[i], PADDING[i]
            x = conv(
                self.widths[i],
                (k, k),
                strides=4 if i == 0 else 1,
                padding=((p, p), (p, p)),
                feature_group_count=self.groups[i],
                bias_init=bias_init,
                name=f"conv{i + 1}",
            )(x)
            x = nn.relu(x)
            if self.lrn and i < 2:
                x = local_response_norm(x)
            if POOL_AFTER[i]:
                x = self.pool(x, (3, 3), strides=(2, 2))
        x = adaptive_avg_pool(x, (self.pool_output, self.pool_output))
        x = x.reshape((x.shape[0], -1))
        for name in ("fc6", "fc7"):
            dense = make_dense(self.dtype, weight_init) if self.paper_init else make_dense(self.dtype)
            bias_init = nn.initializers.ones if self.paper_init else nn.initializers.zeros
            x = nn.relu(dense(self.hidden, bias_init=bias_init, name=name)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        dense = make_dense(self.dtype, weight_init) if self.paper_init else make_dense(self.dtype)
        x = dense(self.num_classes, name="fc8")(x)
        return jnp.asarray(x, jnp.float32)
