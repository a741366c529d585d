"""``btkjax.noise`` is :mod:`btkjax.core.noise` (the path BTK-era code and notebooks use, kept)."""

import sys

from btkjax.core import noise as _module

sys.modules[__name__] = _module
