"""btkjax: a fast, differentiable Blending ToolKit on JAX.

Three floors, imports only downward (docs/ARCHITECTURE.md; ``tests/test_layers.py`` checks it):

- ``btkjax.core``: the pure-JAX core (profiles, render, sources, real galaxies, noise, samplers,
  metrics, keys, tolerances): arrays in, arrays out;
- ``btkjax.engine``: execution (chunks, padding, host threads, sharding);
- the package root: BTK's interface (``catalog``, ``sampling_functions``, ``survey``,
  ``draw_blends``, ``measure``, ``match``, ``metrics``, ``plot_utils``, ``utils``, ``streaming``,
  ``cli``, the GalSim reference backend) and the deblender (``btkjax.deblend``).

``import btkjax as btk`` gives the public modules as attributes, imported on first use (PEP 562:
``import btkjax`` stays cheap; it hides no import cycle). ``btkjax.profiles``, ``render``,
``noise``, ``jax_metrics``, ``tolerances`` and ``samplers`` are the core modules under the names
they had before the core moved into its folder.
"""

import importlib

from btkjax.core.keys import DEFAULT_SEED

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
