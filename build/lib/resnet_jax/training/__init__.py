"""Training: config, state, optimizers, pure steps, parallel strategies, checkpoints, loop."""
