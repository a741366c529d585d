"""``btkjax.draw_blends``: BTK's generators, where BTK's users look for them.

``CatsimGenerator`` and the base ``DrawBlendsGenerator`` live in :mod:`btkjax.generator`,
``CosmosGenerator`` in :mod:`btkjax.cosmos`; this module gathers them under BTK's name.
"""

from btkjax.cosmos import CosmosGenerator
from btkjax.generator import BACKENDS, PIPELINES, CatsimGenerator, DrawBlendsGenerator

__all__ = ["DrawBlendsGenerator", "CatsimGenerator", "CosmosGenerator", "BACKENDS", "PIPELINES"]
