"""resnet_jax: residual networks and AlexNet in JAX/Flax for image classification."""

__version__ = "0.1.0"
