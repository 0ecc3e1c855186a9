"""Numerical kernels used by the models (backend-specific fast paths)."""
