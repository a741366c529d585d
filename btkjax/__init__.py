"""btkjax: a fast, differentiable Blending ToolKit on JAX."""

DEFAULT_SEED = 0

__version__ = "0.1.0"
