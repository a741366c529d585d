"""``btkjax.profiles`` is :mod:`btkjax.core.profiles` (the path BTK-era code and notebooks use, kept)."""

import sys

from btkjax.core import profiles as _module

sys.modules[__name__] = _module
