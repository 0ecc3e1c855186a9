"""resnet_jax: residual networks and AlexNet in JAX/Flax for image classification."""

from resnet_jax.ops.heap import retain_freed_memory as _retain_freed_memory

# Before JAX creates its CPU client: per-step buffers are reused instead of page-faulted in
# again on every step (resnet_jax/ops/heap.py; RESNET_JAX_HEAP=default turns it off).
_retain_freed_memory()

__version__ = "0.1.0"
