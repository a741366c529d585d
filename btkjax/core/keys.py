"""Randomness: the one rule that turns a seed into per-blend keys.

One integer seed at the edge becomes a JAX key. Each purpose draws from its own stream
(``stream_key``: sampling, rotation, noise per survey never share randomness), and each blend
from ``fold_in(stream key, global blend index)`` (``blend_keys``): never from its position in a
batch, so blend i is the same whatever the batch size, the number of devices or processes, and
whether the run was resumed. Blend ids must be in [0, 2**31) (they are cast to int32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DEFAULT_SEED",
    "NOISE_STREAM",
    "ROTATION_STREAM",
    "as_key",
    "blend_keys",
    "blend_uniform",
    "stream_key",
    "survey_stream",
]

DEFAULT_SEED = 0
"""The seed every object that needs one uses by default (as BTK's ``DEFAULT_SEED``)."""

NOISE_STREAM = 1
"""Stream tag of the noise (then folded with the survey's ``survey_stream``)."""
ROTATION_STREAM = 2
"""Stream tag of the per-galaxy rotations (BTK's ``augment_data``)."""


def as_key(key_or_seed) -> jax.Array:
    """A JAX PRNG key: an int seed becomes ``jax.random.key(seed)``; keys pass through."""
    if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, bool):
        return jax.random.key(int(key_or_seed))
    return key_or_seed


def stream_key(key_or_seed, *streams: int) -> jax.Array:
    """``fold_in`` of the key (or seed) with each stream tag in turn."""
    key = as_key(key_or_seed)
    for s in streams:
        key = jax.random.fold_in(key, s)
    return key


def blend_keys(key: jax.Array, blend_ids) -> jax.Array:
    """One key per blend, ``fold_in(key, blend_id)`` with its global index: independent of
    batching. ``blend_ids`` is an int array ``[blend]``."""
    ids = jnp.asarray(blend_ids, dtype=jnp.int32)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


def blend_uniform(key: jax.Array, blend_ids, shape, minval=0.0, maxval=1.0,
                  dtype=jnp.float32) -> jax.Array:
    """Per blend, ``jax.random.uniform(fold_in(key, id), shape, dtype, minval, maxval)``:
    [blend, *shape]. The dtype is explicit (float32 by default) so that the draw does not
    depend on ``jax_enable_x64``."""
    keys = blend_keys(key, blend_ids)
    return jax.vmap(lambda k: jax.random.uniform(k, tuple(shape), dtype, minval, maxval))(keys)


def survey_stream(name: str) -> int:
    """A stable integer per survey name (Python's ``hash()`` is salted per process)."""
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little") % (2**31 - 1)
