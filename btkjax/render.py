"""``btkjax.render`` is :mod:`btkjax.core.render` (the path BTK-era code and notebooks use, kept)."""

import sys

from btkjax.core import render as _module

sys.modules[__name__] = _module
