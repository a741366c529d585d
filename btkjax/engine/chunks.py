"""The padded-chunk rule, written once.

`n` items are covered by calls of one size ``chunk`` (a multiple of ``unit``), the last call
padded by repeating its last item. A compiled program then sees one shape whatever the batch,
and, XLA's code (hence its last-bit rounding) depending only on shapes, an item's result is
bit-identical in a batch of 1 or 1000, at any position.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from btkjax.engine.devices import sharded

__all__ = ["Task", "pieces", "plan", "padded_take", "map_chunks", "inner_batch", "CPU_INNER"]

CPU_INNER = 2
"""Items (blends or galaxies) a compiled call renders at once inside its loop on CPU: the
k-images, transforms and images of two galaxies (~1.4 MB in 6 bands) stay in the core's cache,
where a vmap over a whole call streams through memory (2.3x the time per galaxy, measured:
LSST, 120-pixel boxes)."""


def inner_batch(chunk: int) -> int:
    """The batch of the loop body of compiled calls of `chunk` items: `CPU_INNER` on CPU
    (cache-sized), an eighth of the call on accelerators (which want wide batches)."""
    if jax.default_backend() == "cpu":
        return min(CPU_INNER, chunk)
    return max(1, chunk // 8)


class Task(NamedTuple):
    """One compiled call: items ``start:stop`` padded to ``size``."""

    start: int
    stop: int
    size: int


def pieces(n: int, chunk: int, unit: int = 1) -> list[int]:
    """Sizes of the calls that cover `n` items: calls of `chunk` rounded down to a multiple of
    `unit` (at least `unit`), the last one padded."""
    chunk = max(unit, chunk // unit * unit)
    return [chunk] * (-(-n // chunk))


def plan(n: int, chunk: int, unit: int = 1) -> list[Task]:
    """The `Task` of each call covering `n` items (`pieces`)."""
    tasks, start = [], 0
    for size in pieces(n, chunk, unit):
        stop = min(start + size, n)
        tasks.append(Task(start, stop, size))
        start = stop
    return tasks


def padded_take(task: Task) -> np.ndarray:
    """Item indices of a call: ``start .. start + size``, past ``stop`` repeating the last."""
    return np.arange(task.start, task.start + task.size).clip(max=task.stop - 1)


def _trim(tree, k):
    return jax.tree.map(lambda a: np.asarray(a)[:k], tree)


def map_chunks(fn, n: int, chunk: int, batched, shared=(), static=(), *, unit: int = 1,
               threads=None, mesh=None, consume=None, on_progress=None):
    """Applies a jitted ``fn(*batched_chunk, *shared, **dict(static))`` over padded chunks of
    the leading axis of the pytrees in `batched`.

    Args:
        fn: a function of ``len(batched) + len(shared)`` arguments returning a pytree of
            arrays with a leading item axis (None leaves allowed).
        n: number of items (the leading size of every leaf of `batched`).
        chunk: items per call (rounded to a multiple of `unit`; with a `mesh`, per device).
        batched: tuple of pytrees (NumPy or JAX leaves) cut along axis 0, on the host.
        shared: tuple of arguments passed whole to every call.
        static: ``(name, value)`` pairs passed as keyword arguments (hashable; part of the
            sharded cache key).
        unit: calls are a multiple of this.
        threads: a `HostThreads` to run the calls concurrently (default: in order, here).
        mesh: shard each call over this mesh's "blend" axis (`sharded`): ``chunk`` items per
            device.
        consume: ``consume(task, result)`` called with each call's result trimmed to its
            ``stop - start`` items (NumPy), e.g. to write it in place; then nothing is
            returned.
        on_progress: ``on_progress(k)`` after each call, with its number of real items.

    Returns:
        the results concatenated over calls, trimmed to `n` items (NumPy), or None with
        `consume`.

    Example (a deblender's fit, ``chunk`` blends per compiled call, one compilation)::

        fitted = map_chunks(fit_jit, n_blends, chunk, (params, images, mask), (psf_k,),
                            (("max_steps", 200),))
    """
    batched = tuple(jax.tree.map(np.asarray, b) for b in batched)
    kwargs = dict(static)
    if mesh is not None:
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        call_fn = sharded(fn, mesh, len(batched), len(shared), tuple(static))
        shared = jax.device_put(tuple(shared), NamedSharding(mesh, P()))
        by_blend = NamedSharding(mesh, P("blend"))
        tasks = plan(n, chunk * mesh.size, unit * mesh.size)

        def call(args):
            return call_fn(*jax.device_put(args, by_blend), *shared)
    else:
        tasks = plan(n, chunk, unit)

        def call(args):
            return fn(*args, *shared, **kwargs)

    def args_of(task):
        take = padded_take(task)
        return tuple(jax.tree.map(lambda a: a[take], b) for b in batched)

    def finish(task, result):
        out = _trim(result, task.stop - task.start)
        if consume is not None:
            consume(task, out)
            out = None
        if on_progress is not None:
            on_progress(task.stop - task.start)
        return out

    if threads is not None and mesh is None:
        outs = threads.run(lambda task: finish(task, call(args_of(task))), tasks)
    else:  # every call dispatched (asynchronously) before the first result is copied out
        pending = [(task, call(args_of(task))) for task in tasks]
        outs = [finish(task, result) for task, result in pending]
    if consume is not None or not outs:
        return None
    if len(outs) == 1:
        return outs[0]
    return jax.tree.map(lambda *a: np.concatenate(a), *outs)
