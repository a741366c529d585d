"""btkjax: a fast, differentiable Blending ToolKit on JAX.

``import btkjax as btk`` gives BTK's modules as attributes (loaded on first use): ``catalog``,
``sampling_functions``, ``survey``, ``draw_blends``, ``measure``, ``metrics``, ``plot_utils``,
``utils``, and the JAX-native ones: ``samplers``, ``profiles``, ``render``, ``galaxies``,
``noise``, ``galsim_backend``, ``jax_metrics``, ``deblend``.
"""

import importlib

DEFAULT_SEED = 0
"""The seed every object that needs one uses by default (as BTK's ``DEFAULT_SEED``)."""

__version__ = "0.1.0"

_SUBMODULES = (
    "catalog",
    "sampling_functions",
    "survey",
    "draw_blends",
    "measure",
    "match",
    "metrics",
    "plot_utils",
    "utils",
    "samplers",
    "profiles",
    "render",
    "galaxies",
    "noise",
    "galsim_backend",
    "jax_metrics",
    "deblend",
    "cosmos",
    "tolerances",
    "cli",
)

__all__ = ["DEFAULT_SEED", "__version__", *_SUBMODULES]


def __getattr__(name):
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
