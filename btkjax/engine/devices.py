"""Devices: the ``devices=`` option, the blend mesh, sharded functions in a bounded cache."""

from __future__ import annotations

from collections import OrderedDict

import jax
import numpy as np

__all__ = ["local_devices", "blend_mesh", "sharded", "sharded_cache_size",
           "sharded_mesh_sizes", "SHARDED_CACHE_SIZE"]

SHARDED_CACHE_SIZE = 64
"""Sharded functions kept (least recently used dropped): one per (function, mesh, static
arguments); a generator needs a few per FFT size."""

_CACHE: OrderedDict = OrderedDict()


def sharded_cache_size() -> int:
    """How many sharded functions are cached now."""
    return len(_CACHE)


def sharded_mesh_sizes() -> list[int]:
    """The device count of the mesh of each cached sharded function (what ran sharded)."""
    return [key[1].size for key in _CACHE]


def local_devices(devices):
    """The devices of a ``devices`` option: None (no sharding), "all" (every local device), an
    int n (the first n local devices) or a non-empty sequence of `jax.Device`."""
    if devices is None:
        return None
    local = jax.local_devices()
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(f"devices must be None, 'all', an int or a list of devices, got "
                             f"{devices!r}.")
        return list(local)
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(local):
            raise ValueError(f"devices={devices} but this process has {len(local)} local "
                             f"device(s): {local}.")
        return list(local[: int(devices)])
    devices = list(devices)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise TypeError(f"devices must be None, 'all', an int or a non-empty list of "
                        f"jax.Device, got {devices!r}.")
    return devices


def blend_mesh(devices):
    """A 1-D mesh with axis "blend" over `devices` (None for None)."""
    return None if devices is None else jax.sharding.Mesh(np.array(devices), ("blend",))


def sharded(fn, mesh, n_batched: int, n_shared: int, static: tuple = ()):
    """``jit(shard_map(fn))`` over `mesh`'s "blend" axis: the first `n_batched` arguments split
    along their leading axis, the next `n_shared` replicated, outputs split. Each device runs
    the single-device program of ``fn(*args, **dict(static))`` on its own items, so results do
    not depend on the number of devices. Cached (LRU, `SHARDED_CACHE_SIZE`) on ``(fn, mesh,
    n_batched, n_shared, static)``: `fn` and the static values must be hashable."""
    from jax.sharding import PartitionSpec as P

    key = (fn, mesh, n_batched, n_shared, static)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    kwargs = dict(static)

    def body(*args):
        return fn(*args, **kwargs)

    blend = P("blend")
    out = jax.jit(jax.shard_map(body, mesh=mesh,
                                in_specs=(blend,) * n_batched + (P(),) * n_shared,
                                out_specs=blend, check_vma=False))
    _CACHE[key] = out
    while len(_CACHE) > SHARDED_CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out
