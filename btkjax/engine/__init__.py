"""The execution engine: how compiled calls are scheduled, written once.

- `chunks`: the padded-chunk rule (calls of one fixed size, the last one padded by repeating
  its last item, so that one compiled program serves every batch and an item's result does
  not depend on the batch it is in) and `map_chunks`, which applies a jitted function over
  padded chunks of the leading axis (on host threads, or sharded over devices);
- `threads`: a host thread pool with an explicit lifetime (`HostThreads`);
- `devices`: the ``devices=`` option (`local_devices`), the blend mesh, and the sharded
  (shard_map) versions of a function, in a bounded cache.

The per-blend key rule lives in `btkjax.core.keys`. The engine imports only JAX and NumPy.
"""

from btkjax.engine.chunks import Task, inner_batch, map_chunks, padded_take, pieces, plan
from btkjax.engine.devices import blend_mesh, local_devices, sharded
from btkjax.engine.threads import HostThreads, host_thread_count

__all__ = [
    "Task",
    "inner_batch",
    "map_chunks",
    "padded_take",
    "pieces",
    "plan",
    "blend_mesh",
    "local_devices",
    "sharded",
    "HostThreads",
    "host_thread_count",
]
