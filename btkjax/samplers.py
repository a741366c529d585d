"""``btkjax.samplers``: the JAX samplers of :mod:`btkjax.core.samplers`, with the host helpers that
prepare them from tables (``eligible_rows``) and convert table samplers' output
(``blends_from_tables``), which live in :mod:`btkjax.sampling_functions`. Kept for old imports."""

from btkjax.core.keys import as_key, blend_keys
from btkjax.core.samplers import *  # noqa: F403
from btkjax.core.samplers import __all__ as _core_all
from btkjax.core.samplers import trace_counts
from btkjax.sampling_functions import blends_from_tables, eligible_rows

__all__ = [*_core_all, "as_key", "blend_keys", "trace_counts", "eligible_rows", "blends_from_tables"]
