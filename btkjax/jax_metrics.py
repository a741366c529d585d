"""``btkjax.jax_metrics`` is :mod:`btkjax.core.metrics` (the path BTK-era code and notebooks use, kept)."""

import sys

from btkjax.core import metrics as _module

sys.modules[__name__] = _module
