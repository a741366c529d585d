"""``btkjax.tolerances`` is :mod:`btkjax.core.tolerances` (the path BTK-era code and notebooks use, kept)."""

import sys

from btkjax.core import tolerances as _module

sys.modules[__name__] = _module
