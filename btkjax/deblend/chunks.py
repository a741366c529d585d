"""Chunked execution of the deblender's jitted programs.

`apply_chunked` is the padded-chunk loop (one compiled shape whatever the number of blends). It
is the deblender's single copy; it moves to the execution engine (``btkjax.engine``) when that
lands on main.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["apply_chunked", "check_chunk", "default_chunk", "map_blends", "pad_mask"]


def map_blends(one, n_batched, *args):
    """``one`` over the blend axis of the first ``n_batched`` args and of a per-blend PSF (the
    last arg, [blend, band, Ry, Cx]; shared when [band, Ry, Cx]): called directly for a chunk of
    one blend (its while loops and conds stay scalar: a finished blend stops, an absent slot is
    skipped), vmapped else."""
    psf_k = args[-1]
    pk_axis = 0 if psf_k.ndim == 4 else None
    if args[n_batched - 1].shape[0] == 1:
        first = [jax.tree.map(lambda a: a[0], a) for a in args[:n_batched]]
        out = one(*first, *args[n_batched:-1], psf_k[0] if pk_axis == 0 else psf_k)
        return jax.tree.map(lambda a: a[None], out)
    in_axes = (0,) * n_batched + (None,) * (len(args) - n_batched - 1) + (pk_axis,)
    return jax.vmap(one, in_axes=in_axes)(*args)


def default_chunk() -> int:
    """Blends per compiled call of the fit: 1 on CPU (each blend runs its own loop and line
    searches; a vmapped batch would step every blend until the slowest converged and run every
    line search as long as the longest), 64 on accelerators (parallelism wins there)."""
    return 1 if jax.default_backend() == "cpu" else 64


def check_chunk(chunk) -> int:
    chunk = default_chunk() if chunk is None else chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
        raise ValueError(f"chunk must be a positive number of blends, got {chunk!r}.")
    return int(chunk)


def apply_chunked(fn, n, chunk, batched, shared=()):
    """Calls ``fn(*chunk_of_batched, *shared)`` on consecutive chunks of the leading axis of
    the pytrees ``batched`` (the last chunk padded by repeating the last blend; ``fn`` must
    return pytrees with a leading blend axis), and concatenates the results to ``n`` blends.

    One compiled shape whatever ``n``. The chunks are cut on the host (numpy): slicing a JAX
    array at a Python offset would compile a small program for every offset.
    """
    chunk = max(1, min(int(chunk), n))
    n_pad = -(-n // chunk) * chunk

    def pad(a):
        a = np.asarray(a)
        if a.shape[0] == n_pad:
            return a
        return np.concatenate([a, np.repeat(a[-1:], n_pad - n, axis=0)], axis=0)

    batched = jax.tree.map(pad, batched)
    outs = [fn(*jax.tree.map(lambda a, i=i: a[i:i + chunk], batched), *shared)
            for i in range(0, n_pad, chunk)]
    return jax.tree.map(lambda *a: jnp.asarray(np.concatenate([np.asarray(x) for x in a])[:n]),
                        *outs)


def pad_mask(mask, chunk):
    """mask [blend, slot] padded with empty blends to a multiple of ``chunk`` (padding blends
    cost nothing: `apply_chunked` leaves arrays that are already padded alone)."""
    n = mask.shape[0]
    n_pad = -(-n // min(chunk, n)) * min(chunk, n)
    return jnp.concatenate([mask, jnp.zeros((n_pad - n,) + mask.shape[1:], bool)]) \
        if n_pad > n else mask
